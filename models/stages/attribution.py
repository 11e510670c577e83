"""The attribution stage (attribution_generation.py): hook-steered generations, their top-k training images,
the attribution grid and, with --evaluate, the steering report.

Attribution here is *similarity*: which training images look most like a generation (by digit shape, the default
where the reference features carry it; or in the student's bottleneck space). It is not causal influence (what
would change had an image been left out). Each score comes with its percentile among the reference set's own
nearest-neighbour scores.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.datasets import load_dataset
from ..diffusion.noise import per_sample_noise
from ..evaluation.attribution import attribution_grid, evaluate_steering
from ..io.device import pick_device
from ..io.errors import PipelineError
from ..io.files import atomic_save, prepare_output_dir
from ..io.images import save_image_grid
from ..io.paths import AUDIT_CLASSIFIER, DEFAULT_CLASSIFIER, DEFAULT_TEACHER
from ..nets.student import load_teacher_and_student
from ..steering.hooks import BOTTLENECK, DEFAULT_HOOK_STYLE
from ..steering.steering import ATTRIBUTE_BY, Steering, check_hook_style
from .features import check_feature_layer, check_feature_pairing, load_reference_features


@dataclass
class AttributionOptions:
    ddpm_ckpt: str = DEFAULT_TEACHER
    decoder_ckpt: str = "direct_decoder_results/best_model.pt"
    ref_features_path: str = "reference_features.pt"
    n_samples: int = 36
    output_dir: str = "attribution_outputs"
    include: list = field(default_factory=lambda: list(range(0, 10)))
    exclude: list = field(default_factory=lambda: list(range(100, 110)))
    target_class: int = 3
    strength: list = field(default_factory=lambda: [0.5])
    hook_style: str = DEFAULT_HOOK_STYLE  # how class / include / exclude hooks move each generation (hooks.HOOK_STYLES)
    hook_layer: str = BOTTLENECK  # where they act: the bottleneck or a finer decoder layer (models/nets/layers.py)
    top_k: int = 5
    seed: int = 0
    evaluate: bool = True
    n_eval: int = 256
    classifier: str = DEFAULT_CLASSIFIER
    audit_classifier: str = AUDIT_CLASSIFIER  # the class-hook success once more, by a network no loss has seen
    attribute_by: str = "auto"  # shape where the features carry it, else bottleneck; or image: re-encoded
    cpu: bool = False


def _validate(opts: AttributionOptions) -> None:
    if opts.n_samples <= 0:
        raise PipelineError(f"--n_samples must be positive, got {opts.n_samples}")
    if opts.top_k <= 0:
        raise PipelineError(f"--top_k must be positive, got {opts.top_k}")
    check_hook_style(opts.hook_style)
    if opts.attribute_by not in ("auto", *ATTRIBUTE_BY):
        raise PipelineError(f"--attribute_by must be one of auto, {', '.join(ATTRIBUTE_BY)}, got {opts.attribute_by!r}")
    for s in opts.strength:
        if not math.isfinite(s) or not 0 <= s <= 1:
            raise PipelineError(f"--strength values must be finite numbers in [0, 1], got {s}")


def attribution_generation(opts: AttributionOptions, dry_run: bool = False) -> dict:
    _validate(opts)
    device = pick_device(opts.cpu)
    t0 = time.perf_counter()
    teacher, student = load_teacher_and_student(opts.ddpm_ckpt, opts.decoder_ckpt, device)
    ref = load_reference_features(opts.ref_features_path, device)
    check_feature_pairing(ref, teacher.sha256, student.sha256, opts.ref_features_path)
    check_feature_layer(ref, student.decoder, opts.hook_layer, opts.ref_features_path)
    steer = Steering(student.decoder, ref, device)
    attribute_by = steer.resolve_attribute_by(opts.attribute_by)
    s0 = opts.strength[0]
    hooks = {"baseline": None, **_hooks(steer, opts, s0)}
    chosen = {"include": {"indices": opts.include, "labels": ref["labels"][opts.include].tolist()},
              "exclude": {"indices": opts.exclude, "labels": ref["labels"][opts.exclude].tolist()}}
    if dry_run:
        print({"options": opts.__dict__, "device": str(device), "reference": ref["metadata"]["dataset"],
               "n_reference": len(ref["labels"]), "chosen": chosen, "attribute_by": attribute_by})
        return {}
    out = prepare_output_dir(opts.output_dir)
    print(f"loaded teacher, student and {len(ref['labels'])} reference features to {device} in "
          f"{time.perf_counter() - t0:.2f}s")
    for kind in ("include", "exclude"):
        print(f"  {kind} indices {chosen[kind]['indices']} have labels {chosen[kind]['labels']}")
    z = per_sample_noise(opts.seed, range(opts.n_samples), device=device)
    results = {"noise": z.cpu(), "options": dict(opts.__dict__), "chosen": chosen, "runs": {},
               "attribute_by": attribute_by,
               "reference": {"path": opts.ref_features_path, "dataset": ref["metadata"]["dataset"]}}
    grids = {}
    for s in opts.strength:
        run_hooks = hooks if s == s0 else {"baseline": None, **_hooks(steer, opts, s)}
        for name, hook in run_hooks.items():
            if name == "baseline" and s != s0:
                continue
            images, feats = steer.generate(z, hook)
            scores, idx, labels = steer.attribute_generation(images, feats, opts.top_k, attribute_by)
            key = name if name == "baseline" else f"{name}@{s}"
            results["runs"][key] = {"images": images.cpu(), "features": feats.cpu(), "top_k_scores": scores,
                                    "top_k_indices": idx, "top_k_labels": labels,
                                    "top_k_percentiles": steer.percentiles(scores, attribute_by),
                                    "similarity_to_include_set": _mean_sim(feats, steer.features[opts.include]),
                                    "similarity_to_exclude_set": _mean_sim(feats, steer.features[opts.exclude])}
            grids[key] = images
            suffix = "" if s == s0 or name == "baseline" else f"_s{s}"
            save_image_grid(images, out / f"samples_{name}{suffix}.png")
    atomic_save(results, out / "attribution_results.pt")
    dataset = load_dataset(ref["metadata"]["dataset"], ref["metadata"]["split"])
    base = results["runs"]["baseline"]
    attribution_grid(base["images"][:8], base["top_k_indices"][:8], base["top_k_scores"][:8],
                     base["top_k_labels"][:8], dataset, out / "attribution_grid.png", base["top_k_percentiles"][:8])
    summary = {"output_dir": str(out), "files": sorted(p.name for p in out.iterdir())}
    if opts.evaluate:
        summary["report"] = evaluate_steering(steer, dataset, opts, device, out / "attribution_report.json",
                                              examples=attribution_examples(base, attribute_by))
    print(f"attribution_generation: {len(results['runs'])} runs of {opts.n_samples} samples -> {out} "
          f"({time.perf_counter() - t0:.1f}s)")
    return summary


def attribution_examples(run: dict, attribute_by: str, n: int = 8) -> dict:
    """The first generations' top-k training images, scores and percentiles, as the report's readable sample."""
    return {"attribute_by": attribute_by, "generations": [
        [{"index": int(i), "label": int(lab), "score": round(float(s), 4), "percentile": round(float(p), 1)}
         for i, lab, s, p in zip(*(run[key][row] for key in ("top_k_indices", "top_k_labels", "top_k_scores",
                                                              "top_k_percentiles")))]
        for row in range(min(n, len(run["top_k_indices"])))]}


def _hooks(steer: Steering, opts: AttributionOptions, strength: float) -> dict:
    style, layer = opts.hook_style, opts.hook_layer
    return {"include": steer.include(opts.include, strength, style, layer=layer),
            "exclude": steer.exclude(opts.exclude, strength, style, layer=layer),
            f"class_{opts.target_class}": steer.toward_class(opts.target_class, strength, style, layer=layer)}


def _mean_sim(features: torch.Tensor, targets: torch.Tensor) -> float:
    centre = targets.float().mean(0, keepdim=True)
    return F.cosine_similarity(features.flatten(1).float(), centre.flatten(1), dim=1).mean().item()
