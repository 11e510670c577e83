"""Writes the shipped teacher's record CKPT.json (sha256, size, config, exact command, steps, wall time, machine,
quality) through models.io.manifest (the one manifest writer) from its checkpoint, the run's training_options.json /
stats.jsonl, and bench/eval_teacher.py's report.
With --refresh_eval it only replaces the evaluation of an existing manifest (e.g. after the default sampler changed).

    python bench/teacher_manifest.py --ckpt checkpoints/teacher_mnist5k.pt --run_dir runs/teacher_mnist5k \
        --command "$(cat runs/teacher_cmd.sh)" --wall_s 4700 --eval checkpoints/teacher_mnist5k_eval.json
    python bench/teacher_manifest.py --ckpt checkpoints/teacher_mnist5k.pt --refresh_eval \
        --eval checkpoints/teacher_mnist5k_eval.json
"""
import json
from pathlib import Path

from models.io.checkpoints import load_checkpoint
from models.io.cli import ArgumentParser
from models.io.errors import run_cli
from models.io.files import require_file, sha256_file
from models.io.manifest import write_checkpoint_record
from models.io.records import machine_description
from models.io.teacher_checkpoints import total_steps


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="shipped teacher checkpoint")
    p.add_argument("--run_dir", help="the train_ddpm.py output directory it came from")
    p.add_argument("--command", help="the exact training command")
    p.add_argument("--wall_s", type=float, help="training wall time in seconds")
    p.add_argument("--eval", required=True, help="bench/eval_teacher.py JSON report")
    p.add_argument("--status", default="", help="how far training got and what is next")
    p.add_argument("--out", default=None, help="manifest path (default: CKPT with .json)")
    p.add_argument("--refresh_eval", action="store_true",
                   help="keep the existing manifest and replace only its evaluation and sample grid (and "
                        "its status, if --status is given)")
    a = p.parse_args()
    out = a.out or Path(a.ckpt).with_suffix(".json")
    require_file(a.ckpt, "teacher checkpoint", suffix=".pt")
    evaluation = json.loads(require_file(a.eval, "evaluation report", "run bench/eval_teacher.py first").read_text())
    if a.refresh_eval:
        manifest = json.loads(Path(out).read_text())
        if not manifest["sha256"] == evaluation["sha256"] == sha256_file(a.ckpt):
            p.error(f"{a.eval} evaluates another file than {a.ckpt} and its manifest {out}")
        status = {"status": a.status} if a.status else {}
        write_checkpoint_record(a.ckpt, manifest | _evaluation_entries(evaluation, a.eval) | status, out)
        print(f"teacher_manifest: evaluation in {out} refreshed from {a.eval}")
        return
    if not (a.run_dir and a.command and a.wall_s is not None):
        p.error("--run_dir, --command and --wall_s are required unless --refresh_eval")
    ckpt = load_checkpoint(a.ckpt, "cpu")
    run = Path(a.run_dir)
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines() if line.strip()]
    manifest = {"kind": ckpt.get("kind"), "model_args": ckpt.get("model_args"),
                "steps": total_steps(ckpt),
                "steps_this_schedule": int(ckpt["step"]), "total_steps_planned": ckpt["config"]["total_steps"],
                "final_loss": stats[-1]["loss"], "data_source": ckpt.get("data_source"),
                "config": ckpt["config"], "command": a.command, "wall_s": a.wall_s,
                "machine": machine_description(threads=ckpt["config"]["options"].get("threads")),
                "versions": ckpt.get("versions"), "status": a.status, **_evaluation_entries(evaluation, a.eval)}
    write_checkpoint_record(a.ckpt, manifest, out)
    print(f"teacher_manifest: {out}")


def _evaluation_entries(evaluation: dict, eval_path: str) -> dict:
    keys = ("sampler", "n", "teacher", "real_vs_real_same_n", "audit", "command")
    return {"evaluation": {k: evaluation[k] for k in keys if k in evaluation},
            "sample_grid": str(Path(eval_path).with_suffix(".png"))}


if __name__ == "__main__":
    run_cli(main, resumable=False)
