"""train_ddpm.py: bit-exact resume after SIGKILL, upstream checkpoint format, logs and artifacts, CLI contract."""
from __future__ import annotations

import json
import math
import re
import shutil
import signal
import warnings

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import models.training.teacher
from helpers import (assert_identical, kill_when, load_pt, one_error_line, run_main_in_process, start_logged,
                     use_cached_mnist5k)
from models.io.teacher_checkpoints import infer_teacher_config, load_teacher, strip_ema
from models.nets.teacher import MNISTDiffusion, TeacherConfig
from models.nets.unet import sinusoidal_table
from models.training.teacher import list_checkpoints

CKPT_NAME = re.compile(r"^steps_\d{8}\.pt$")
SCHEDULE_KEYS = ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
ALL_OPTIONS = ("--dataset", "--download", "--output_dir", "--epochs", "--steps", "--batch_size", "--lr",
               "--model_base_dim", "--dim_mults", "--timesteps", "--model_ema_steps", "--model_ema_decay", "--seed",
               "--save_every", "--keep_last", "--n_samples", "--sample_steps", "--log_every", "--threads", "--cpu",
               "--dry-run", "--resume", "--init_from", "--time_embedding_init", "--freeze_batchnorm")


@pytest.fixture
def in_process(train_cli, mnist5k, monkeypatch, capsys):
    """Runs train_ddpm.py's __main__ (argparse + run_cli) in this interpreter: (exit code, stdout, stderr).

    Cheaper than a subprocess (no torch import, and mnist5k comes from the session cache)."""
    use_cached_mnist5k(monkeypatch, models.training.teacher, mnist5k)
    return lambda args: run_main_in_process(train_cli.repo / "train_ddpm.py", args, monkeypatch, capsys)


# ---------------------------------------------------------------- SIGKILL and resume

@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, train_cli) -> dict:
    """The same 8-step command as the reference run, SIGKILLed as soon as steps_00000004.pt appears."""
    out = tmp_path_factory.mktemp("killed") / "run"
    args = train_cli.teacher_args + ["--output_dir", str(out)]
    log = out.parent / "killed.log"
    proc = start_logged(train_cli.command(*args), log, cwd=train_cli.repo)
    returncode = kill_when(proc, out / "steps_00000004.pt", 300, what="steps_00000004.pt", log=log)
    return {"dir": out, "args": args, "returncode": returncode, "files": sorted(p.name for p in out.iterdir())}


def test_killed_run_leaves_loadable_checkpoints(killed_run):
    out = killed_run["dir"]
    # SIGKILL, unless the tiny run outraced the poll and finished (then rc 0; either way checkpoints are whole).
    assert killed_run["returncode"] in (-signal.SIGKILL, 0)
    if killed_run["returncode"] == 0:
        warnings.warn("the run finished before SIGKILL landed; only the resume half was exercised")
    finals = [name for name in killed_run["files"] if name.startswith("steps_") and name.endswith(".pt")]
    assert "steps_00000004.pt" in finals
    for name in finals:
        assert CKPT_NAME.match(name), f"stray file under a checkpoint name: {name}"
        ckpt = load_pt(out / name)
        assert ckpt["step"] == int(name[6:14])
        assert ckpt["kind"] == "teacher" and {"model", "model_ema", "optimizer", "scheduler"} <= set(ckpt)
    # Half-written files only ever live under hidden *.tmp names, which are never taken for checkpoints.
    for name in killed_run["files"]:
        assert not name.endswith(".tmp") or name.startswith("."), name
    assert [p.name for p in list_checkpoints(out)] == sorted(finals)


def test_resume_after_kill_is_bitwise_identical(killed_run, tiny_teacher_run, tmp_path, train_cli):
    work = tmp_path / "run"
    shutil.copytree(killed_run["dir"], work)
    for later in [p for p in list_checkpoints(work) if p.name != "steps_00000004.pt"]:
        later.unlink()  # resume from step 4 even if the kill landed after a later save
    with open(work / "stats.jsonl", "a") as log:  # as if the kill had landed after logging step 6
        log.write(json.dumps({"step": 6, "loss": 123.0}) + "\n")
    args = train_cli.teacher_args + ["--output_dir", str(work), "--resume"]
    proc = train_cli.run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 4/8" in proc.stdout
    resumed = load_pt(work / "steps_00000008.pt")
    straight = load_pt(tiny_teacher_run["final"])
    assert resumed["step"] == straight["step"] == 8
    for key in ("model", "model_ema", "optimizer", "scheduler"):
        assert_identical(resumed[key], straight[key], key)
    # The log reads like the unbroken run's: records the killed run wrote after step 4 are dropped, not doubled.
    def losses(run_dir):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "stats.jsonl").read_text().splitlines())]
    assert losses(work) == losses(tiny_teacher_run["dir"])
    # Not vacuous: the weights moved between step 4 and step 8.
    four = load_pt(work / "steps_00000004.pt")
    assert not torch.equal(four["model"]["model.final_conv.weight"], resumed["model"]["model.final_conv.weight"])


# ---------------------------------------------------------------- checkpoint format

def test_checkpoint_is_upstream_format(tiny_teacher_run, tmp_path):
    ckpt = load_pt(tiny_teacher_run["final"])
    assert {"model", "model_ema", "kind", "model_args", "config", "step", "optimizer", "scheduler"} <= set(ckpt)
    model, ema = ckpt["model"], ckpt["model_ema"]
    assert "n_averaged" in ema and int(ema["n_averaged"]) == 4  # EMA updates at steps 0, 2, 4, 6
    assert all(k.startswith("module.") for k in ema if k != "n_averaged")
    stripped = strip_ema(ema)
    assert set(stripped) == set(model)
    assert all(stripped[k].shape == model[k].shape for k in model)
    for key in SCHEDULE_KEYS:
        assert key in model and key in stripped
    assert any(k.endswith("running_mean") for k in model)
    # The EMA is an average, not a copy of the last weights.
    assert not torch.equal(stripped["model.final_conv.weight"], model["model.final_conv.weight"])

    # Upstream's own reader: MNISTDiffusion + AveragedModel, strict.
    cfg = TeacherConfig(base_dim=4, dim_mults=[2, 4], timesteps=50)
    net = MNISTDiffusion(cfg)
    net.load_state_dict(model, strict=True)
    averaged = AveragedModel(MNISTDiffusion(cfg), use_buffers=True)
    averaged.load_state_dict(ema, strict=True)

    teacher = load_teacher(tiny_teacher_run["final"])
    assert teacher.weights == "ema"
    assert (teacher.config.base_dim, list(teacher.config.dim_mults), teacher.config.timesteps) == (4, [2, 4], 50)
    assert torch.equal(teacher.diffusion.model.final_conv.weight, stripped["model.final_conv.weight"])

    # Stripped to upstream's two keys, the architecture is inferred from the shapes alone.
    bare = tmp_path / "bare.pt"
    torch.save({"model": model, "model_ema": ema}, bare)
    inferred = load_teacher(bare)
    assert inferred.config == TeacherConfig(base_dim=4, dim_mults=[2, 4], timesteps=50)
    assert infer_teacher_config(model) == inferred.config
    with torch.no_grad():
        x, t = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 40])
        assert torch.equal(inferred.diffusion.predict_noise(x, t), teacher.diffusion.predict_noise(x, t))


# ---------------------------------------------------------------- logs and artifacts

def test_logs_grids_and_options(tiny_teacher_run):
    out = tiny_teacher_run["dir"]
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # --log_every 2 over 8 steps
    for r in rows:
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 10
        assert math.isfinite(r["lr"]) and 0 < r["lr"] <= 1e-3
    assert rows[0]["lr"] > rows[2]["lr"]  # OneCycle is annealing
    png_magic = b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    grid = out / "steps_00000008.png"
    assert grid.read_bytes()[:8] == png_magic
    with Image.open(grid) as im:
        assert im.size == (62, 62)  # 4 samples: 2 x 2 tiles of 28 px with 2 px padding
    assert (out / "loss.png").read_bytes()[:8] == png_magic
    options = json.loads((out / "training_options.json").read_text())
    assert options["total_steps"] == 8 and options["n_images"] == 5000
    assert options["options"]["batch_size"] == 8 and options["options"]["base_dim"] == 4
    assert options["model_args"]["timesteps"] == 50 and options["model_args"]["dim_mults"] == [2, 4]
    assert "torch" in options["versions"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert sorted(p.name for p in list_checkpoints(out)) == ["steps_00000004.pt", "steps_00000008.pt"]


# ---------------------------------------------------------------- CLI contract

def test_rerun_without_resume_refuses(tiny_teacher_run, train_cli):
    out = tiny_teacher_run["dir"]
    # the output lock (.lock) records the pid of the last run that held it; everything else is left as it was
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
    proc = train_cli.run(*tiny_teacher_run["args"])
    assert proc.returncode == 1
    assert "--resume" in one_error_line(proc.stderr), proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == before


def test_resume_with_other_options_refuses(tiny_teacher_run, in_process):
    code, _, err = in_process(tiny_teacher_run["args"] + ["--resume", "--lr", "0.002"])
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: --resume with a different lr")


@pytest.mark.parametrize("extra,needle", [(["--batch_size", "0"], "--batch_size"),
                                          (["--dataset", "nosuch"], "nosuch"),
                                          (["--lr", "nan"], "--lr")])
def test_bad_options_exit_1(extra, needle, tmp_path, train_cli, in_process):
    out = tmp_path / "o"
    code, _, err = in_process(train_cli.tiny_args + ["--output_dir", out] + extra)
    assert code == 1
    assert needle in one_error_line(err), err
    assert not out.exists()


def test_dry_run_prints_config_and_writes_nothing(tmp_path, train_cli, in_process):
    out = tmp_path / "dry"
    code, stdout, _ = in_process(train_cli.tiny_args + ["--steps", "8", "--output_dir", out, "--dry-run"])
    assert code == 0
    config = json.loads(stdout)
    assert config["total_steps"] == 8 and config["options"]["base_dim"] == 4
    assert config["model_args"]["timesteps"] == 50 and config["device"] == "cpu"
    assert not out.exists()


def test_help_mentions_every_option(in_process):
    code, stdout, _ = in_process(["--help"])
    assert code == 0
    missing = [opt for opt in ALL_OPTIONS if opt not in stdout]
    assert not missing, f"--help does not mention {missing}"



def test_sinusoidal_time_embedding_init(tmp_path, tiny_teacher_ckpt, train_cli, in_process):
    """The table starts as sin/cos rows (smooth in t) and the checkpoint keeps upstream's format and loader."""
    table = sinusoidal_table(50, 256)
    assert table.shape == (50, 256) and torch.isfinite(table).all()
    t = torch.arange(50)
    assert torch.equal(table[:, 0], torch.sin(t.double()).float()) and torch.equal(table[:, 128], torch.cos(t.double()).float())
    near = torch.nn.functional.cosine_similarity(table[1:], table[:-1]).min()
    far = torch.nn.functional.cosine_similarity(table[:1], table[-1:]).item()
    assert near > 0.95 and far < 0.6  # neighbouring timesteps start close, distant ones do not
    out = tmp_path / "sin"
    code, _, err = in_process(train_cli.tiny_args + ["--steps", "8", "--save_every", "8", "--lr", "1e-7",
                                                     "--time_embedding_init", "sinusoidal", "--output_dir", out])
    assert code == 0, err
    loaded = load_teacher(out / "steps_00000008.pt")
    learned = loaded.diffusion.model.time_embedding.weight.detach()
    assert (learned - table).abs().max() < 1e-4  # 8 steps at lr 1e-7 move it by ~1e-6
    assert (load_teacher(tiny_teacher_ckpt).diffusion.model.time_embedding.weight - table).abs().max() > 0.5
    assert load_pt(out / "steps_00000008.pt")["config"]["options"]["time_embedding_init"] == "sinusoidal"


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_batchnorm_keeps_running_statistics(freeze, tmp_path, tiny_teacher_ckpt, train_cli, in_process):
    """--freeze_batchnorm trains the weights with BatchNorm's running statistics fixed (as sampling runs it)."""
    out = tmp_path / "leg"
    args = ["--init_from", str(tiny_teacher_ckpt), "--steps", "8", "--save_every", "8", "--lr", "1e-3",
            "--batch_size", "16", "--cpu", "--output_dir", out] + (["--freeze_batchnorm"] if freeze else [])
    code, _, err = in_process(args)
    assert code == 0, err
    before, after = load_pt(tiny_teacher_ckpt)["model"], load_pt(out / "steps_00000008.pt")["model"]
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in before if k.endswith("weight") and "time_embedding" not in k]
    assert stats and weights
    assert all(torch.equal(before[k], after[k]) for k in stats) == freeze
    assert sum(not torch.equal(before[k], after[k]) for k in weights) > len(weights) // 2  # it did train
    assert load_pt(out / "steps_00000008.pt")["config"]["options"]["freeze_batchnorm"] == freeze
