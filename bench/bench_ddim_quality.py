"""Which teacher sampler and K to use: Frechet distance in a classifier's feature space against shuffled real images,
with k-NN precision/recall, mean confidence and class shares, seconds per image, and (same noises) class agreement
and RMS pixel difference with the first configuration. All at the same N and the same per-sample noises (the
Frechet distance is biased upward at small N: compare within a table only).

    python bench/bench_ddim_quality.py --ckpt checkpoints/teacher_mnist5k.pt --n 300
    python bench/bench_ddim_quality.py --ckpt checkpoints/teacher_mnist5k.pt --n 1000 \\
        --classifier checkpoints/classifier_mnist5k_audit.pt --configs ddim:50:trailing dpmpp2m:10 ddim:25:leading
"""
import json
import time
from pathlib import Path

from models.diffusion.sampling import SamplerConfig
from models.evaluation.evaluate import (agreement_where_confident, evaluation_source, is_confident,
                                       sample_teacher_images, shuffled_real_images)
from models.evaluation.metrics import classifier_outputs, image_quality_report
from models.io.cli import ArgumentParser, add_cpu_flag
from models.io.device import pick_device
from models.io.errors import PipelineError, run_cli
from models.io.paths import DEFAULT_CLASSIFIER
from models.io.records import append_run_record, run_context
from models.io.teacher_checkpoints import load_teacher
from models.nets.classifier import load_classifier


def parse_config(text: str) -> SamplerConfig:
    """NAME:K[:SPACING] -> SamplerConfig (eta 0, x0 clipped, as the pairs use)."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 3 or not parts[1].isdigit():
        raise PipelineError(f"--configs entries are NAME:K[:SPACING] (e.g. dpmpp2m:10, ddim:50:trailing), got {text!r}")
    try:
        return SamplerConfig(name=parts[0], steps=int(parts[1]), spacing=parts[2] if len(parts) == 3 else None)
    except ValueError as err:
        raise PipelineError(f"--configs {text!r}: {err}") from None


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="teacher checkpoint")
    p.add_argument("--n", type=int, default=300, help="samples per configuration")
    p.add_argument("--configs", nargs="+", default=None,
                   help="sampler configurations NAME:K[:SPACING], e.g. ddim:50:trailing dpmpp2m:10 ddpm:1000, run in "
                        "this order (default: DDIM at every --ks and --spacings, then DDPM-1000 unless --no_ddpm)")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 25, 50, 100, 250], help="DDIM step counts")
    p.add_argument("--spacings", nargs="+", default=["leading", "trailing"], help="DDIM spacings")
    p.add_argument("--no_ddpm", action="store_true", help="skip the 1000-step DDPM reference")
    p.add_argument("--seed", type=int, default=0, help="noise of sample i depends only on (seed, i)")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                   help="classifier whose feature space scores the images (checkpoints/classifier_mnist5k_audit.pt "
                        "is the one no training loss uses)")
    p.add_argument("--out", default="bench/results/ddim_quality.jsonl", help="appends one JSON line per config")
    add_cpu_flag(p)
    a = p.parse_args()
    configs = [parse_config(c) for c in a.configs] if a.configs else \
        [SamplerConfig("ddim", k, s) for s in a.spacings for k in a.ks] + \
        ([] if a.no_ddpm else [SamplerConfig("ddpm", 1000)])
    device = pick_device(a.cpu)
    teacher = load_teacher(a.ckpt, device)
    classifier = load_classifier(a.classifier, device)
    real = shuffled_real_images(evaluation_source(teacher.checkpoint.get("data_source")), 2 * a.n, seed=1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    common = {"n": a.n, "seed": a.seed, "checkpoint": a.ckpt, "sha256": teacher.sha256, "classifier": a.classifier}
    rows = [("real (other half)", image_quality_report(real[a.n:], classifier, real[:a.n]), 0.0, {})]
    append_run_record({"config": rows[0][0], **common, "seconds": 0.0, **rows[0][1]}, a.out)
    reference = None
    for cfg in configs:
        start = time.perf_counter()
        images = sample_teacher_images(teacher.diffusion, a.n, cfg.name, cfg.steps, cfg.spacing, seed=a.seed,
                                       device=device, desc=cfg.describe(), clip_x0=cfg.clip_x0)
        seconds = time.perf_counter() - start
        q = image_quality_report(images, classifier, real[:a.n])
        logits = classifier_outputs(classifier, images)[1]
        labels = logits.argmax(1)
        if reference is None:
            reference = (cfg.describe(), images, labels, is_confident(logits))
        agree = labels == reference[2]
        where_sure = agreement_where_confident(agree, reference[3])
        same_noise = {"reference": reference[0], "class_agreement": agree.double().mean().item(),
                      "class_agreement_where_reference_confident": where_sure["agreement"],
                      "reference_confident_share": where_sure["share_of_pairs"],
                      "rms_pixel_difference": (images - reference[1]).square().mean().sqrt().item()}
        rows.append((cfg.describe(), q, seconds, same_noise))
        append_run_record({"config": cfg.describe(), "sampler_config": cfg.to_dict(), **common, "seconds": seconds,
                      "seconds_per_image": seconds / a.n, **q, "same_noise_as_reference": same_noise}, a.out)
    print(f"| sampler | FD | precision | recall | mean conf. | s/image | agreement (where {reference[0]} is "
          f"confident), RMS vs it |")
    print("|---|---|---|---|---|---|---|")
    for name, q, seconds, same in rows:
        sure = same.get("class_agreement_where_reference_confident")
        vs = f"{same['class_agreement']:.3f} ({'-' if sure is None else f'{sure:.3f}'}), " \
             f"{same['rms_pixel_difference']:.3f}" if same else ""
        print(f"| {name} | {q['frechet_distance']:.2f} | {q['precision']:.3f} | {q['recall']:.3f} | "
              f"{q['mean_confidence']:.3f} | {seconds / a.n:.3f} | {vs} |")
    print(json.dumps({"machine": run_context()["machine"], "teacher": a.ckpt, "classifier": a.classifier, "out": a.out}))


if __name__ == "__main__":
    run_cli(main, resumable=False)
