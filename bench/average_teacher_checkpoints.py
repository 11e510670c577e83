"""Average the weights (raw and EMA) of teacher checkpoints of one architecture into one checkpoint, to measure
whether a longer average than the training EMA samples better (evaluate the result with bench/eval_teacher.py).

    python bench/average_teacher_checkpoints.py A.pt B.pt C.pt --out runs/avg.pt

Floating-point tensors are averaged elementwise; integer ones (BatchNorm batch counts, the EMA's n_averaged) are
taken from the last checkpoint, as are its config and step. Optimizer and scheduler state are dropped: an average
is a point no optimizer visited, so the result can start a new leg (train_ddpm.py --init_from) but not --resume.
"""
from models.io.checkpoints import without_resume_state
from models.io.cli import ArgumentParser
from models.io.errors import PipelineError, run_cli
from models.io.files import atomic_save
from models.io.records import software_versions
from models.io.teacher_checkpoints import LoadedTeacher, load_teacher, total_steps


WEIGHT_SETS = ("model", "model_ema")


def average_checkpoints(teachers: list[LoadedTeacher]) -> dict:
    last = teachers[-1]
    for teacher in teachers:
        if teacher.config != last.config:
            raise PipelineError(f"{teacher.path} and {last.path} do not share an architecture "
                                f"({teacher.config.to_dict()} vs {last.config.to_dict()})")
    checkpoints = [t.checkpoint for t in teachers]
    averaged = {k: v for k, v in without_resume_state(last.checkpoint).items() if not k.startswith("_")}
    for name in WEIGHT_SETS:
        if name not in last.checkpoint:
            continue
        missing = [t.path for t in teachers if name not in t.checkpoint]
        if missing:
            raise PipelineError(f"{missing[0]} has no {name!r} weights to average with {last.path}'s")
        averaged[name] = {k: (sum(c[name][k] for c in checkpoints) / len(checkpoints) if v.is_floating_point() else v)
                          for k, v in last.checkpoint[name].items()}
    averaged["averaged_from"] = [{"path": t.path, "sha256": t.sha256,
                                  "steps": total_steps(t.checkpoint) if "step" in t.checkpoint else None}
                                 for t in teachers]
    averaged["versions"] = software_versions()
    return averaged


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", help="teacher checkpoints (train_ddpm.py format), oldest first")
    p.add_argument("--out", required=True, help="where the averaged checkpoint goes (written atomically)")
    a = p.parse_args()
    if len(a.checkpoints) < 2:
        p.error("give at least two checkpoints to average")
    atomic_save(average_checkpoints([load_teacher(path, "cpu") for path in a.checkpoints]), a.out)
    print(f"average_teacher_checkpoints: {len(a.checkpoints)} checkpoints averaged -> {a.out}")


if __name__ == "__main__":
    run_cli(main, resumable=False)
