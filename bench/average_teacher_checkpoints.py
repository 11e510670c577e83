"""Average the weights (raw and EMA) of teacher checkpoints of one architecture into one checkpoint, to measure
whether a longer average than the training EMA samples better (evaluate the result with bench/eval_teacher.py).

    python bench/average_teacher_checkpoints.py A.pt B.pt C.pt --out runs/avg.pt

Floating-point tensors are averaged elementwise; integer ones (BatchNorm batch counts, the EMA's n_averaged) are
taken from the last checkpoint, as are its config and step. Optimizer and scheduler state are dropped: an average
is a point no optimizer visited, so the result can start a new leg (train_ddpm.py --init_from) but not --resume.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import load_teacher  # noqa: E402
from models.cli import ArgumentParser  # noqa: E402
from models.io import PipelineError, atomic_save, run_cli, sha256_file, software_versions  # noqa: E402

WEIGHT_SETS = ("model", "model_ema")


def total_steps(ckpt: dict):
    """Steps since initialisation, over every leg (None for a checkpoint that does not record them)."""
    if "step" not in ckpt:
        return None
    return int(ckpt["step"]) + int(ckpt.get("config", {}).get("steps_before", 0))


def average_checkpoints(checkpoints: list[dict], paths: list[str]) -> dict:
    last = checkpoints[-1]
    averaged = {k: v for k, v in last.items() if k not in ("optimizer", "scheduler") and not k.startswith("_")}
    for name in WEIGHT_SETS:
        if name not in last:
            continue
        reference = last[name]
        for ckpt, path in zip(checkpoints, paths):
            state = ckpt.get(name)
            if state is None or state.keys() != reference.keys() or any(
                    state[k].shape != reference[k].shape for k in reference):
                raise PipelineError(f"{path} and {paths[-1]} do not share an architecture ({name!r} differs)")
        averaged[name] = {k: (sum(c[name][k] for c in checkpoints) / len(checkpoints)
                              if v.is_floating_point() else v) for k, v in reference.items()}
    averaged["averaged_from"] = [{"path": p, "sha256": sha256_file(p), "steps": total_steps(c)}
                                 for c, p in zip(checkpoints, paths)]
    averaged["versions"] = software_versions()
    return averaged


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", help="teacher checkpoints (train_ddpm.py format), oldest first")
    p.add_argument("--out", required=True, help="where the averaged checkpoint goes (written atomically)")
    a = p.parse_args()
    if len(a.checkpoints) < 2:
        p.error("give at least two checkpoints to average")
    checkpoints = [load_teacher(path, "cpu").checkpoint for path in a.checkpoints]
    atomic_save(average_checkpoints(checkpoints, a.checkpoints), a.out)
    print(f"average_teacher_checkpoints: {len(a.checkpoints)} checkpoints averaged -> {a.out}")


if __name__ == "__main__":
    run_cli(main, resumable=False)
