"""Students against their teacher on the same held-out noises, judged in the audit classifier's space (no loss has
seen it): Fréchet distance ratio, k-NN precision / recall beside the teacher's, class agreement, and the one-step
speed-up over the teacher's default sampler.

Every student is evaluated on the same pairs file, so the rows of one run compare directly: give it pairs of a noise
seed none of them trained on (generate_training_data.py --seed S) and all of its pairs are held out; a student's own
pairs file gives its validation split; a file that shares noises with a student's training pairs is refused.

    python generate_training_data.py --ckpt checkpoints/teacher_mnist5k.pt --n_samples 1200 --steps 25 \
        --spacing leading --seed 99 --output_dir HELDOUT --cpu
    python bench/bench_student_quality.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \
        --data_path HELDOUT/training_data.pt --students checkpoints/student_mnist5k.pt OUT/best_model.pt --cpu
"""
import tempfile
from pathlib import Path

from models.diffusion.sampling import DEFAULT_DDIM_STEPS
from models.evaluation.evaluate import evaluate_student_checkpoint
from models.io.cli import ArgumentParser, add_cpu_flag
from models.io.errors import run_cli
from models.io.paths import DEFAULT_CLASSIFIER
from models.io.records import append_run_record


def summary_row(report: dict) -> dict:
    audit = report["audit"]
    q = audit["quality"]
    confident = audit["class_agreement_where_teacher_confident"]
    speed = report["speed"]
    default_rate = speed["teacher_unet_evals_per_s"] / DEFAULT_DDIM_STEPS
    return {"n": report["n_val"],
            "audit_fd_student": audit["frechet_distance"]["student_vs_real"],
            "audit_fd_teacher": audit["frechet_distance"]["teacher_vs_real"],
            "audit_fd_real_floor": audit["frechet_distance"]["real_half_vs_real_half"],
            "audit_fd_ratio": audit["fd_ratio_student_over_teacher"],
            "audit_precision_student": q["student"]["precision"], "audit_recall_student": q["student"]["recall"],
            "audit_precision_teacher": q["teacher"]["precision"], "audit_recall_teacher": q["teacher"]["recall"],
            "audit_class_agreement": audit["class_agreement_student_teacher"],
            # where the audit classifier is sure of the teacher's digit (>= 0.9): agreement without its scribbles
            "audit_class_agreement_where_teacher_confident": confident["agreement"],
            "audit_share_teacher_confident": confident["share_of_pairs"],
            "project_class_agreement": report["class_agreement_student_teacher"],
            "project_fd_ratio": report["fd_ratio_student_over_teacher"],
            "val_mse_to_teacher": report["val_mse_to_teacher"],
            f"speedup_vs_default_ddim{DEFAULT_DDIM_STEPS}": speed["student_images_per_s"] / default_rate}


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ddpm_ckpt", required=True, help="teacher checkpoint (the students' teacher)")
    p.add_argument("--data_path", required=True,
                   help="training_data.pt holding the held-out noises and the teacher's images of them: pairs of a "
                        "noise seed no student here trained on (all held out), or a student's own (its validation "
                        "split)")
    p.add_argument("--students", nargs="+", required=True, help="student checkpoints to compare")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="project classifier (reported beside the audit)")
    p.add_argument("--record", default="bench/results/student_quality.jsonl", help="append one row per student here")
    add_cpu_flag(p)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i, student in enumerate(a.students):
            report = evaluate_student_checkpoint(a.ddpm_ckpt, student, a.data_path, Path(tmp) / f"{i}.json",
                                                 cpu=a.cpu, classifier_path=a.classifier)
            row = summary_row(report)
            append_run_record({"student": student, "student_sha256": report["student"]["sha256"],
                               "teacher_sha256": report["teacher"]["sha256"], "data": report["training_data"], **row},
                              a.record)
            sure = row["audit_class_agreement_where_teacher_confident"]
            print(f"{student}: audit FD {row['audit_fd_student']:.1f} vs teacher {row['audit_fd_teacher']:.1f} "
                  f"(ratio {row['audit_fd_ratio']:.2f}), recall {row['audit_recall_student']:.3f} vs "
                  f"{row['audit_recall_teacher']:.3f}, agreement {row['audit_class_agreement']:.1%}"
                  f"{'' if sure is None else f' ({sure:.1%} where the teacher image is confident)'} "
                  f"(N={row['n']}) -> {a.record}")


if __name__ == "__main__":
    run_cli(main, resumable=False)
