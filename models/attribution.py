"""Hook-steered generation and its attribution to training images, with an evaluation that can be checked.

Attribution here is *similarity* in the student's bottleneck space: which training images sit closest to the
features that produced a generation. It is not causal influence (what would change had an image been left out).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .classifier import load_classifier
from .data import load_dataset
from .features import check_feature_pairing, load_reference_features
from .hooks import class_hook, exclude_hook, include_hook, interpolate_hook
from .io import (AUDIT_CLASSIFIER, DEFAULT_CLASSIFIER, DEFAULT_TEACHER, PipelineError, atomic_save, atomic_write_json,
                 pick_device, prepare_output_dir, save_image_grid, software_versions)
from .noise import per_sample_noise
from .plots import save_figure
from .student import load_teacher_and_student

SWEEP = [round(0.1 * i, 1) for i in range(1, 11)]


@torch.inference_mode()
def top_k_similar(query: torch.Tensor, reference: torch.Tensor, k: int, chunk: int = 8192):
    """Cosine similarity of each query row to every reference row (flattened); returns (scores, indices)."""
    q = F.normalize(query.flatten(1).float(), dim=1)
    best_s = torch.full((q.shape[0], 0), -math.inf, device=q.device)
    best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, reference.shape[0], chunk):
        r = F.normalize(reference[start:start + chunk].to(q.device).flatten(1).float(), dim=1)
        s = q @ r.T
        s_all = torch.cat([best_s, s], 1)
        i_all = torch.cat([best_i, torch.arange(start, start + r.shape[0], device=q.device).expand(q.shape[0], -1)], 1)
        best_s, pos = s_all.topk(min(k, s_all.shape[1]), dim=1)
        best_i = i_all.gather(1, pos)
    return best_s, best_i


def _check_indices(name: str, indices: list[int], n: int) -> torch.Tensor:
    if not indices:
        raise PipelineError(f"--{name} needs at least one index")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise PipelineError(f"--{name} indices {bad[:5]} are outside the reference set (0..{n - 1})")
    return torch.as_tensor(indices)


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
    top_k: int = 5
    seed: int = 0
    evaluate: bool = True
    n_eval: int = 256
    classifier: str = DEFAULT_CLASSIFIER
    audit_classifier: str = AUDIT_CLASSIFIER  # the class-hook success once more, by a network no loss has seen
    cpu: bool = False


class Steering:
    """Reference features + a student: hooks by training-set index or class, and attribution of outputs."""

    def __init__(self, decoder, ref: dict, device):
        self.decoder = decoder
        self.ref = ref
        self.features = ref["features"].to(device)
        self.labels = ref["labels"]
        self.device = device

    def include(self, indices, strength):
        return include_hook(self.features[_check_indices("include", list(indices), len(self.labels))], strength)

    def exclude(self, indices, strength):
        return exclude_hook(self.features[_check_indices("exclude", list(indices), len(self.labels))], strength)

    def interpolate(self, a_indices, b_indices, alpha, strength):
        """Toward the point ``alpha`` of the way from the mean of training images a to the mean of images b."""
        n = len(self.labels)
        return interpolate_hook(self.features[_check_indices("interpolate a", list(a_indices), n)],
                                self.features[_check_indices("interpolate b", list(b_indices), n)], alpha, strength)

    def toward_class(self, label: int, strength):
        classes = sorted(int(c) for c in self.labels.unique())
        if label not in classes:
            raise PipelineError(f"--target_class {label} is not a label of the reference set ({classes})")
        return class_hook(self.features[(self.labels == label).to(self.features.device)], strength)

    @torch.inference_mode()
    def generate(self, z: torch.Tensor, hook=None):
        images, _, steered = self.decoder.generate(z, hook)
        return images.float().clamp(-1, 1), steered

    def attribute(self, features: torch.Tensor, k: int):
        scores, idx = top_k_similar(features, self.features, k)
        return scores.cpu(), idx.cpu(), self.labels[idx.cpu()]


def _validate(opts: AttributionOptions) -> None:
    if opts.n_samples <= 0:
        raise PipelineError(f"--n_samples must be positive, got {opts.n_samples}")
    if opts.top_k <= 0:
        raise PipelineError(f"--top_k must be positive, got {opts.top_k}")
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
    steer = Steering(student.decoder, ref, device)
    s0 = opts.strength[0]
    hooks = {"baseline": None, "include": steer.include(opts.include, s0), "exclude": steer.exclude(opts.exclude, s0),
             f"class_{opts.target_class}": steer.toward_class(opts.target_class, s0)}
    chosen = {"include": {"indices": opts.include, "labels": ref["labels"][opts.include].tolist()},
              "exclude": {"indices": opts.exclude, "labels": ref["labels"][opts.exclude].tolist()}}
    if dry_run:
        print({"options": opts.__dict__, "device": str(device), "reference": ref["metadata"]["dataset"],
               "n_reference": len(ref["labels"]), "chosen": chosen})
        return {}
    out = prepare_output_dir(opts.output_dir)
    print(f"loaded teacher, student and {len(ref['labels'])} reference features to {device} in "
          f"{time.perf_counter() - t0:.2f}s")
    for kind in ("include", "exclude"):
        print(f"  {kind} indices {chosen[kind]['indices']} have labels {chosen[kind]['labels']}")
    z = per_sample_noise(opts.seed, range(opts.n_samples), device=device)
    results = {"noise": z.cpu(), "options": dict(opts.__dict__), "chosen": chosen, "runs": {},
               "reference": {"path": opts.ref_features_path, "dataset": ref["metadata"]["dataset"]}}
    grids = {}
    for s in opts.strength:
        run_hooks = hooks if s == s0 else {"baseline": None, "include": steer.include(opts.include, s),
                                            "exclude": steer.exclude(opts.exclude, s),
                                            f"class_{opts.target_class}": steer.toward_class(opts.target_class, s)}
        for name, hook in run_hooks.items():
            if name == "baseline" and s != s0:
                continue
            images, feats = steer.generate(z, hook)
            scores, idx, labels = steer.attribute(feats, opts.top_k)
            key = name if name == "baseline" else f"{name}@{s}"
            results["runs"][key] = {"images": images.cpu(), "features": feats.cpu(), "top_k_scores": scores,
                                    "top_k_indices": idx, "top_k_labels": labels,
                                    "similarity_to_include_set": _mean_sim(feats, steer.features[opts.include]),
                                    "similarity_to_exclude_set": _mean_sim(feats, steer.features[opts.exclude])}
            grids[key] = images
            suffix = "" if s == s0 or name == "baseline" else f"_s{s}"
            save_image_grid(images, out / f"samples_{name}{suffix}.png")
    atomic_save(results, out / "attribution_results.pt")
    dataset = load_dataset(ref["metadata"]["dataset"], ref["metadata"]["split"])
    base = results["runs"]["baseline"]
    attribution_grid(base["images"][:8], base["top_k_indices"][:8], base["top_k_scores"][:8],
                     base["top_k_labels"][:8], dataset, out / "attribution_grid.png")
    summary = {"output_dir": str(out), "files": sorted(p.name for p in out.iterdir())}
    if opts.evaluate:
        summary["report"] = evaluate_steering(steer, dataset, opts, device, out / "attribution_report.json")
    print(f"attribution_generation: {len(results['runs'])} runs of {opts.n_samples} samples -> {out} "
          f"({time.perf_counter() - t0:.1f}s)")
    return summary


def _mean_sim(features: torch.Tensor, targets: torch.Tensor) -> float:
    centre = targets.float().mean(0, keepdim=True)
    return F.cosine_similarity(features.flatten(1).float(), centre.flatten(1), dim=1).mean().item()


def attribution_grid(images, indices, scores, labels, dataset, path: Path) -> None:
    """Each generation beside its top-k training images, with similarity and label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, k = indices.shape
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.3 * (k + 1), 1.45 * rows), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(images[r, 0].cpu(), cmap="gray", vmin=-1, vmax=1)
        axes[r, 0].set_title("generated", fontsize=7)
        for c in range(k):
            i = int(indices[r, c])
            axes[r, c + 1].imshow(dataset.images[i, 0], cmap="gray", vmin=-1, vmax=1)
            axes[r, c + 1].set_title(f"#{i} y={int(labels[r, c])}\ncos {float(scores[r, c]):.3f}", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


@torch.inference_mode()
def evaluate_steering(steer: Steering, dataset, opts: AttributionOptions, device, path: Path) -> dict:
    """Class-hook success, include/exclude effect in an independent (classifier) feature space, and attribution
    label agreement, against a pixel-space nearest-neighbour baseline."""
    classifier = load_classifier(opts.classifier, device)
    audit = load_classifier(opts.audit_classifier, device)
    z = per_sample_noise(opts.seed + 1, range(opts.n_eval), device=device)
    ref_images = dataset.images[:len(steer.labels)]

    def cls_features(x):
        return torch.cat([classifier.features(x[i:i + 512].to(device)) for i in range(0, x.shape[0], 512)])

    def sim_to(x_feats, target_feats):
        return F.cosine_similarity(x_feats, target_feats.mean(0, keepdim=True), dim=1).mean().item()

    inc_t, exc_t = cls_features(ref_images[opts.include]), cls_features(ref_images[opts.exclude])
    base_images, base_feats = steer.generate(z)
    base_cls = cls_features(base_images)
    base_pred = classifier(base_images).argmax(1).cpu()
    report = {"n_eval": opts.n_eval, "strengths": SWEEP, "target_class": opts.target_class,
              "baseline_share_target_class": (base_pred == opts.target_class).float().mean().item(),
              "class_hook_success": [], "class_hook_success_audit": [], "include_similarity": [], "exclude_similarity": [],
              "baseline_include_similarity": sim_to(base_cls, inc_t),
              "baseline_exclude_similarity": sim_to(base_cls, exc_t)}
    for s in SWEEP:
        imgs, _ = steer.generate(z, steer.toward_class(opts.target_class, s))
        for key, judge in (("class_hook_success", classifier), ("class_hook_success_audit", audit)):
            report[key].append((judge(imgs).argmax(1).cpu() == opts.target_class).float().mean().item())
        imgs, _ = steer.generate(z, steer.include(opts.include, s))
        report["include_similarity"].append(sim_to(cls_features(imgs), inc_t))
        imgs, _ = steer.generate(z, steer.exclude(opts.exclude, s))
        report["exclude_similarity"].append(sim_to(cls_features(imgs), exc_t))
    _, idx, labels = steer.attribute(base_feats, 5)
    _, pix_idx = top_k_similar(base_images.cpu(), ref_images, 5)
    pix_labels = steer.labels[pix_idx]

    def agreement(lbls):
        top1 = (lbls[:, 0] == base_pred).float().mean().item()
        vote = torch.tensor([Counter(row.tolist()).most_common(1)[0][0] for row in lbls])
        return {"top1": top1, "top5_majority": (vote == base_pred).float().mean().item()}

    report["attribution_label_agreement"] = {"bottleneck": agreement(labels), "pixel_nn_baseline": agreement(pix_labels)}
    report["note"] = ("similarities are cosine similarities in the project classifier's feature space (independent "
                      "of the bottleneck the hooks act on); attribution is nearest-neighbour similarity in the "
                      "bottleneck, not causal influence")
    report["versions"] = software_versions()
    atomic_write_json(report, path)
    _print_report(report)
    return report


def _print_report(r: dict) -> None:
    print(f"{'strength':>8} {'class-' + str(r['target_class']) + ' success':>16} {'(audit)':>8} {'incl. sim':>10} "
          f"{'excl. sim':>10}")
    print(f"{'0 (base)':>8} {r['baseline_share_target_class']:>16.2%} {'':>8} {r['baseline_include_similarity']:>10.3f} "
          f"{r['baseline_exclude_similarity']:>10.3f}")
    for s, c, ca, i, e in zip(r["strengths"], r["class_hook_success"], r["class_hook_success_audit"],
                              r["include_similarity"], r["exclude_similarity"]):
        print(f"{s:>8} {c:>16.2%} {ca:>8.1%} {i:>10.3f} {e:>10.3f}")
    a = r["attribution_label_agreement"]
    print(f"attribution label agreement: bottleneck top-1 {a['bottleneck']['top1']:.1%}, top-5 majority "
          f"{a['bottleneck']['top5_majority']:.1%}; pixel-NN baseline top-1 {a['pixel_nn_baseline']['top1']:.1%}, "
          f"top-5 majority {a['pixel_nn_baseline']['top5_majority']:.1%}")
