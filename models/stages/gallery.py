"""The quickstart's visual check: the student's baseline output and every hook type on the same noise."""
from __future__ import annotations

import json
import time

import torch

from ..diffusion.noise import per_sample_noise
from ..io.device import pick_device
from ..io.errors import PipelineError
from ..io.files import atomic_write_json, prepare_output_dir
from ..io.images import save_image_grid
from ..io.paths import DEFAULT_CLASSIFIER
from ..nets.classifier import load_classifier
from ..nets.student import load_teacher_and_student
from ..steering.hooks import (BOTTLENECK, DEFAULT_HOOK_STYLE, HOOK_STYLES, SHIFT_REACH, at_layer,
                              channel_scale_hook, exclude_hook, include_hook, interpolate_hook, multi_include_hook,
                              nearest_hook, shift_hook, shift_nearest_hook)

PROBE_SAMPLES = 256  # generations weighted by the classifier to estimate a class mean without reference features
NEAREST_PROBES = 8  # the nearest style's stand-in class when the classifier calls no probe the target class


def hook_gallery(ddpm_ckpt: str, decoder_ckpt: str, n_samples: int, output_dir: str, seed: int = 0,
                 strength: float = 0.5, target_class: int = 3, cpu: bool = False,
                 classifier_path: str = DEFAULT_CLASSIFIER, dry_run: bool = False,
                 hook_style: str = DEFAULT_HOOK_STYLE, hook_layer: str = BOTTLENECK) -> dict:
    if hook_style not in HOOK_STYLES:
        raise PipelineError(f"--hook_style must be one of {', '.join(HOOK_STYLES)}, got {hook_style!r}")
    if n_samples < 3:
        raise PipelineError(f"--n_samples must be at least 3 (hooks use samples 0-2 as targets), got {n_samples}")
    device = pick_device(cpu)
    start = time.perf_counter()
    teacher, student = load_teacher_and_student(ddpm_ckpt, decoder_ckpt, device)
    if hook_layer not in student.decoder.hook_layers:
        raise PipelineError(f"--hook_layer must be one of {', '.join(student.decoder.hook_layers)} for this "
                            f"decoder, got {hook_layer!r}")
    classifier = load_classifier(classifier_path, device)
    print(f"teacher, student and classifier loaded to {device} in {time.perf_counter() - start:.2f}s")
    if dry_run:
        print(json.dumps({"teacher": teacher.path, "teacher_sha256": teacher.sha256, "student": student.path,
                          "bottleneck_shape": list(student.decoder.bottleneck_shape), "n_samples": n_samples,
                          "strength": strength, "target_class": target_class, "seed": seed, "hook_style": hook_style,
                          "hook_layer": hook_layer, "layer_shape": list(student.decoder.layer_shape(hook_layer)),
                          "output_dir": output_dir, "device": str(device)}, indent=2))
        return {}
    out = prepare_output_dir(output_dir)
    decoder = student.decoder
    z = per_sample_noise(seed, range(n_samples), device=device)
    with torch.inference_mode():
        baseline, h, _ = decoder.generate(z)
        probe = per_sample_noise(seed, range(n_samples, n_samples + PROBE_SAMPLES), device=device)
        probe_images, probe_h, _ = decoder.generate(probe)
        # Soft class mean: every probe weighted by p(target | image), defined even for a barely trained student.
        target_prob = classifier(probe_images.clamp(-1, 1)).softmax(1)[:, target_class]
        # the hooks' targets are the same samples' features at the hooked layer
        h, probe_h = decoder.layer_features(h, hook_layer), decoder.layer_features(probe_h, hook_layer)
        c = h.shape[1]
        hooks = {
            "include": include_hook(h[0], strength),
            "exclude": exclude_hook(h[0], strength),
            "interpolate": interpolate_hook(h[0], h[1], alpha=0.5, strength=max(strength, 0.8)),
            "multi_include": multi_include_hook(h[:3], [3.0, 2.0, 1.0], strength),
            "channel_scale": channel_scale_hook(slice(0, c // 2), 1.5),
            f"class_{target_class}": _class_hook(probe_h, target_prob, strength, hook_style),
        }
        outputs = {"baseline": baseline.clamp(-1, 1)}
        for name, hook in hooks.items():
            outputs[name] = decoder(z, hook=at_layer(hook_layer, hook)).float().clamp(-1, 1)
    effects = {}
    for name, images in outputs.items():
        save_image_grid(images, out / f"{name}.png")
        effects[name] = {"mean_abs_pixel_change": (images - outputs["baseline"]).abs().mean().item()}
    with torch.inference_mode():
        labels = {name: classifier(images).argmax(1) for name, images in outputs.items()}
    effects[f"class_{target_class}"]["share_classified_as_target"] = \
        (labels[f"class_{target_class}"] == target_class).float().mean().item()
    effects["baseline"]["share_classified_as_target"] = (labels["baseline"] == target_class).float().mean().item()
    rows = min(n_samples, 8)
    save_image_grid(torch.cat([images[:rows] for images in outputs.values()]), out / "hooks_overview.png", nrow=rows)
    atomic_write_json({"rows_of_hooks_overview": list(outputs), "strength": strength, "seed": seed,
                       "hook_style": hook_style, "hook_layer": hook_layer,
                       "targets": "include/exclude: sample 0; interpolate: samples 0->1; multi_include: samples 0-2 "
                                  f"weighted 3:2:1; class_{target_class}: mean bottleneck of {PROBE_SAMPLES} generations "
                                  "weighted by the classifier's probability of that class (style mean); the probes "
                                  "it most likely calls that class (nearest); that weighted mean minus the probes' "
                                  "mean, added (shift)",
                       "effects": effects}, out / "hook_effects.json")
    width = max(len(k) for k in effects)
    for name, e in effects.items():
        print(f"  {name:<{width}}  mean |pixel change| {e['mean_abs_pixel_change']:.3f}")
    print(f"test_direct_decoder: {len(outputs)} PNGs + hooks_overview.png in {out} "
          f"({time.perf_counter() - start:.1f}s)")
    return effects


def _class_hook(probe_h: torch.Tensor, target_prob: torch.Tensor, strength: float, style: str):
    """The class hook without reference features: the probes stand in for the class's training images."""
    if style == "mean":
        return multi_include_hook(probe_h, target_prob.tolist(), strength)
    weights = target_prob / target_prob.sum().clamp_min(1e-12)
    direction = torch.einsum("k,kchw->chw", weights, probe_h.float()) - probe_h.float().mean(0)
    if style == "shift":
        return shift_hook(SHIFT_REACH * direction, strength, "class")
    likely = target_prob >= 0.5
    members = probe_h[likely] if likely.sum() >= 1 else probe_h[target_prob.topk(NEAREST_PROBES).indices]
    if style == "shift_nearest":
        return shift_nearest_hook(members, direction, strength, name="class")
    return nearest_hook(members, strength, name="class")
