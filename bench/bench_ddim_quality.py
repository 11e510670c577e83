"""Which DDIM K (and spacing) to use: Frechet distance in the project classifier's feature space against shuffled
real images, with k-NN precision/recall, for DDIM-K versus upstream's 1000-step ancestral DDPM. All at the same N
(the Frechet distance is biased upward at small N: compare within a table only).

    python bench/bench_ddim_quality.py --ckpt checkpoints/teacher_mnist5k.pt --n 300
"""
import json
import time
from pathlib import Path

from models.checkpoint import load_teacher
from models.classifier import load_classifier
from models.evaluate import evaluation_source, sample_teacher_images, shuffled_real_images
from models.io import DEFAULT_CLASSIFIER, append_run_record, machine_description, pick_device, run_cli
from models.metrics import image_quality_report
from models.cli import ArgumentParser, add_cpu_flag


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="teacher checkpoint")
    p.add_argument("--n", type=int, default=300, help="samples per configuration")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 25, 50, 100, 250], help="DDIM step counts")
    p.add_argument("--spacings", nargs="+", default=["leading", "trailing"], help="DDIM spacings")
    p.add_argument("--no_ddpm", action="store_true", help="skip the 1000-step DDPM reference")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="project classifier")
    p.add_argument("--out", default="bench/results/ddim_quality.jsonl", help="appends one JSON line per config")
    add_cpu_flag(p)
    a = p.parse_args()
    device = pick_device(a.cpu)
    teacher = load_teacher(a.ckpt, device)
    classifier = load_classifier(a.classifier, device)
    real = shuffled_real_images(evaluation_source(teacher.checkpoint.get("data_source")), 2 * a.n, seed=1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    configs = [("ddim", k, s) for s in a.spacings for k in a.ks] + ([] if a.no_ddpm else [("ddpm", 1000, "all")])
    rows = [("real (other half)", image_quality_report(real[a.n:], classifier, real[:a.n]), 0.0)]
    for sampler, k, spacing in configs:
        start = time.perf_counter()
        images = sample_teacher_images(teacher.diffusion, a.n, sampler, k, spacing if sampler == "ddim" else "leading",
                                       device=device, desc=f"{sampler}-{k} {spacing}")
        seconds = time.perf_counter() - start
        q = image_quality_report(images, classifier, real[:a.n])
        rows.append((f"{sampler} K={k} {spacing}", q, seconds))
        append_run_record({"config": rows[-1][0], "n": a.n, "checkpoint": a.ckpt, "sha256": teacher.sha256,
                           "seconds": seconds, **q}, a.out)
    print(f"| sampler | FD | precision | recall | mean conf. | seconds ({a.n} samples) |")
    print("|---|---|---|---|---|---|")
    for name, q, seconds in rows:
        print(f"| {name} | {q['frechet_distance']:.2f} | {q['precision']:.3f} | {q['recall']:.3f} | "
              f"{q['mean_confidence']:.3f} | {seconds:.1f} |")
    print(json.dumps({"machine": machine_description(), "teacher": a.ckpt}))


if __name__ == "__main__":
    run_cli(main, resumable=False)
