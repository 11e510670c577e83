"""train_direct_decoder.py and the student: artefacts, self-describing checkpoints, warm start, hooks,
bit-exact resume after SIGKILL, refusal of bad inputs, and the end-of-training evaluation."""
from __future__ import annotations

import json
import math
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

import models.evaluation.evaluate
from helpers import (assert_identical, every_nth_image, kill_when, load_pt, one_error_line, run_main_in_process, sha256,
                     start_logged, use_cached_mnist5k)
from models.data.pairs import student_split
from models.diffusion.noise import per_sample_noise
from models.io.errors import PipelineError
from models.io.paths import AUDIT_CLASSIFIER
from models.io.teacher_checkpoints import load_teacher
from models.nets.student import DirectDecoder, load_student

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_direct_decoder.py"
EPOCH_CKPT = re.compile(r"^ckpt_epoch_(\d{3,})\.pt$")
RESUME_ARGS = ["--epochs", "4", "--batch_size", "8", "--lr", "1e-3", "--cpu", "--no_evaluate"]


@pytest.fixture
def train(monkeypatch, capsys, mnist5k):
    """Runs train_direct_decoder.py's __main__ in this interpreter: train(*args) -> (exit code, stdout, stderr).

    The evaluation's real images come from the session's cached mnist5k (parsing the CSV costs seconds), every 10th
    image: both classifiers' passes and the k-NN radii scale with them, and what is asserted does not depend on them."""
    use_cached_mnist5k(monkeypatch, models.evaluation.evaluate, every_nth_image(mnist5k, 10))
    return lambda *args: run_main_in_process(SCRIPT, args, monkeypatch, capsys)


# ---------------------------------------------------------------- artefacts and checkpoint format

def test_training_writes_every_artefact(tiny_student):
    out = tiny_student.parent
    for name in ("ckpt_epoch_001.pt", "ckpt_epoch_002.pt", "best_model.pt", "samples_epoch_001.png",
                 "samples_epoch_002.png", "stats.jsonl", "loss.png", "training_options.json"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    for png in ("samples_epoch_001.png", "samples_epoch_002.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for key in ("train_loss", "val_loss", "lr", "seconds"):
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
        assert row["train_loss"] > 0 and row["val_loss"] > 0
    assert rows[0]["lr"] > 0  # the cosine schedule ends at 0 after the last step
    options = json.loads((out / "training_options.json").read_text())
    assert options["options"]["epochs"] == 2 and options["options"]["batch_size"] == 8
    assert options["n_train"] + options["n_val"] == options["n_pairs"] == 40


def test_checkpoint_is_self_describing(tiny_student, tiny_teacher_ckpt, tiny_pairs):
    out = tiny_student.parent
    teacher = load_teacher(tiny_teacher_ckpt)
    epochs = {}
    for name in ("ckpt_epoch_001.pt", "ckpt_epoch_002.pt"):
        ckpt = load_pt(out / name)
        epochs[name] = ckpt
        assert ckpt["kind"] == "direct_decoder"
        assert ckpt["model_args"]["teacher"] == teacher.config.to_dict()
        assert ckpt["model_args"]["input_timestep"] == teacher.config.timesteps - 1 == 49
        assert ckpt["model_args"]["skips"] == "zero"  # the default: hooks steer the whole image
        assert ckpt["teacher"]["sha256"] == sha256(tiny_teacher_ckpt)
        assert ckpt["training_data"]["sha256"] == sha256(tiny_pairs)
        assert ckpt["epoch"] == int(name[11:14])
    # best_model.pt is the epoch checkpoint with the lowest validation loss.
    best = load_pt(tiny_student)
    lowest = min(epochs.values(), key=lambda c: c["val_loss"])
    assert best["val_loss"] == lowest["val_loss"] == min(c["val_loss"] for c in epochs.values())
    assert best["epoch"] == lowest["epoch"]
    assert_identical(best["model_ema"], lowest["model_ema"], "best_model.model_ema")
    # ... without what only --resume reads from the epoch checkpoints
    assert set(lowest) - set(best) == {"optimizer", "scheduler"}

    loaded = load_student(tiny_student)  # no architecture flags
    decoder = loaded.decoder
    assert loaded.teacher_sha256 == sha256(tiny_teacher_ckpt)
    z = per_sample_noise(5, range(3))
    with torch.no_grad():
        images = decoder(z)
        h = decoder.bottleneck(z)
    assert images.shape == (3, 1, 28, 28)
    assert tuple(h.shape[1:]) == tuple(decoder.bottleneck_shape) and h.shape[0] == 3
    # Loaded weights are the stored EMA weights, not a fresh network.
    ema = {k[len("module."):]: v for k, v in best["model_ema"].items() if k.startswith("module.")}
    state = decoder.state_dict()
    assert set(ema) == set(state)
    for key, value in ema.items():
        assert torch.equal(state[key], value), key


def test_warm_start_copies_the_teachers_unet(tiny_teacher_ckpt):
    teacher = load_teacher(tiny_teacher_ckpt)
    student = DirectDecoder.from_teacher(teacher.diffusion.model, teacher.config, skips="keep")
    mine, theirs = student.unet.state_dict(), teacher.diffusion.model.state_dict()
    assert set(mine) == set(theirs)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    # So at initialisation the student is the teacher's UNet evaluated at t = T-1.
    student.eval()
    z = per_sample_noise(0, range(2))
    t = torch.full((2,), teacher.config.timesteps - 1, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(student(z), teacher.diffusion.model(z, t))


def test_zero_skips_make_the_output_a_function_of_the_bottleneck(upstream_teacher_model_weights):
    """With skips="zero" two latents with the same bottleneck give the same image, so a hook there decides all of
    the output; with the teacher's skips ("keep") the rest of the latent still shows through."""
    teacher = upstream_teacher_model_weights
    z1, z2 = per_sample_noise(1, range(2)), per_sample_noise(2, range(2))
    for skips in ("zero", "keep"):
        decoder = DirectDecoder.from_teacher(teacher.diffusion.model, teacher.config, skips=skips).eval()
        with torch.no_grad():
            h2 = decoder.bottleneck(z2)
            swapped, plain2 = decoder(z1, hook=lambda h: h2), decoder(z2)
        if skips == "zero":
            assert torch.equal(swapped, plain2)
        else:
            assert (swapped - plain2).abs().max() > 0.1
    with pytest.raises(PipelineError, match="skips"):
        DirectDecoder(teacher.config, skips="some")


def test_global_attention_starts_as_identity_and_keeps_the_image_a_function_of_the_bottleneck(
        upstream_teacher_model_weights):
    teacher = upstream_teacher_model_weights
    plain = DirectDecoder.from_teacher(teacher.diffusion.model, teacher.config).eval()
    attn = DirectDecoder.from_teacher(teacher.diffusion.model, teacher.config, global_context="attention").eval()
    assert attn.model_args["global_context"] == "attention" and plain.context is None
    z1, z2 = per_sample_noise(1, range(2)), per_sample_noise(2, range(2))
    with torch.no_grad():
        assert torch.equal(attn(z1), plain(z1))  # zero output projection: an identity until trained
        torch.manual_seed(0)
        attn.context.proj.weight.normal_(0, 0.05)
        assert (attn.bottleneck(z1) - plain.bottleneck(z1)).abs().max() > 1e-3  # the block is on the encoder path
        h2 = attn.bottleneck(z2)
        assert torch.equal(attn(z1, hook=lambda h: h2), attn(z2))  # still decided by the bottleneck alone
    with pytest.raises(PipelineError, match="global_context"):
        DirectDecoder(teacher.config, global_context="everything")


def test_checkpoints_without_skips_record_load_with_the_teachers_skips(tiny_student, tmp_path):
    old = load_pt(tiny_student)
    old["model_args"].pop("skips")  # as written before the option existed
    torch.save(old, tmp_path / "old.pt")
    assert load_student(tmp_path / "old.pt").decoder.skips == "keep"
    assert load_student(tiny_student).decoder.skips == "zero"


# ---------------------------------------------------------------- hooks

def test_hook_acts_on_the_trained_students_bottleneck(tiny_student):
    decoder = load_student(tiny_student).decoder
    z = per_sample_noise(1, range(4))
    seen = []

    def spy(h):
        seen.append(h.clone())
        return h

    with torch.no_grad():
        plain = decoder(z)
        assert torch.equal(decoder(z, hook=spy), plain)
        assert len(seen) == 1 and seen[0].shape == (4, *decoder.bottleneck_shape)
        assert torch.equal(seen[0], decoder.bottleneck(z))
        image, pre, post = decoder.generate(z)
        assert torch.equal(pre, decoder.bottleneck(z)) and torch.equal(post, pre)
        assert torch.equal(image, plain)


def test_hooks_steer_a_teacher_initialised_decoder(upstream_teacher_model_weights):
    """The tiny models' eval-mode outputs barely depend on their input (an 8-step teacher's BatchNorm statistics),
    so steering is checked on the fixture teacher's trained (non-EMA) UNet, where the bottleneck matters."""
    teacher = upstream_teacher_model_weights
    decoder = DirectDecoder.from_teacher(teacher.diffusion.model, teacher.config).eval()
    z = per_sample_noise(1, range(3))
    doubled = lambda h: 2 * h  # noqa: E731
    with torch.no_grad():
        plain = decoder(z)
        assert torch.equal(decoder(z, hook=lambda h: h), plain)
        assert (decoder(z, hook=lambda h: h * 0) - plain).abs().max() > 1e-2, "hooks are not applied"
        image, pre, post = decoder.generate(z, hook=doubled)
        assert torch.equal(pre, decoder.bottleneck(z))  # the bottleneck before the hook
        assert torch.equal(post, 2 * pre)
        assert torch.allclose(image, decoder(z, hook=doubled), atol=1e-6)
        assert (image - plain).abs().max() > 1e-2


# ---------------------------------------------------------------- SIGKILL and resume

@pytest.fixture(scope="module")
def student_straight(tiny_teacher_ckpt, tiny_pairs, tmp_path_factory) -> Path:
    """An uninterrupted 4-epoch run (in this interpreter, through the API the script calls)."""
    from models.training.student import StudentTrainOptions, train_student
    out = tmp_path_factory.mktemp("student_straight") / "run"
    train_student(StudentTrainOptions(ddpm_ckpt=str(tiny_teacher_ckpt), data_path=str(tiny_pairs),
                                      output_dir=str(out), epochs=4, batch_size=8, lr=1e-3, cpu=True,
                                      evaluate=False))
    return out


@pytest.fixture(scope="module")
def student_killed(tiny_teacher_ckpt, tiny_pairs, tmp_path_factory) -> dict:
    """The same 4-epoch command in a subprocess, SIGKILLed as soon as ckpt_epoch_002.pt appears."""
    root = tmp_path_factory.mktemp("student_killed")
    out = root / "run"
    args = ["--ddpm_ckpt", str(tiny_teacher_ckpt), "--data_path", str(tiny_pairs), "--output_dir", str(out),
            *RESUME_ARGS]
    log = root / "killed.log"
    proc = start_logged([sys.executable, SCRIPT, *args], log, cwd=REPO)
    returncode = kill_when(proc, out / "ckpt_epoch_002.pt", 240, what="ckpt_epoch_002.pt", log=log)
    assert returncode == -signal.SIGKILL, f"the run was not killed (rc {returncode})"
    assert not (out / "ckpt_epoch_004.pt").exists(), \
        "the run reached epoch 4 before SIGKILL landed: the resume would not be exercised"
    return {"dir": out, "args": args}


def test_killed_run_leaves_whole_checkpoints(student_killed):
    out = student_killed["dir"]
    names = sorted(p.name for p in out.iterdir())
    epochs = sorted(int(m.group(1)) for m in map(EPOCH_CKPT.match, names) if m)
    assert epochs[:2] == [1, 2] and epochs[-1] < 4
    for name in names:
        assert not name.endswith(".tmp") or name.startswith("."), f"non-hidden partial file {name}"
    for epoch in epochs:
        assert load_pt(out / f"ckpt_epoch_{epoch:03d}.pt")["epoch"] == epoch


def test_resume_after_kill_is_bitwise_identical(student_killed, student_straight, tmp_path, train):
    work = tmp_path / "run"
    shutil.copytree(student_killed["dir"], work)
    last = max(int(m.group(1)) for m in map(EPOCH_CKPT.match, (p.name for p in work.iterdir())) if m)
    args = [a if a != str(student_killed["dir"]) else str(work) for a in student_killed["args"]]
    code, out, err = train(*args, "--resume")
    assert code == 0, err[-3000:]
    assert "resumed from" in out and f"epoch {last}/4" in out, out
    resumed, straight = load_pt(work / "ckpt_epoch_004.pt"), load_pt(student_straight / "ckpt_epoch_004.pt")
    assert resumed["epoch"] == straight["epoch"] == 4
    for key in ("model", "model_ema", "optimizer", "scheduler"):
        assert_identical(resumed[key], straight[key], key)
    assert resumed["val_loss"] == straight["val_loss"]
    # Not vacuous: the weights moved after epoch 2.
    two = load_pt(work / "ckpt_epoch_002.pt")
    assert not torch.equal(two["model"]["unet.final_conv.weight"], resumed["model"]["unet.final_conv.weight"])


def test_rerun_without_resume_is_refused(tiny_student, tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    work = tmp_path / "run"
    shutil.copytree(tiny_student.parent, work)
    # the output lock (.lock) records the pid of the last run that held it; everything else is left as it was
    before = {p.name: sha256(p) for p in work.iterdir() if p.name != ".lock"}
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", work,
                         "--epochs", 2, "--batch_size", 8, "--cpu", "--no_evaluate")
    assert code == 1
    assert "--resume" in one_error_line(err, allow_progress=True)
    assert {p.name: sha256(p) for p in work.iterdir() if p.name != ".lock"} == before


# ---------------------------------------------------------------- continuing a finished student

def test_init_from_continues_a_finished_student(tiny_student, tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    """A new leg starts from the finished student's weights (not the teacher's) and records where it came from."""
    leg = ["--data_path", tiny_pairs, "--epochs", 1, "--batch_size", 8, "--lr", "1e-12", "--cpu", "--no_evaluate"]
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--output_dir", tmp_path / "leg", "--init_from",
                         tiny_student, *leg)
    assert code == 0, err[-3000:]
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--output_dir", tmp_path / "fresh", *leg)
    assert code == 0, err[-3000:]
    init, cont = load_pt(tiny_student), load_pt(tmp_path / "leg" / "ckpt_epoch_001.pt")
    fresh = load_pt(tmp_path / "fresh" / "ckpt_epoch_001.pt")
    for name, weight in init["model"].items():
        if "running_" not in name and weight.is_floating_point():  # lr 1e-12: the weights stay where they were
            assert torch.allclose(cont["model"][name], weight, atol=1e-6), name
    assert abs(cont["val_loss"] - init["val_loss"]) < 0.05 * init["val_loss"]
    # Not vacuous: the same leg without --init_from starts from the teacher's weights, which are not these.
    name = "unet.final_conv.weight"
    assert (fresh["model"][name] - cont["model"][name]).abs().max() > 1e-4
    record = json.loads((tmp_path / "leg" / "training_options.json").read_text())["init_from"]
    assert record == {"path": str(tiny_student), "sha256": sha256(tiny_student), "epochs_before": 2,
                      "teacher_sha256": sha256(tiny_teacher_ckpt), "discriminator": "none",
                      "global_context": None}
    assert cont["config"]["init_from"]["epochs_before"] == 2


def test_init_from_adds_global_attention_as_an_identity(tiny_student, tiny_teacher_ckpt, tiny_pairs, tmp_path,
                                                        train):
    """--global_context attention on a student without it: the leg starts from exactly the student's function,
    the block is saved, recorded, and rebuilt by load_student from the checkpoint alone."""
    leg = ["--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--epochs", 1, "--batch_size", 8, "--lr",
           "1e-12", "--cpu", "--no_evaluate", "--init_from", tiny_student]
    code, _, err = train(*leg, "--output_dir", tmp_path / "leg", "--global_context", "attention")
    assert code == 0, err[-3000:]
    cont = load_pt(tmp_path / "leg" / "ckpt_epoch_001.pt")
    assert cont["model_args"]["global_context"] == "attention"
    assert {k for k in cont["model"] if k.startswith("context.")} >= {"context.qkv.weight", "context.proj.weight"}
    assert cont["config"]["init_from"]["global_context"] == "added"
    before, after = load_student(tiny_student).decoder, load_student(tmp_path / "leg" / "ckpt_epoch_001.pt").decoder
    assert before.context is None and after.context is not None
    init = load_pt(tiny_student)["model"]
    for name, weight in init.items():  # lr 1e-12: the student's weights stay, and the block stays the identity
        if "running_" not in name and weight.is_floating_point():
            assert torch.allclose(cont["model"][name], weight, atol=1e-6), name
    assert cont["model"]["context.proj.weight"].abs().max() < 1e-6
    after.context.proj.weight.zero_(), after.context.proj.bias.zero_()
    z = per_sample_noise(3, range(4))
    with torch.no_grad():  # an identity block: the same bottleneck as the encoder without it
        assert torch.equal(after.bottleneck(z), after.unet.encode(z, after._timestep(z))[0])
    # A student that has the block keeps it when continued without the flag.
    code, out, err = train(*leg[:-1], tmp_path / "leg" / "ckpt_epoch_001.pt", "--output_dir", tmp_path / "again")
    assert code == 0, err[-3000:]
    again = load_pt(tmp_path / "again" / "ckpt_epoch_001.pt")
    assert again["model_args"]["global_context"] == "attention"
    assert again["config"]["init_from"]["global_context"] == "continued"


def test_init_from_another_teachers_student_is_refused(tiny_student, tiny_teacher_ckpt, tiny_pairs, tmp_path,
                                                        train):
    other = load_pt(tiny_student)
    other["teacher"]["sha256"] = "0" * 64
    torch.save(other, tmp_path / "other.pt")
    args = ["--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--epochs", 1, "--cpu", "--no_evaluate"]
    code, _, err = train(*args, "--output_dir", tmp_path / "out", "--init_from", tmp_path / "other.pt")
    assert code == 1 and "--init_from_other_teacher" in one_error_line(err, allow_progress=True)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.pt"))
    code, _, err = train(*args, "--output_dir", tmp_path / "out", "--init_from", tmp_path / "missing.pt")
    assert code == 2 and "missing.pt" in one_error_line(err, allow_progress=True)


def test_init_from_other_teacher_warm_starts_a_retrained_teachers_student(tiny_student, tiny_teacher_ckpt, tiny_pairs,
                                                                          tmp_path, train):
    """Asked for, a student of another teacher with the same architecture is continued, and its teacher recorded;
    one of another architecture is still refused in one line, before any file is written."""
    other = load_pt(tiny_student)
    other["teacher"]["sha256"] = "0" * 64
    torch.save(other, tmp_path / "other.pt")
    args = ["--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--epochs", 1, "--batch_size", 8,
            "--lr", "1e-12", "--cpu", "--no_evaluate", "--init_from_other_teacher"]
    code, _, err = train(*args, "--output_dir", tmp_path / "leg", "--init_from", tmp_path / "other.pt")
    assert code == 0, err[-3000:]
    cont = load_pt(tmp_path / "leg" / "best_model.pt")
    assert cont["teacher"]["sha256"] == sha256(tiny_teacher_ckpt)
    assert cont["config"]["init_from"]["teacher_sha256"] == "0" * 64
    name = "unet.final_conv.weight"
    assert torch.allclose(cont["model"][name], other["model"][name], atol=1e-6)
    other["model_args"]["teacher"]["timesteps"] *= 2  # the same weights, but another teacher's schedule
    torch.save(other, tmp_path / "other_arch.pt")
    code, _, err = train(*args, "--output_dir", tmp_path / "refused", "--init_from", tmp_path / "other_arch.pt")
    assert code == 1 and "architecture" in one_error_line(err, allow_progress=True)
    assert not (tmp_path / "refused").exists()


# ---------------------------------------------------------------- bad inputs

def _write_pairs(src: Path, dst: Path, edit) -> Path:
    data = load_pt(src)
    edit(data)
    torch.save(data, dst)
    return dst


def test_data_from_another_teacher_is_refused(tiny_pairs, tiny_teacher_ckpt, tmp_path, train):
    def other_teacher(data):
        data["metadata"]["teacher_sha256"] = "0" * 64
    pairs = _write_pairs(tiny_pairs, tmp_path / "training_data.pt", other_teacher)
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", pairs, "--output_dir", tmp_path / "out",
                         "--epochs", 1, "--batch_size", 8, "--cpu", "--no_evaluate")
    assert code == 1
    assert "teacher" in one_error_line(err, allow_progress=True)
    assert not list((tmp_path / "out").glob("ckpt_epoch_*.pt"))


def test_missing_data_exits_2(tiny_teacher_ckpt, tmp_path, train):
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tmp_path / "none.pt", "--output_dir",
                         tmp_path / "out", "--epochs", 1, "--cpu", "--no_evaluate")
    assert code == 2
    assert "none.pt" in one_error_line(err, allow_progress=True)


def test_zero_epochs_exits_1(tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir",
                         tmp_path / "out", "--epochs", 0, "--cpu", "--no_evaluate")
    assert code == 1
    assert "epochs" in one_error_line(err, allow_progress=True)


def test_student_checkpoint_as_teacher_is_refused(tiny_student, tiny_pairs, tmp_path, train):
    code, _, err = train("--ddpm_ckpt", tiny_student, "--data_path", tiny_pairs, "--output_dir", tmp_path / "out",
                         "--epochs", 1, "--cpu", "--no_evaluate")
    assert code == 1
    assert "direct-decoder" in one_error_line(err, allow_progress=True)


def test_nan_loss_stops_without_a_checkpoint(tiny_pairs, tiny_teacher_ckpt, tmp_path, train):
    def poison(data):
        data["images"][:] = float("nan")
    pairs = _write_pairs(tiny_pairs, tmp_path / "training_data.pt", poison)
    out = tmp_path / "out"
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", pairs, "--output_dir", out,
                         "--epochs", 1, "--batch_size", 8, "--cpu", "--no_evaluate")
    assert code == 1
    assert "loss" in one_error_line(err, allow_progress=True)
    assert not (out / "ckpt_epoch_001.pt").exists() and not (out / "best_model.pt").exists()


# ---------------------------------------------------------------- evaluation

def test_evaluation_report(tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    out = tmp_path / "out"
    code, stdout, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", out,
                              "--epochs", 1, "--batch_size", 8, "--cpu")
    assert code == 0, err[-3000:]
    report = json.loads((out / "evaluation.json").read_text())
    mse = report["val_mse_to_teacher"]
    assert math.isfinite(mse) and mse >= 0
    # Clamping to the teacher's [-1, 1] range can only lower the error of best_model's EMA weights on the same
    # validation pairs, so the report cannot exceed the checkpoint's own validation loss.
    assert mse <= load_pt(out / "best_model.pt")["val_loss"] + 1e-6
    assert 0.0 <= report["class_agreement_student_teacher"] <= 1.0
    fd = report["frechet_distance"]
    for key in ("student_vs_real", "teacher_vs_real", "real_half_vs_real_half"):
        assert math.isfinite(fd[key]) and fd[key] >= 0, (key, fd[key])
    assert report["speed"]["student_images_per_s"] > 0
    assert report["teacher"]["sha256"] == sha256(tiny_teacher_ckpt)
    assert "evaluation" in stdout
    confident = report["class_agreement_where_teacher_confident"]
    assert confident["confidence_at_least"] == 0.9 and 0.0 <= confident["share_of_pairs"] <= 1.0
    assert (confident["agreement"] is None) == (confident["share_of_pairs"] == 0.0)
    assert report["training_data"]["is_the_students"] is True
    # The same scores in the audit classifier's space: another network, so other numbers, same meaning.
    audit = report["audit"]
    assert audit["classifier"]["sha256"] == sha256(AUDIT_CLASSIFIER) != report["classifier"]["sha256"]
    assert 0.0 <= audit["class_agreement_student_teacher"] <= 1.0
    assert all(math.isfinite(v) and v >= 0 for v in audit["frechet_distance"].values())
    assert audit["frechet_distance"]["student_vs_real"] != fd["student_vs_real"]
    assert audit["fd_ratio_student_over_teacher"] == pytest.approx(
        audit["frechet_distance"]["student_vs_real"] / audit["frechet_distance"]["teacher_vs_real"])

    # The same evaluation as its own command, on the same checkpoint: the same numbers (speed aside).
    again = tmp_path / "again"
    code, stdout, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", again,
                              "--evaluate_only", out / "best_model.pt", "--cpu")
    assert code == 0, err[-3000:]
    rerun = json.loads((again / "evaluation.json").read_text())
    for key in ("val_mse_to_teacher", "class_agreement_student_teacher", "class_agreement_where_teacher_confident",
                "frechet_distance", "student", "teacher", "training_data", "audit"):
        assert rerun[key] == report[key], key
    assert not list(again.glob("*.pt")), "--evaluate_only must not train"
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", again,
                         "--evaluate_only", tmp_path / "missing.pt", "--cpu")
    assert code == 2 and "missing.pt" in one_error_line(err)


def test_perceptual_loss_in_the_audit_classifiers_space_is_refused(tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    """A student trained against the audit classifier would make the audit scores meaningless."""
    copy = tmp_path / "renamed_audit.pt"
    shutil.copy(AUDIT_CLASSIFIER, copy)  # recognised by content, not by name
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", tmp_path / "o",
                         "--epochs", 1, "--batch_size", 8, "--perceptual_weight", 0.1, "--classifier", copy, "--cpu")
    assert code == 1 and "audit classifier" in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_batchnorm_recalibration_gives_exact_statistics():
    """The EMA model is evaluated and saved with BatchNorm statistics recomputed over training latents: the exact
    mean and (unbiased) variance of each channel's input, whatever the running averages said before."""
    from models.nets.unet import recalibrate_batchnorm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3)).eval()
    model[1].running_mean.fill_(5.0)  # stale statistics, as after fast-moving training
    x = torch.randn(24, 1, 8, 8) * 2 + 1
    recalibrate_batchnorm(model, x, batch_size=8)
    with torch.no_grad():
        act = model[0](x)
    torch.testing.assert_close(model[1].running_mean, act.mean((0, 2, 3)))
    # cumulative average of the three batches' unbiased variances (equal batch sizes)
    per_batch = torch.stack([act[i:i + 8].transpose(0, 1).flatten(1).var(1) for i in (0, 8, 16)]).mean(0)
    torch.testing.assert_close(model[1].running_var, per_batch)
    assert not model.training and model[1].momentum == 0.1


# ---------------------------------------------------------------- more pairs than one generation run

@pytest.fixture(scope="module")
def more_pairs(tiny_teacher_ckpt, tmp_path_factory):
    """Pairs of a new noise seed (1), and pairs that reuse the tiny pairs' seed (0) with another count (made in this
    interpreter: the command line of generate_training_data.py is tested in tests/test_generate.py)."""
    from models.stages.generate import GenerateOptions, generate_training_data
    made = {}
    for name, seed, n in (("seed1", 1, 24), ("seed0_again", 0, 24)):
        out = tmp_path_factory.mktemp(name)
        generate_training_data(GenerateOptions(ckpt=str(tiny_teacher_ckpt), output_dir=str(out), n_samples=n,
                                               batch_size=8, steps=5, spacing="leading", seed=seed, cpu=True))
        made[name] = out / "training_data.pt"
    return made


def test_several_pair_files_are_merged_and_recorded(tiny_teacher_ckpt, tiny_pairs, more_pairs, tmp_path, train,
                                                    monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, more_pairs["seed1"], "--output_dir", out,
            "--epochs", "1", "--batch_size", "8", "--cpu", "--no_evaluate"]
    code, stdout, err = train(*args, "--dry-run")
    assert code == 0, err[-3000:]
    assert json.loads(stdout)["n_pairs"] == 64 and not out.exists()
    code, _, err = train(*args)
    assert code == 0, err[-3000:]
    merged, first, second = load_pt(out / "training_data.pt"), load_pt(tiny_pairs), load_pt(more_pairs["seed1"])
    assert merged["n_samples"] == 64 and merged["kind"] == "training_pairs"
    assert torch.equal(merged["noise"], torch.cat([first["noise"], second["noise"]]))
    assert torch.equal(merged["images"], torch.cat([first["images"], second["images"]]))
    assert [(s["sha256"], s["seed"], s["n"]) for s in merged["metadata"]["merged_from"]] == [
        (sha256(tiny_pairs), 0, 40), (sha256(more_pairs["seed1"]), 1, 24)]
    ckpt = load_pt(out / "ckpt_epoch_001.pt")
    assert ckpt["training_data"]["path"] == str(out / "training_data.pt")
    assert ckpt["training_data"]["sha256"] == sha256(out / "training_data.pt")
    assert ckpt["config"]["n_pairs"] == 64
    # The generalization bench regenerates each merged pair from its own file's seed: its trained-on MSE is the MSE
    # to the merged file's teacher images at the same indices.
    code, _, err = run_main_in_process(REPO / "bench" / "bench_student_generalization.py",
                                       ["--ddpm_ckpt", tiny_teacher_ckpt, "--decoder_ckpt", out / "ckpt_epoch_001.pt",
                                        "--n", 6, "--record", tmp_path / "gen.jsonl", "--cpu"], monkeypatch, capsys)
    assert code == 0, err[-3000:]
    record = json.loads((tmp_path / "gen.jsonl").read_text().splitlines()[-1])
    assert record["pairs_seeds"] == [0, 1]
    idx = sorted(int(i) for i in student_split(64, 0.1, 0)[0][:6])  # 6: as many as the validation split holds
    assert max(idx) >= 40, "the check must cover the second file"
    student = load_student(out / "ckpt_epoch_001.pt").decoder
    with torch.no_grad():
        pred = student(merged["noise"][idx]).float().clamp(-1, 1)
    assert record["trained_on"]["mse_to_teacher"] == pytest.approx(
        ((pred - merged["images"][idx]) ** 2).mean().item(), rel=1e-4)
    # Files that would hold the same noises twice are refused in one line, and nothing is merged.
    for name, files, message in (("same_seed", [tiny_pairs, more_pairs["seed0_again"]], "share noise seed 0"),
                                 ("twice", [tiny_pairs, tiny_pairs], "same pairs file twice")):
        code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", *files, "--output_dir", tmp_path / name,
                             "--epochs", "1", "--cpu", "--no_evaluate")
        assert code == 1 and message in one_error_line(err), err[-2000:]
        assert not (tmp_path / name).exists(), "refused before the output directory is made"


def test_evaluation_holds_out_every_pair_of_a_new_seed(tiny_teacher_ckpt, tiny_student, tiny_pairs, more_pairs,
                                                       tmp_path, train):
    """Pairs of a seed the student never saw are all held out; pairs that share its noises are refused."""
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", more_pairs["seed1"], "--output_dir",
                         tmp_path / "new", "--evaluate_only", tiny_student, "--cpu")
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "new" / "evaluation.json").read_text())
    assert report["n_val"] == 24 and report["held_out"].startswith("all pairs")
    assert report["training_data"]["is_the_students"] is False
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir",
                         tmp_path / "own", "--evaluate_only", tiny_student, "--cpu")
    assert code == 0, err[-3000:]
    own = json.loads((tmp_path / "own" / "evaluation.json").read_text())
    assert own["n_val"] == 4 and own["held_out"].startswith("validation split")
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", more_pairs["seed0_again"], "--output_dir",
                         tmp_path / "shared", "--evaluate_only", tiny_student, "--cpu")
    assert code == 1 and "shares noises" in one_error_line(err, allow_progress=True)
