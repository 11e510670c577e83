"""Teacher quality: N DDIM samples (default K and spacing) classified by the project classifier, Frechet distance
and k-NN precision/recall in its feature space against shuffled real images, and a sample grid.

    python bench/eval_teacher.py --ckpt checkpoints/teacher_mnist5k.pt --n 1000 --out checkpoints/teacher_mnist5k_eval.json
"""
import time
from pathlib import Path

from models.diffusion.sampling import DEFAULT_DDIM_STEPS, DEFAULT_SPACING
from models.evaluation.evaluate import evaluation_source, sample_teacher_images, shuffled_real_images
from models.evaluation.metrics import image_quality_report
from models.io.cli import ArgumentParser, add_cpu_flag
from models.io.device import pick_device
from models.io.errors import run_cli
from models.io.files import atomic_write_json
from models.io.images import save_image_grid
from models.io.paths import AUDIT_CLASSIFIER, DEFAULT_CLASSIFIER
from models.io.records import run_context
from models.io.teacher_checkpoints import load_teacher
from models.nets.classifier import load_classifier


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="teacher checkpoint")
    p.add_argument("--n", type=int, default=1000, help="samples")
    p.add_argument("--steps", type=int, default=DEFAULT_DDIM_STEPS, help="DDIM steps")
    p.add_argument("--spacing", default=DEFAULT_SPACING, help="DDIM spacing")
    p.add_argument("--seed", type=int, default=0, help="noise seed (per-sample noise; another seed is another draw)")
    p.add_argument("--no_clip", action="store_true", help="do not clip the predicted x0 to [-1, 1] at each step")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="project classifier")
    p.add_argument("--audit_classifier", default=AUDIT_CLASSIFIER, help="second classifier, reported as 'audit'")
    p.add_argument("--out", required=True, help="JSON report; the grid goes beside it as .png")
    add_cpu_flag(p)
    a = p.parse_args()
    device = pick_device(a.cpu)
    teacher = load_teacher(a.ckpt, device)
    start = time.perf_counter()
    images = sample_teacher_images(teacher.diffusion, a.n, "ddim", a.steps, a.spacing, seed=a.seed,
                                   device=device, clip_x0=not a.no_clip)
    sample_s = time.perf_counter() - start
    classifier = load_classifier(a.classifier, device)
    source = evaluation_source(teacher.checkpoint.get("data_source"))
    real = shuffled_real_images(source, 2 * a.n, seed=1)
    report = image_quality_report(images, classifier, real[:a.n])
    reference = image_quality_report(real[a.n:], classifier, real[:a.n])
    audit = load_classifier(a.audit_classifier, device)
    audit_report = {"teacher": image_quality_report(images, audit, real[:a.n]),
                    "real_vs_real_same_n": image_quality_report(real[a.n:], audit, real[:a.n]),
                    "classifier": a.audit_classifier}
    sampler = f"ddim K={a.steps} ({a.spacing}), eta 0" + (", x0 not clipped" if a.no_clip else "")
    result = {"checkpoint": a.ckpt, "sha256": teacher.sha256, "sampler": sampler,
              "seed": a.seed, "n": a.n, "teacher": report, "real_vs_real_same_n": reference, "audit": audit_report,
              "sampling_s": round(sample_s, 1), **run_context()}
    atomic_write_json(result, a.out)
    save_image_grid(images[:100], Path(a.out).with_suffix(".png"), nrow=10)
    shares = report["class_shares"]
    print(f"eval_teacher: mean confidence {report['mean_confidence']:.3f}, class shares {min(shares):.1%}.."
          f"{max(shares):.1%}, FD {report['frechet_distance']:.2f} (real vs real {reference['frechet_distance']:.2f}), "
          f"precision {report['precision']:.3f} recall {report['recall']:.3f}; audit classifier: confidence "
          f"{audit_report['teacher']['mean_confidence']:.3f}, FD {audit_report['teacher']['frechet_distance']:.2f} "
          f"(real {audit_report['real_vs_real_same_n']['frechet_distance']:.2f}) -> {a.out}")


if __name__ == "__main__":
    run_cli(main, resumable=False)
