"""The fault matrix of the long stages (train the teacher, generate pairs, train the student, extract features): what a
user sees when weights hold NaN/Inf, a shard changes on disk between two runs, the output directory is read-only, the
disk fills during the final write, the run is SIGKILLed while writing its result or a checkpoint, or two runs share
an output.

Every case asserts what the user relies on: one "error:" line and exit 1 (a SIGKILLed run just dies), nothing
half-written under a final name, and the same command afterwards finishing bitwise identical (sha256 of every
output tensor) to an unbroken run of that command, made once per stage by a module fixture. Read-only and full
disks are real tmpfs mounts (root, as CI runs; skipped where mounting is not allowed); kills land while the file is
being written (inotify on the writer's temp file).
"""
from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

import models.stages.features
import models.training.teacher
from conftest import TINY_TRAIN_ARGS, run_script
from helpers import kill_on_create, load_pt, one_error_line, run_main_in_process, start_logged, use_cached_mnist5k

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096

GEN_ARGS = ["--n_samples", "16", "--batch_size", "4", "--shard_size", "4", "--steps", "2", "--spacing", "leading",
            "--cpu"]
# --resume as run_pipeline.py trains: the same command starts, or continues, a run
TRAIN_ARGS = ["--epochs", "2", "--batch_size", "8", "--lr", "1e-3", "--bn_samples", "16", "--n_preview", "2",
              "--no_evaluate", "--cpu", "--resume"]
# the teacher's own training: two checkpoints, the rerun continues from the first
TEACH_ARGS = [*TINY_TRAIN_ARGS, "--steps", "8", "--save_every", "4", "--model_ema_steps", "2", "--seed", "0",
              "--resume"]
FEATURE_ARGS = ["--dataset", "mnist5k", "--limit", "16", "--batch_size", "4", "--shard_size", "4", "--method",
                "ddim_inversion", "--inversion_steps", "2", "--consistency_samples", "0", "--cpu"]


@dataclass
class Stage:
    """One stage's command, writing into a directory ``where``, and the digests of its unbroken run."""
    script: str
    command: Callable[[Path, dict], list]   # (where, inputs) -> arguments
    final: str                              # the result's file name in ``where``
    keys: tuple                             # the result's tensors compared with the unbroken run
    inputs: dict                            # input name -> path of a good file
    lock: str                               # the lock's file name in ``where``
    reference: dict = field(default_factory=dict)
    final_pages: int = 0                    # the result's size in 4 KiB pages
    result: Path | None = None              # the unbroken run's result (training: its best_model.pt)

    def args(self, where: Path, **inputs) -> list:
        return self.command(where, self.inputs | inputs)


def digests(path: Path, keys) -> dict[str, str]:
    """sha256 of every tensor under ``keys`` (nested dicts and lists included), computed here, not by the code
    under test."""
    found = {}

    def walk(name, value):
        if isinstance(value, torch.Tensor):
            found[name] = hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{name}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{name}[{i}]", v)
    data = load_pt(path)
    for key in keys:
        walk(key, data[key])
    return found


def _gen_command(where, inputs):
    return ["--ckpt", inputs["teacher"], "--output_dir", where, *GEN_ARGS]


def _teach_command(where, inputs):
    return ["--output_dir", where, *TEACH_ARGS]


def _train_command(where, inputs):
    return ["--ddpm_ckpt", inputs["teacher"], "--data_path", inputs["pairs"], "--output_dir", where, *TRAIN_ARGS]


def _feature_command(where, inputs):
    return ["--ddpm_ckpt", inputs["teacher"], "--decoder_ckpt", inputs["student"], "--output_path", where / "rf.pt",
            *FEATURE_ARGS]


@pytest.fixture(scope="module")
def teach_stage(tmp_path_factory) -> Stage:
    where = tmp_path_factory.mktemp("faults_teach_reference")
    proc = run_script("train_ddpm.py", *_teach_command(where, {}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = Stage("train_ddpm.py", _teach_command, "steps_00000008.pt", ("model", "model_ema", "optimizer"), {},
                  ".lock")
    stage.final_pages = _pages(where / stage.final)
    stage.reference = digests(where / stage.final, stage.keys)
    stage.result = where / stage.final
    return stage


@pytest.fixture(scope="module")
def gen_stage(tiny_teacher_ckpt, tmp_path_factory) -> Stage:
    from models.stages.generate import GenerateOptions, generate_training_data
    where = tmp_path_factory.mktemp("faults_gen_reference")
    generate_training_data(GenerateOptions(ckpt=str(tiny_teacher_ckpt), output_dir=str(where), n_samples=16,
                                           batch_size=4, shard_size=4, steps=2, spacing="leading", cpu=True))
    stage = Stage("generate_training_data.py", _gen_command, "training_data.pt", ("noise", "images"),
                  {"teacher": tiny_teacher_ckpt}, ".lock")
    stage.final_pages = _pages(where / stage.final)
    stage.reference = digests(where / stage.final, stage.keys)
    stage.result = where / stage.final
    return stage


@pytest.fixture(scope="module")
def train_stage(gen_stage, tiny_teacher_ckpt, tmp_path_factory) -> Stage:
    from models.training.student import StudentTrainOptions, train_student
    pairs = gen_stage.result
    where = tmp_path_factory.mktemp("faults_train_reference")
    train_student(StudentTrainOptions(ddpm_ckpt=str(tiny_teacher_ckpt), data_path=str(pairs), output_dir=str(where),
                                      epochs=2, batch_size=8, lr=1e-3, bn_samples=16, n_preview=2, evaluate=False,
                                      cpu=True), resume=True)
    stage = Stage("train_direct_decoder.py", _train_command, "ckpt_epoch_002.pt", ("model", "model_ema", "optimizer"),
                  {"teacher": tiny_teacher_ckpt, "pairs": pairs}, ".lock")
    stage.final_pages = _pages(where / stage.final)
    stage.reference = digests(where / stage.final, stage.keys) | {
        f"best_model {k}": v for k, v in digests(where / "best_model.pt", ("model_ema",)).items()}
    stage.result = where / "best_model.pt"
    return stage


@pytest.fixture(scope="module")
def extract_stage(train_stage, tiny_teacher_ckpt, mnist5k, tmp_path_factory) -> Stage:
    from models.stages.features import FeatureOptions, extract_reference_features
    where = tmp_path_factory.mktemp("faults_extract_reference")
    with pytest.MonkeyPatch.context() as mp:
        use_cached_mnist5k(mp, models.stages.features, mnist5k)
        extract_reference_features(FeatureOptions(
            ddpm_ckpt=str(tiny_teacher_ckpt), decoder_ckpt=str(train_stage.result), output_path=str(where / "rf.pt"),
            dataset="mnist5k", limit=16, batch_size=4, shard_size=4, method="ddim_inversion", inversion_steps=2,
            consistency_samples=0, cpu=True))
    stage = Stage("extract_reference_features.py", _feature_command, "rf.pt",
                  ("features", "labels", "indices", "latents", "reconstruction_psnr_db"),
                  {"teacher": tiny_teacher_ckpt, "student": train_stage.result}, ".rf.pt.lock")
    stage.final_pages = _pages(where / stage.final)
    stage.reference = digests(where / stage.final, stage.keys)
    stage.result = where / stage.final
    return stage


STAGES = ("teach", "gen", "train", "extract")
SHARDED = ("gen", "extract")


@pytest.fixture
def stage(request) -> Stage:
    return request.getfixturevalue(f"{request.param}_stage")


@pytest.fixture
def cli(monkeypatch, capsys, mnist5k):
    """cli(script, args) runs a stage script in this interpreter: (exit code, stdout, stderr)."""
    use_cached_mnist5k(monkeypatch, models.stages.features, mnist5k)
    use_cached_mnist5k(monkeypatch, models.training.teacher, mnist5k)
    return lambda script, args: run_main_in_process(REPO / script, args, monkeypatch, capsys)


def assert_same_as_unbroken(stage: Stage, where: Path) -> None:
    found = digests(where / stage.final, stage.keys)
    if stage.final == "ckpt_epoch_002.pt":
        found |= {f"best_model {k}": v for k, v in digests(where / "best_model.pt", ("model_ema",)).items()}
    assert found == stage.reference, "the rerun's tensors differ from the unbroken run's"


def assert_nothing_half_written(where: Path) -> None:
    """Every file under a final name loads whole; temp files of the writer are hidden (".NAME.XXXX.tmp")."""
    for path in where.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            assert not path.name.endswith(".tmp"), f"visible partial file {path}"
            if path.suffix == ".pt":
                load_pt(path)


def rerun_matches(stage: Stage, cli, where: Path) -> str:
    """The same command again: exit 0, and the unbroken run's tensors. Returns its stdout."""
    code, out, err = cli(stage.script, stage.args(where))
    assert code == 0, err[-3000:]
    assert_same_as_unbroken(stage, where)
    assert not list(where.rglob(".*.tmp")), "a temp file of the broken run was left behind"
    return out


def refused(code: int, err: str, *needles: str) -> str:
    assert code == 1, f"exit {code}, expected 1; stderr:\n{err[-2000:]}"
    line = one_error_line(err, allow_progress=True)
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


# ---------------------------------------------------------------- broken weights and values

def _poison(path: Path, out: Path, value: float, scale: bool = False) -> str:
    """A copy of checkpoint ``path`` whose EMA init conv holds ``value`` (or, with ``scale``, finite but huge
    weights); returns the tensor's name as the loaders report it."""
    ckpt = load_pt(path)
    name = next(k for k in ckpt["model_ema"] if "init_conv.module.0.weight" in k)
    if scale:
        ckpt["model_ema"][name] = ckpt["model_ema"][name].sign() * 3e38
    else:
        ckpt["model_ema"][name].view(-1)[0] = value
    torch.save(ckpt, out)
    return name[len("module."):]


BROKEN = {
    # case: (stage, input broken, how, message fragments besides the file)
    "gen-teacher-nan": ("gen", "teacher", float("nan"), ("EMA weights", "1 NaN", "rerun cannot help")),
    "gen-teacher-inf": ("gen", "teacher", float("inf"), ("EMA weights", "1 Inf")),
    "train-teacher-nan": ("train", "teacher", float("nan"), ("EMA weights", "1 NaN")),
    "train-pairs-nan": ("train", "pairs", float("nan"), ("images of samples 3, 11", "regenerate")),
    "extract-student-nan": ("extract", "student", float("nan"), ("direct-decoder", "EMA weights", "1 NaN")),
    "extract-student-inf": ("extract", "student", float("-inf"), ("direct-decoder", "1 Inf")),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_weights_are_refused_before_any_output(case, request, cli, tmp_path):
    """Refused at load, in one line naming the tensor, before the output exists; with the good file back at the
    same path, the same command gives the unbroken run's result."""
    name, broken, value, needles = BROKEN[case]
    stage = request.getfixturevalue(f"{name}_stage")
    good = Path(stage.inputs[broken])
    path = tmp_path / "inputs" / good.name
    path.parent.mkdir()
    if broken == "pairs":
        data = load_pt(good)
        data["images"][[3, 11]] = value
        torch.save(data, path)
        tensor = "images"
    else:
        tensor = _poison(good, path, value)
    where = tmp_path / "out"
    code, _, err = cli(stage.script, stage.args(where, **{broken: path}))
    refused(code, err, str(path), tensor, *needles)
    assert not where.exists(), "the output was created before the input was refused"
    shutil.copy(good, path)
    rerun_matches(stage, cli, where)


@pytest.mark.parametrize("stage", ["gen", "extract"], indirect=True)
def test_values_that_overflow_stop_the_run_naming_the_samples(stage, cli, tmp_path):
    """Finite weights, but so large that the pass overflows: the first batch stops the run naming its samples and
    the likely cause, before any shard or result is written."""
    broken = "teacher" if stage.final == "training_data.pt" else "student"
    good = Path(stage.inputs[broken])
    path = tmp_path / good.name
    _poison(good, path, 0.0, scale=True)
    where = tmp_path / "out"
    code, _, err = cli(stage.script, stage.args(where, **{broken: path}))
    refused(code, err, "of samples 0, 1, 2, 3 hold non-finite values", "weights are finite", "rerun")
    assert not (where / stage.final).exists()
    assert not list(where.rglob("shard_*.pt")), "a shard of non-finite values was saved"
    shutil.copy(good, path)
    rerun_matches(stage, cli, where)


def test_every_later_stage_refuses_a_nan_student(train_stage, extract_stage, cli, tmp_path):
    student = tmp_path / "nan_student.pt"
    tensor = _poison(train_stage.result, student, float("nan"))
    teacher = train_stage.inputs["teacher"]
    commands = {
        "attribution_generation.py": ["--ddpm_ckpt", teacher, "--decoder_ckpt", student, "--ref_features_path",
                                      extract_stage.result, "--output_dir", tmp_path / "attr", "--cpu"],
        "test_direct_decoder.py": ["--ddpm_ckpt", teacher, "--decoder_ckpt", student, "--output_dir",
                                   tmp_path / "test", "--cpu"],
        "train_direct_decoder.py": train_stage.args(tmp_path / "init", teacher=teacher) + ["--init_from", student],
    }
    for script, args in commands.items():
        code, _, err = cli(script, args)
        refused(code, err, str(student), tensor, "non-finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan_student.pt"], "a refused stage wrote output"


def test_train_ddpm_refuses_to_continue_nan_weights(tiny_teacher_ckpt, cli, tmp_path):
    """--init_from continues the raw weights as well as the EMA ones: NaN in either is refused before any output."""
    ckpt = load_pt(tiny_teacher_ckpt)
    name = next(k for k in ckpt["model"] if "init_conv.module.0.weight" in k)
    ckpt["model"][name].view(-1)[0] = float("nan")
    torch.save(ckpt, tmp_path / "raw_nan.pt")
    out = tmp_path / "out"
    code, _, err = cli("train_ddpm.py", ["--init_from", tmp_path / "raw_nan.pt", "--output_dir", out, "--steps", "8",
                                         "--batch_size", "8", "--cpu", "--threads", "1"])
    refused(code, err, "--init_from", "raw weights", name, "1 NaN")
    assert not out.exists()


# ---------------------------------------------------------------- SIGKILL while writing

# What a rerun says when it continues from the work a broken run kept (extraction keeps its shards silently).
KEPT_WORK = {"generate_training_data.py": "16 pairs already done", "train_direct_decoder.py": "(epoch 1/2)",
             "train_ddpm.py": "resumed from"}


KILL_ATTEMPTS = 4


@pytest.fixture(scope="module")
def killed(request, tmp_path_factory):
    """killed(stage): the stage's command in a subprocess, SIGKILLed while writing its result (training: the last
    epoch's checkpoint). Made once per stage: (directory as the kill left it, exit status)."""
    runs = {}

    def kill(stage: Stage):
        # The write of a tiny result and its rename take milliseconds, and on a loaded machine the kill can land
        # after them: the run is then repeated (at a lower priority than this watcher), until one kill lands mid-write.
        attempts = 0
        while attempts < KILL_ATTEMPTS and (stage.script not in runs or (runs[stage.script][0] / stage.final).exists()):
            attempts += 1
            root = tmp_path_factory.mktemp("faults_killed")
            where = root / "run"
            where.mkdir()
            log = root / "run.log"
            proc = start_logged([sys.executable, REPO / stage.script, *stage.args(where)], log, cwd=REPO, niceness=10)
            rc = kill_on_create(proc, where, f".{stage.final}.*.tmp", 300, what=f"the temp file of {stage.final}",
                                log=log)
            runs[stage.script] = where, rc
        return runs[stage.script]
    return kill


@pytest.mark.parametrize("stage", STAGES, indirect=True)
def test_sigkill_while_writing_the_result(stage, killed, cli, tmp_path):
    killed_dir, rc = killed(stage)
    assert rc == -signal.SIGKILL
    assert not (killed_dir / stage.final).exists(), "the kill landed after the rename: nothing was exercised"
    assert_nothing_half_written(killed_dir)
    where = tmp_path / "run"
    shutil.copytree(killed_dir, where)
    out = rerun_matches(stage, cli, where)
    assert KEPT_WORK.get(stage.script, "") in out, out


@pytest.mark.parametrize("how", ["rewritten", "truncated"])
@pytest.mark.parametrize("stage", SHARDED, indirect=True)
def test_a_shard_changed_between_two_runs_is_regenerated(stage, how, killed, cli, tmp_path):
    """A shard whose bytes differ from the checksum recorded when it was saved (a valid file with other values, or
    a cut one) is regenerated, never trusted: the result equals the unbroken run's."""
    where = tmp_path / "run"
    shutil.copytree(killed(stage)[0], where)
    shard = sorted(where.rglob("shard_000000004_000000008.pt"))[0]
    if how == "rewritten":
        data = load_pt(shard)
        key = next(k for k, v in data.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
        data[key].view(-1)[0] += 1
        torch.save(data, shard)
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    out = rerun_matches(stage, cli, where)
    assert f"{shard.name}: sha256" in out and "regenerating it" in out, out


# ---------------------------------------------------------------- read-only and full disks (real tmpfs mounts)

@contextmanager
def tmpfs(where: Path, options: str):
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"a real read-only or full disk needs a tmpfs mount, not allowed here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // PAGE)


@pytest.mark.parametrize("stage", STAGES, indirect=True)
def test_read_only_output_directory(stage, cli, tmp_path):
    where = tmp_path / "out"
    with tmpfs(where, "ro,size=1m"):
        code, _, err = cli(stage.script, stage.args(where))
        refused(code, err, f"cannot write to {where}", "Read-only file system")
        assert list(where.iterdir()) == []
    rerun_matches(stage, cli, where)


@pytest.mark.parametrize("stage", STAGES, indirect=True)
def test_disk_full_during_the_final_write(stage, killed, cli, tmp_path):
    """A disk with room for everything before the final write (what the killed run had written) and half the result:
    one line, no result, no temp file; with room made, the same command finishes from what was kept."""
    killed_dir = killed(stage)[0]
    kept = [p for p in killed_dir.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
    size = PAGE * (sum(map(_pages, kept)) + 2 + stage.final_pages // 2)
    where = tmp_path / "out"
    with tmpfs(where, f"size={size}"):
        code, _, err = cli(stage.script, stage.args(where))
        line = refused(code, err, "could not write", "No space left on device")
        # the last writes: the result (training: the last epoch's best model or checkpoint)
        assert f"{stage.final}:" in line or (stage.final == "ckpt_epoch_002.pt" and "best_model.pt:" in line), line
        assert not (where / stage.final).exists()
        assert not list(where.rglob(".*.tmp")), "the failed write left its temp file"
        assert_nothing_half_written(where)
        subprocess.run(["mount", "-o", "remount,size=64m", str(where)], check=True)
        out = rerun_matches(stage, cli, where)
    assert KEPT_WORK.get(stage.script, "") in out, out


# ---------------------------------------------------------------- two runs on one output

def _wait_for_lock(proc: subprocess.Popen, lock: Path, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (lock.exists() and lock.read_text().strip() == str(proc.pid)):
        assert proc.poll() is None, f"the first run exited ({proc.returncode}):\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"the first run did not take {lock} within {timeout} s"
        time.sleep(0.01)


@pytest.mark.parametrize("stage", STAGES, indirect=True)
def test_two_runs_on_one_output(stage, cli, tmp_path):
    """While a run holds the output (paused, so the timing is certain), a second one refuses in one line and
    touches nothing; the first finishes as if alone, and the second, run again, agrees."""
    where = tmp_path / "run"
    where.mkdir()
    log = tmp_path / "first.log"
    first = start_logged([sys.executable, REPO / stage.script, *stage.args(where)], log, cwd=REPO)
    try:
        _wait_for_lock(first, where / stage.lock, log)
        first.send_signal(signal.SIGSTOP)
        code, _, err = cli(stage.script, stage.args(where))
        refused(code, err, f"another run (pid {first.pid})", str(where))
    finally:
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert_same_as_unbroken(stage, where)
    rerun_matches(stage, cli, where)


# ---------------------------------------------------------------- the writer's check before the rename; the guards

def _altered_on_the_way(change):
    """torch.save that writes ``change(copy of obj)``: what a failing disk or memory does between the two."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(change({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in obj.items()}), f, *args, **kwargs)
    return save


def _flip_one_value(obj):
    obj["images"].view(-1)[5] += 1
    return obj


def _drop_a_row(obj):
    obj["images"] = obj["images"][1:]
    return obj


@pytest.mark.parametrize("change, needles", [
    (_flip_one_value, ("did not verify", "images: sha256", "rerun to retry")),
    (_drop_a_row, ("did not verify", "images: count 3 instead of 4", "rerun to retry")),
    (None, ("not written", "images of rows 2", "a rerun cannot help")),
])
def test_a_file_that_did_not_verify_never_takes_the_final_name(change, needles, tmp_path, monkeypatch):
    from models.io.guards import verified
    from models.io.errors import PipelineError
    from models.io.files import atomic_save
    data = {"images": torch.randn(4, 1, 28, 28), "noise": torch.randn(4, 1, 28, 28)}
    if change is None:
        data["images"][2, 0, 3, 3] = float("nan")
    else:
        monkeypatch.setattr(torch, "save", _altered_on_the_way(change))
    target = tmp_path / "training_data.pt"
    target.write_bytes(b"the previous good result")
    with pytest.raises(PipelineError) as info:
        atomic_save(data, target, before_rename=verified(data, ["noise", "images"], kept="shards kept in S"))
    message = str(info.value)
    for needle in needles + (str(target), "shards kept in S"):
        assert needle in message, message
    assert info.value.exit_code == 1
    assert target.read_bytes() == b"the previous good result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_data.pt"], "the temp file was left behind"


def test_a_non_finite_discriminator_loss_stops_before_its_step():
    from models.training.adversarial import AdversarialTerm
    from models.io.errors import PipelineError
    real = torch.zeros(8, 1, 28, 28)
    real[3] = float("nan")
    term = AdversarialTerm(real, width=4, lr=1e-3, max_shift=0, device="cpu")
    before = {k: v.clone() for k, v in term.discriminator.named_parameters()}
    with pytest.raises(PipelineError, match="discriminator's loss holds non-finite values.*--disc_lr"):
        term.discriminator_step(torch.zeros(8, 1, 28, 28), torch.Generator().manual_seed(0))
    # (spectral norm's power-iteration buffers move on every forward pass; the weights only by a step)
    after = dict(term.discriminator.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before), "the discriminator stepped on a NaN loss"
    assert not term.optimizer.state


def test_generate_api_refuses_to_return_non_finite_images(train_stage, tmp_path):
    """The notebook / server path: a student whose weights are finite but overflow returns an error, not NaN."""
    from models.api import DirectDecoderPipeline
    from models.io.errors import PipelineError
    student = tmp_path / "huge_student.pt"
    _poison(train_stage.result, student, 0.0, scale=True)
    pipe = DirectDecoderPipeline.load(str(train_stage.inputs["teacher"]), str(student), device="cpu")
    with pytest.raises(PipelineError, match="the student's output holds non-finite values"):
        pipe.generate(4)
