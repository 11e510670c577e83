"""How to spend the demo's few CPU minutes on the student: more pairs, more steps or smaller batches? Trains one
student per configuration (pairs, batch size, epochs) on the first N pairs of one seed-0 pair set (per-sample
seeding: the same pairs the demo would generate) and evaluates every one on the same held-out pairs (another seed):
pixel MSE to the teacher, class agreement, Frechet distance, each in the project classifier's feature space (the
one the perceptual term trains against) and in the audit classifier's (which no loss sees).

    python bench/bench_demo_student.py --configs 1000:64:25 2000:32:12 2000:16:12 3000:16:8 --cpu
    python bench/bench_demo_student.py --configs 2000:16:12:0 --cpu    # a 4th field overrides --perceptual_weight

Finished pair sets and students in --work are reused, so an interrupted run continues.
"""
import json
from dataclasses import asdict
from pathlib import Path

from models.evaluation.evaluate import evaluate_student_checkpoint
from models.io.checkpoints import load_checkpoint
from models.io.cli import ArgumentParser, add_cpu_flag
from models.io.errors import run_cli
from models.io.files import atomic_save
from models.io.paths import DEFAULT_TEACHER
from models.io.records import append_run_record
from models.stages.generate import GenerateOptions, generate_training_data
from models.training.student import StudentTrainOptions, train_student


def parse_config(text: str, perceptual_weight: float) -> dict:
    fields = text.split(":")
    if len(fields) not in (3, 4):
        raise SystemExit(f"--configs takes PAIRS:BATCH:EPOCHS[:PERCEPTUAL_WEIGHT], got {text!r}")
    n_pairs, batch, epochs = (int(v) for v in fields[:3])
    weight = float(fields[3]) if len(fields) == 4 else perceptual_weight
    return {"n_pairs": n_pairs, "batch_size": batch, "epochs": epochs, "perceptual_weight": weight}


def training_seconds(run: Path) -> float:
    """The training's own epoch times (stats.jsonl), so a rerun that reuses a finished student still reports them."""
    lines = (run / "stats.jsonl").read_text().splitlines()
    return sum(json.loads(line)["seconds"] for line in lines if line.strip())


def first_pairs(source: Path, n: int, dest: Path) -> Path:
    """The first n pairs of a pair set, as generate_training_data would have written them for n_samples=n."""
    if not dest.exists():
        data = load_checkpoint(source, "cpu", what="pair set")
        meta = dict(data["metadata"], identity=dict(data["metadata"]["identity"], n_samples=n))
        atomic_save(data | {"noise": data["noise"][:n].clone(), "images": data["images"][:n].clone(),
                            "n_samples": n, "metadata": meta}, dest)
    return dest


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default=DEFAULT_TEACHER, help="teacher checkpoint")
    p.add_argument("--configs", nargs="+", default=["1000:64:25", "2000:32:12", "2000:16:12", "3000:16:8"],
                   help="PAIRS:BATCH:EPOCHS[:PERCEPTUAL_WEIGHT] per student")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, every student")
    p.add_argument("--perceptual_weight", type=float, default=0.05, help="perceptual term, where a config does not set it")
    p.add_argument("--heldout", type=int, default=3000, help="held-out pairs (seed 99); evaluation uses their "
                   "validation split (10%%)")
    p.add_argument("--work", default="runs/bench_demo_student", help="pair sets and students")
    p.add_argument("--record", default="bench/results/demo_student.jsonl", help="appends one JSON line per student")
    add_cpu_flag(p)
    a = p.parse_args()
    configs = [parse_config(c, a.perceptual_weight) for c in a.configs]
    work = Path(a.work)
    n_max = max(c["n_pairs"] for c in configs)
    for seed, n, name in ((0, n_max, "pairs"), (99, a.heldout, "heldout")):
        generate_training_data(GenerateOptions(ckpt=a.ckpt, n_samples=n, batch_size=250, seed=seed,
                                               output_dir=str(work / name), cpu=a.cpu))
    heldout = work / "heldout" / "training_data.pt"
    rows = []
    for c in configs:
        tag = f"p{c['n_pairs']}_b{c['batch_size']}_e{c['epochs']}_lr{a.lr:g}_pw{c['perceptual_weight']:g}"
        data = first_pairs(work / "pairs" / "training_data.pt", c["n_pairs"], work / f"first_{c['n_pairs']}.pt")
        opts = StudentTrainOptions(ddpm_ckpt=a.ckpt, data_path=str(data), output_dir=str(work / tag),
                                   epochs=c["epochs"], batch_size=c["batch_size"], lr=a.lr,
                                   perceptual_weight=c["perceptual_weight"], cpu=a.cpu, evaluate=False)
        train_student(opts, resume=True)
        ev = evaluate_student_checkpoint(a.ckpt, str(work / tag / "best_model.pt"), str(heldout),
                                         work / tag / "heldout_evaluation.json", cpu=a.cpu)
        steps = json.loads((work / tag / "training_options.json").read_text())["total_steps"]
        audit = ev["audit"]
        row = {"config": c | {"lr": a.lr, "steps": steps},
               "n_heldout_val": ev["n_val"], "val_mse_to_teacher": ev["val_mse_to_teacher"],
               "class_agreement": ev["class_agreement_student_teacher"],
               "fd_student": ev["frechet_distance"]["student_vs_real"],
               "fd_teacher": ev["frechet_distance"]["teacher_vs_real"],
               "audit_class_agreement": audit["class_agreement_student_teacher"],
               "audit_fd_student": audit["frechet_distance"]["student_vs_real"],
               "audit_fd_teacher": audit["frechet_distance"]["teacher_vs_real"],
               "train_wall_s": training_seconds(work / tag), "options": asdict(opts)}
        rows.append(append_run_record(row, a.record))
    print(f"{'pairs':>6s} {'batch':>5s} {'epochs':>6s} {'pw':>5s} {'train s':>7s} {'MSE':>7s} {'agree':>6s} "
          f"{'FD':>7s} {'audit agree':>11s} {'audit FD':>8s}")
    for r in rows:
        c = r["config"]
        print(f"{c['n_pairs']:6d} {c['batch_size']:5d} {c['epochs']:6d} {c['perceptual_weight']:5g} "
              f"{r['train_wall_s']:7.0f} {r['val_mse_to_teacher']:7.4f} {r['class_agreement']:6.1%} "
              f"{r['fd_student']:7.1f} {r['audit_class_agreement']:11.1%} {r['audit_fd_student']:8.1f}"
              f"  (teacher FD {r['fd_teacher']:.1f}, audit {r['audit_fd_teacher']:.1f})")
    print(json.dumps({"students": len(rows), "record": a.record}))


if __name__ == "__main__":
    run_cli(main, resumable=False)
