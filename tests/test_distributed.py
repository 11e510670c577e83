"""torchrun on the CPU: gloo, 2 processes on 127.0.0.1, tiny configs; README's torchrun commands run as written
with `--nproc_per_node` lowered, `HOST` set to 127.0.0.1 and tiny-size flags appended (the last value wins).

Pairs: bitwise the single process's file (the tiny_pairs fixture), also after a rank is SIGKILLed and the command
rerun, also from two launchers ("nodes") joined by c10d rendezvous. Training: the 2-rank run is compared with one
process whose BatchNorm sees the same per-rank halves of every step (weights bitwise equal: every other difference
between the two is a power-of-two scaling, exact in floating point), and with the plain single-process fixture run
(losses within 1%: the gap is only BatchNorm normalising 4 pairs per rank instead of the step's 8, measured at 0.4%).
train_ddpm.py likewise; the adversarial term within 1% of the same reference.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_PAIRS_ARGS, TINY_STUDENT_ARGS
from helpers import assert_identical, free_port, load_pt, subprocess_env

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SHARDS = ["--shard_size", "8"]  # 5 shards of the 40 tiny pairs: rank 0 makes 0, 2, 4 and rank 1 makes 1, 3


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## More than one GPU or machine.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split() for line in block.splitlines() if line.startswith("torchrun ")]


def readme_command(script: str, nodes: bool = False, nproc: int = 2, port: int = 0) -> list[str]:
    """README's command for ``script`` (the several-machine one if ``nodes``), ready to run here."""
    [words] = [w for w in readme_commands() if script in w and ("--nnodes" in w) == nodes]
    words = [str(nproc) if prev == "--nproc_per_node" else w for prev, w in zip([""] + words, words)]
    words = [w.replace("HOST:29500", f"127.0.0.1:{port}") for w in words]
    return TORCHRUN + words[1:]


def run(cmd, cwd=REPO, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_same_pairs(path: Path, reference: Path) -> None:
    ours, theirs = load_pt(path), load_pt(reference)
    for key in ("noise", "images"):
        assert_identical(ours[key], theirs[key], key)
    assert ours["metadata"]["identity"] == theirs["metadata"]["identity"]
    assert ours["metadata"]["world_size"] == 2


def gen_args(teacher, out) -> list:
    return ["--ckpt", teacher, *TINY_PAIRS_ARGS, *SHARDS, "--output_dir", out]


# ---------------------------------------------------------------- pairs

def _worker_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the launcher whose environment says RANK=rank)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(child)
        assert launcher.poll() is None, "torchrun exited before its workers started"
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} worker within {timeout} s")


def test_a_killed_rank_stops_the_job_and_the_rerun_gives_one_process_file(tiny_teacher_ckpt, tiny_pairs, tmp_path):
    """README's one-machine command: SIGKILL rank 1 once its first shard is written, rerun: bitwise the file of one
    process (the tiny_pairs fixture), from the shards kept."""
    cmd = readme_command("generate_training_data.py") + gen_args(tiny_teacher_ckpt, tmp_path)
    log = tmp_path.parent / f"{tmp_path.name}.log"
    with open(log, "w") as sink:
        launcher = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=subprocess_env(), stdout=sink,
                                    stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))  # the watcher first
    try:
        rank0, rank1 = _worker_pid(launcher, 0), _worker_pid(launcher, 1)
        first_of_rank1 = tmp_path / "shards" / "shard_000000008_000000016.pt"
        deadline = time.monotonic() + 120
        while not first_of_rank1.exists():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        assert (tmp_path / ".lock").read_text().split() == [str(rank0)]  # rank 0 alone holds the output's lock
        os.kill(rank1, signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not (tmp_path / "training_data.pt").exists()
    assert "rank      : 1" in log.read_text()  # torchrun's summary names the rank that died

    rerun = run(cmd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done_before = int(re.search(r"(\d+) pairs already done", rerun.stdout).group(1))
    assert done_before >= 8  # at least rank 1's first shard was kept
    assert_same_pairs(tmp_path / "training_data.pt", tiny_pairs)
    assert "2 ranks)" in rerun.stdout and rerun.stdout.count("generate_training_data:") == 1  # rank 0 alone speaks
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "training_data.pt"]  # shards cleaned up


def test_two_nodes_finish_a_tiny_generate(tiny_teacher_ckpt, tiny_pairs, tmp_path):
    """README's several-machine command, one process per "node", both on 127.0.0.1."""
    cmd = readme_command("generate_training_data.py", nodes=True, nproc=1, port=free_port())
    cmd = [w.replace("pairs60k", f"tiny{os.getpid()}") if prev == "--rdzv_id" else w
           for prev, w in zip([""] + cmd, cmd)] + gen_args(tiny_teacher_ckpt, tmp_path)
    nodes = [subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum(out.count("generate_training_data:") for out, _ in outputs) == 1
    assert_same_pairs(tmp_path / "training_data.pt", tiny_pairs)


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def ddp_student(tiny_teacher_ckpt, tiny_pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_student")
    cmd = readme_command("train_direct_decoder.py") + ["--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs,
                                                       *TINY_STUDENT_ARGS, "--output_dir", out]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train_direct_decoder:") == 1 and "2 ranks, 8 pairs per step" in proc.stdout
    return out


def _stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def test_ddp_weights_are_one_process_with_batchnorm_over_the_same_halves(ddp_student, tiny_teacher_ckpt, tiny_pairs,
                                                                         tmp_path, monkeypatch):
    from models.nets.student import DirectDecoder
    from models.training.student import StudentTrainOptions, train_student
    forward = DirectDecoder.forward

    def by_halves(self, z, hook=None):  # rank r's rows of the step, as models.io.distributed.Ranks.split gives them
        if self.training and torch.is_grad_enabled() and z.shape[0] > 1:
            half = (z.shape[0] + 1) // 2
            return torch.cat([forward(self, z[:half], hook), forward(self, z[half:], hook)])
        return forward(self, z, hook)

    monkeypatch.setattr(DirectDecoder, "forward", by_halves)
    train_student(StudentTrainOptions(ddpm_ckpt=str(tiny_teacher_ckpt), data_path=str(tiny_pairs), epochs=2,
                                      batch_size=8, lr=1e-3, cpu=True, evaluate=False, output_dir=str(tmp_path)))
    ours, theirs = load_pt(ddp_student / "ckpt_epoch_002.pt"), load_pt(tmp_path / "ckpt_epoch_002.pt")
    weights = [k for k in ours["model"] if "running_" not in k and "num_batches" not in k]
    assert_identical({k: ours["model"][k] for k in weights}, {k: theirs["model"][k] for k in weights}, "model")
    assert ours["val_loss"] == theirs["val_loss"]  # the EMA's, after recalibrating BatchNorm on the same pairs
    for a, b in zip(_stats(ddp_student), _stats(tmp_path)):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)  # summed in float64 across ranks


def test_ddp_adversarial_training_tracks_one_process_with_batchnorm_over_the_same_halves(
        tiny_teacher_ckpt, tiny_pairs, mnist5k, tmp_path, monkeypatch):
    """The discriminator under torchrun: rank 0's initial weights everywhere, the global batch's real-image and shift
    draws, gradients all-reduced. Not bitwise (its convolutions run on half batches, so its scores differ from one
    process's in the last bits, and Adam's first steps amplify that): within 1%, measured up to 0.12%; a run whose
    ranks started from their own discriminators was 2.7% off."""
    import models.data.datasets
    from helpers import use_cached_mnist5k
    from models.nets.student import DirectDecoder
    from models.training.student import StudentTrainOptions, train_student
    args = ["--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--epochs", "1", "--batch_size", "8",
            "--lr", "1e-3", "--cpu", "--no_evaluate", "--adv_weight", "0.5"]
    proc = run(readme_command("train_direct_decoder.py") + args + ["--output_dir", tmp_path / "ddp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    forward = DirectDecoder.forward

    def by_halves(self, z, hook=None):
        if self.training and torch.is_grad_enabled() and z.shape[0] > 1:
            half = (z.shape[0] + 1) // 2
            return torch.cat([forward(self, z[:half], hook), forward(self, z[half:], hook)])
        return forward(self, z, hook)

    monkeypatch.setattr(DirectDecoder, "forward", by_halves)
    use_cached_mnist5k(monkeypatch, models.data.datasets, mnist5k)
    train_student(StudentTrainOptions(ddpm_ckpt=str(tiny_teacher_ckpt), data_path=str(tiny_pairs), epochs=1,
                                      batch_size=8, lr=1e-3, cpu=True, evaluate=False, adv_weight=0.5,
                                      output_dir=str(tmp_path / "one")))
    [ours], [theirs] = _stats(tmp_path / "ddp"), _stats(tmp_path / "one")
    for key in ("train_loss", "train_pixel", "train_disc", "val_loss"):
        assert ours[key] == pytest.approx(theirs[key], rel=0.01), key


def test_ddp_losses_track_the_single_process_run(ddp_student, tiny_student):
    ours, single = _stats(ddp_student), _stats(tiny_student.parent)
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in single] == [1, 2]
    for a, b in zip(ours, single):
        assert a["lr"] == b["lr"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.01)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=0.01)


def test_torchrun_resume_is_bit_exact(ddp_student, tiny_teacher_ckpt, tiny_pairs, tmp_path):
    for name in ("ckpt_epoch_001.pt", "stats.jsonl"):
        (tmp_path / name).write_bytes((ddp_student / name).read_bytes())
    cmd = readme_command("train_direct_decoder.py") + ["--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs,
                                                       *TINY_STUDENT_ARGS, "--output_dir", tmp_path, "--resume"]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "epoch 1/2" in proc.stdout
    resumed, straight = load_pt(tmp_path / "ckpt_epoch_002.pt"), load_pt(ddp_student / "ckpt_epoch_002.pt")
    for key in ("model", "model_ema", "optimizer", "scheduler", "val_loss", "best_score"):
        assert_identical(resumed[key], straight[key], key)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in _stats(tmp_path)] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in _stats(ddp_student)]


def test_a_nan_loss_on_the_ranks_stops_the_job_in_one_line_without_a_checkpoint(tiny_teacher_ckpt, tiny_pairs,
                                                                                 tmp_path):
    data = load_pt(tiny_pairs)
    data["images"][:] = 3e38  # finite (the pairs load), but the squared error overflows: the loss is Inf
    torch.save(data, tmp_path / "training_data.pt")
    out = tmp_path / "out"
    proc = run(readme_command("train_direct_decoder.py") + ["--ddpm_ckpt", tiny_teacher_ckpt, "--data_path",
                                                            tmp_path / "training_data.pt", *TINY_STUDENT_ARGS,
                                                            "--output_dir", out])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0 of 2: loss became non-finite"), proc.stderr[-3000:]
    assert not list(out.glob("*.pt"))


def test_ddp_teacher_is_one_process_with_batchnorm_over_the_same_halves(train_cli, mnist5k, tmp_path, monkeypatch,
                                                                        capsys):
    """train_ddpm.py under torchrun: each rank takes its rows of the batch, timesteps and noise one process draws."""
    import models.training.teacher
    from helpers import run_main_in_process, use_cached_mnist5k
    from models.nets.teacher import MNISTDiffusion
    proc = run(TORCHRUN + ["--standalone", "--nproc_per_node", "2", "train_ddpm.py", *train_cli.teacher_args,
                           "--output_dir", tmp_path / "ddp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train_ddpm:") == 1
    forward = MNISTDiffusion.forward

    def by_halves(self, x_0, noise, t):
        if self.training and torch.is_grad_enabled() and x_0.shape[0] > 1:
            h = (x_0.shape[0] + 1) // 2
            return torch.cat([forward(self, x_0[:h], noise[:h], t[:h]), forward(self, x_0[h:], noise[h:], t[h:])])
        return forward(self, x_0, noise, t)

    monkeypatch.setattr(MNISTDiffusion, "forward", by_halves)
    use_cached_mnist5k(monkeypatch, models.training.teacher, mnist5k)
    code, _, err = run_main_in_process(REPO / "train_ddpm.py", [*train_cli.teacher_args, "--output_dir",
                                                                tmp_path / "one"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    ours, theirs = (load_pt(tmp_path / d / "steps_00000008.pt") for d in ("ddp", "one"))
    weights = [k for k in ours["model"] if "running_" not in k and "num_batches" not in k]
    assert_identical({k: ours["model"][k] for k in weights}, {k: theirs["model"][k] for k in weights}, "model")
    assert_identical(ours["optimizer"]["state"], theirs["optimizer"]["state"], "optimizer")
    for a, b in zip(*(_stats(tmp_path / d) for d in ("ddp", "one"))):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)


# ---------------------------------------------------------------- the rules, without processes

def test_a_step_splits_into_contiguous_shares_differing_by_at_most_one():
    from models.io.distributed import Ranks
    for n in (2, 7, 8, 9):
        shares = [Ranks(r, 3).split(n) for r in range(3)] if n >= 3 else [Ranks(r, 2).split(n) for r in range(2)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        sizes = [hi - lo for lo, hi in shares]
        assert max(sizes) - min(sizes) <= 1


def test_one_line_for_a_failure_however_many_ranks_see_it(monkeypatch):
    """agree(): the lowest failing rank raises its own error; every other rank exits quietly (RankFailed)."""
    from models.io import distributed
    from models.io.distributed import Ranks, RankFailed
    from models.io.errors import PipelineError
    outcomes = [None, ("teacher checkpoint not found: t.pt", 2, False), ("other", 1, False)]

    def fail():
        raise PipelineError(outcomes[1][0], 2)

    for rank, expected in ((0, RankFailed), (1, PipelineError), (2, RankFailed)):
        ranks = Ranks(rank, 3)
        monkeypatch.setattr(Ranks, "gather", lambda self, obj: outcomes)
        monkeypatch.setattr(distributed, "QUIET_EXIT_GRACE_S", 0.0)
        with pytest.raises(PipelineError) as err:
            ranks.agree(fail if rank == 1 else (lambda: None))
        assert type(err.value) is expected and err.value.exit_code == 2
        assert getattr(err.value, "quiet", False) == (rank != 1)


@pytest.mark.parametrize("outcome, code, torn_down", [("done", 0, True), ("refused", 2, False), ("ctrl-c", 130, False)])
def test_a_torchrun_rank_ends_with_its_stage_exit_code_and_skips_interpreter_shutdown(outcome, code, torn_down,
                                                                                       monkeypatch, capsys):
    """Under torchrun, run_cli ends the rank with os._exit once the group is left (a finished run's rank 0 aborted
    with SIGABRT during interpreter shutdown: a gloo worker thread dropped the last barrier's tensors then), after
    flushing what the stage printed; a plain run (no process group) returns or exits as before."""
    from models.io import distributed
    from models.io.errors import MissingInputError, run_cli

    class Exited(BaseException):
        pass

    events = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "_stop", lambda: events.append("teardown"))
    monkeypatch.setattr(distributed.os, "_exit", lambda c: (events.append(c), (_ for _ in ()).throw(Exited())))

    def stage():
        print("summary line")
        if outcome == "refused":
            raise MissingInputError("teacher checkpoint not found: t.pt")
        if outcome == "ctrl-c":
            raise KeyboardInterrupt

    with pytest.raises(Exited):
        run_cli(stage)
    assert events == (["teardown", 0] if torn_down else [code])
    assert "summary line" in capsys.readouterr().out

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    events.clear()
    if outcome == "done":
        assert run_cli(stage) is None
    else:
        with pytest.raises(SystemExit) as exited:
            run_cli(stage)
        assert exited.value.code == code
    assert events == []
