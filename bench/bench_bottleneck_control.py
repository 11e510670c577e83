"""How much of a student's output its bottleneck decides: decode with the bottleneck of latent z2 and everything
else (skip connections) of z1, and count whose class the image takes (project classifier).

    python bench/bench_bottleneck_control.py --students keep/best_model.pt zero/best_model.pt --n 256

A student whose images follow z1 here cannot be steered by bottleneck hooks; with --skips zero the image is a
function of the bottleneck alone, so the swapped image is exactly the z2 image.
"""
import json

import torch

from models.diffusion.noise import per_sample_noise
from models.io.cli import ArgumentParser, add_cpu_flag
from models.io.device import pick_device
from models.io.errors import run_cli
from models.io.paths import DEFAULT_CLASSIFIER
from models.io.records import append_run_record
from models.nets.classifier import load_classifier
from models.nets.student import load_student


@torch.inference_mode()
def bottleneck_control(decoder, classifier, n: int, device) -> dict:
    z1, z2 = per_sample_noise(1, range(n), device=device), per_sample_noise(2, range(n), device=device)
    x1, h1, _ = decoder.generate(z1)
    x2, h2, _ = decoder.generate(z2)
    swapped = decoder(z1, hook=lambda h: h2)  # bottleneck of z2, skips (if any) of z1

    def label(x):
        return classifier(x.float().clamp(-1, 1)).argmax(1)
    c1, c2, cs = label(x1), label(x2), label(swapped)
    differ = c1 != c2
    return {"n_pairs": n, "n_pairs_with_different_classes": int(differ.sum()),
            "follows_bottleneck": (cs == c2)[differ].float().mean().item(),
            "follows_rest_of_latent": (cs == c1)[differ].float().mean().item(),
            "pixel_mse_swapped_vs_bottleneck_image": torch.mean((swapped - x2) ** 2).item()}


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--students", nargs="+", required=True, help="direct-decoder checkpoints")
    p.add_argument("--n", type=int, default=256, help="latent pairs")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="project classifier")
    p.add_argument("--record", default="bench/results/bottleneck_control.jsonl", help="append results here")
    add_cpu_flag(p)
    a = p.parse_args()
    device = pick_device(a.cpu)
    classifier = load_classifier(a.classifier, device)
    for path in a.students:
        student = load_student(path, device)
        result = {"student": path, "sha256": student.sha256, "skips": student.decoder.skips,
                  **bottleneck_control(student.decoder, classifier, a.n, device)}
        append_run_record(result, a.record)
        print(json.dumps({k: result[k] for k in ("student", "skips", "n_pairs_with_different_classes",
                                                  "follows_bottleneck", "follows_rest_of_latent")}))


if __name__ == "__main__":
    run_cli(main, resumable=False)
