"""The from-teacher recipe of train_direct_decoder.py: a regression phase, then the adversarial phase (adversarial and
class terms, its own perceptual weight and learning rate, a discriminator warm-up); what each epoch records, the
recipe in the checkpoint, and --resume bit-exact across the phase boundary."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import models.evaluation.evaluate
from helpers import assert_identical, every_nth_image, load_pt, one_error_line, run_main_in_process, use_cached_mnist5k
from models.training.student import (StudentTrainOptions, TrainingPhase, phase_of, phased_lr_factor,
                                     train_student, training_phases)
from models.training.optim import warmup_cosine

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_direct_decoder.py"
# 40 tiny pairs: 36 train, 5 steps per epoch. Epoch 1 regression; epochs 2-3 adversarial, whose first 5 steps (all of
# epoch 2) train the discriminator alone.
PHASED_ARGS = ["--epochs", "3", "--batch_size", "8", "--lr", "1e-3", "--cpu", "--no_evaluate", "--adv_weight", "0.1",
               "--adv_start_epoch", "1", "--adv_lr", "2e-4", "--perceptual_weight", "0.05",
               "--adv_perceptual_weight", "0", "--class_weight", "0.2", "--disc_warmup_steps", "5",
               "--disc_width", "8"]


def test_phases_of_each_kind_of_run():
    assert training_phases(StudentTrainOptions(epochs=4, lr=1e-3, perceptual_weight=0.05)) == [
        TrainingPhase("regression", 0, 4, 1e-3, 0.05, 0.0, 0.0)]
    # A continued student: every term from the first step, --adv_lr unused.
    assert training_phases(StudentTrainOptions(epochs=4, lr=1e-4, adv_weight=2.0, class_weight=0.05, adv_lr=1e-3,
                                               perceptual_weight=0.05)) == [
        TrainingPhase("adversarial", 0, 4, 1e-4, 0.05, 0.05, 2.0)]
    # From a teacher: the class term waits for the adversarial phase; the perceptual weight switches.
    phases = training_phases(StudentTrainOptions(epochs=10, lr=1e-3, adv_weight=2.0, adv_start_epoch=4,
                                                 adv_lr=1e-4, perceptual_weight=0.05, adv_perceptual_weight=0.0,
                                                 class_weight=0.05, disc_warmup_steps=100))
    assert phases == [TrainingPhase("regression", 0, 4, 1e-3, 0.05, 0.0, 0.0),
                      TrainingPhase("adversarial", 4, 10, 1e-4, 0.0, 0.05, 2.0, 100)]
    assert [phase_of(phases, e).name for e in range(10)] == ["regression"] * 4 + ["adversarial"] * 6


def test_each_phase_has_its_own_warm_up_and_cosine():
    phases = [TrainingPhase("regression", 0, 2, 1e-3, 0, 0, 0), TrainingPhase("adversarial", 2, 5, 2e-4, 0, 0, 1)]
    factor = phased_lr_factor(phases, steps_per_epoch=10, base_lr=1e-3)
    first, second = warmup_cosine(20), warmup_cosine(30)
    assert [factor(s) for s in range(20)] == [first(s) for s in range(20)]
    assert [factor(s) for s in range(20, 50)] == pytest.approx([0.2 * second(s) for s in range(30)])
    assert factor(19) < 0.01 and factor(20) == pytest.approx(0.2 / 2)  # the restart: warm-up over 2 steps of 30
    assert max(factor(s) for s in range(20, 50)) == pytest.approx(0.2)


@pytest.fixture(scope="module")
def mnist500(mnist5k):
    """The discriminator's real digits and the val FD's real images: every 10th (the assertions need no more)."""
    return every_nth_image(mnist5k, 10)


@pytest.fixture
def train(monkeypatch, capsys, mnist500):
    use_cached_mnist5k(monkeypatch, models.evaluation.evaluate, mnist500)
    monkeypatch.setattr("models.data.datasets.load_dataset", lambda *a, **k: mnist500)
    return lambda *args: run_main_in_process(SCRIPT, args, monkeypatch, capsys)


@pytest.fixture(scope="module")
def phased_run(tiny_teacher_ckpt, tiny_pairs, tmp_path_factory, mnist500):
    mp = pytest.MonkeyPatch()
    mp.setattr("models.data.datasets.load_dataset", lambda *a, **k: mnist500)
    out = tmp_path_factory.mktemp("phased") / "run"
    try:
        train_student(StudentTrainOptions(
            ddpm_ckpt=str(tiny_teacher_ckpt), data_path=str(tiny_pairs), output_dir=str(out), epochs=3, batch_size=8,
            lr=1e-3, cpu=True, evaluate=False, adv_weight=0.1, adv_start_epoch=1, adv_lr=2e-4, perceptual_weight=0.05,
            adv_perceptual_weight=0.0, class_weight=0.2, disc_warmup_steps=5, disc_width=8))
    finally:
        mp.undo()
    return out


def test_each_epoch_records_its_phase_and_terms(phased_run):
    stats = [json.loads(line) for line in (phased_run / "stats.jsonl").read_text().splitlines()]
    assert [s["phase"] for s in stats] == ["regression", "adversarial", "adversarial"]
    regression, warm_up, adversarial = stats
    assert "train_perceptual" in regression and not {"train_class", "train_disc", "train_adv"} & set(regression)
    # The discriminator's warm-up epoch: it learns, the student gets no adversarial term yet; no perceptual term.
    assert "train_disc" in warm_up and "train_class" in warm_up and "train_adv" not in warm_up
    assert "train_perceptual" not in warm_up
    assert {"train_disc", "train_adv", "train_class"} <= set(adversarial) and "train_perceptual" not in adversarial
    # The rate after each epoch's last step: the adversarial phase restarted at 2e-4 and decays from there.
    assert regression["lr"] == pytest.approx(2e-4) and adversarial["lr"] < warm_up["lr"] <= 2e-4
    assert all(math.isfinite(s["val_fd"]) for s in stats)


def test_the_recipe_is_recorded_and_read_back(phased_run, tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    ckpt = load_pt(phased_run / "ckpt_epoch_003.pt")
    expected = [{"name": "regression", "first_epoch": 0, "last_epoch": 1, "lr": 1e-3, "perceptual_weight": 0.05,
                 "class_weight": 0.0, "adv_weight": 0.0, "disc_warmup_steps": 0},
                {"name": "adversarial", "first_epoch": 1, "last_epoch": 3, "lr": 2e-4, "perceptual_weight": 0.0,
                 "class_weight": 0.2, "adv_weight": 0.1, "disc_warmup_steps": 5}]
    assert ckpt["config"]["phases"] == expected
    assert json.loads((phased_run / "training_options.json").read_text())["phases"] == expected
    code, out, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir",
                           tmp_path / "plan", *PHASED_ARGS, "--dry-run")
    assert code == 0, err[-2000:]
    assert json.loads(out[out.index("{"):])["phases"] == expected
    assert not (tmp_path / "plan").exists()


def test_resume_across_the_phase_boundary_is_bitwise_identical(phased_run, tiny_teacher_ckpt, tiny_pairs, tmp_path,
                                                               train):
    """Killed after the regression epoch: the rerun enters the adversarial phase (fresh discriminator, restarted lr,
    its warm-up) exactly as the straight run did."""
    work = tmp_path / "run"
    shutil.copytree(phased_run, work)
    for epoch in (2, 3):
        (work / f"ckpt_epoch_{epoch:03d}.pt").unlink()
    code, out, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", work,
                           *PHASED_ARGS, "--resume")
    assert code == 0, err[-3000:]
    assert "adversarial phase" in out
    resumed, straight = load_pt(work / "ckpt_epoch_003.pt"), load_pt(phased_run / "ckpt_epoch_003.pt")
    for key in ("model", "model_ema", "optimizer", "scheduler", "discriminator"):
        assert_identical(resumed[key], straight[key], key)


def test_resume_with_another_recipe_is_refused(phased_run, tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    work = tmp_path / "run"
    shutil.copytree(phased_run, work)
    (work / "ckpt_epoch_003.pt").unlink()
    args = [a if a != "2e-4" else "3e-4" for a in PHASED_ARGS]
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", work, *args,
                         "--resume")
    assert code == 1 and "another recipe" in one_error_line(err, allow_progress=True)
    assert not (work / "ckpt_epoch_003.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--adv_weight", "0.1", "--adv_start_epoch", "2"], "no adversarial epoch"),
    (["--adv_weight", "0.1", "--adv_start_epoch", "1", "--adv_lr", "0"], "--adv_lr"),
    (["--adv_weight", "0.1", "--adv_perceptual_weight", "-1"], "--adv_perceptual_weight"),
    (["--adv_weight", "0.1", "--disc_warmup_steps", "-1"], "--disc_warmup_steps"),
])
def test_bad_phase_options_exit_1(flags, message, tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", tmp_path / "o",
                         "--epochs", "2", "--cpu", *flags)
    assert code == 1 and message in one_error_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("preset", ["demo_from_teacher", "overnight", "full"])
def test_presets_from_a_teacher_carry_the_recipe(preset, tmp_path, capsys):
    """--dry-run prints the recipe: regression with the perceptual term, then the adversarial phase with the class
    term and without the perceptual one, at a lower rate, after the discriminator's warm-up."""
    from models.stages.pipeline import run_pipeline
    from models.io.paths import DEFAULT_TEACHER
    plan = run_pipeline(preset, str(tmp_path / "out"), DEFAULT_TEACHER, cpu=True, dry_run=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed["recipe"] == plan["recipe"]
    regression, adversarial = plan["recipe"]
    assert (regression["name"], adversarial["name"]) == ("regression", "adversarial")
    assert regression["perceptual_weight"] > 0 and regression["adv_weight"] == regression["class_weight"] == 0
    assert adversarial["adv_weight"] > 0 and adversarial["class_weight"] > 0 and adversarial["perceptual_weight"] == 0
    assert adversarial["lr"] < regression["lr"] and adversarial["disc_warmup_steps"] > 0
    assert regression["last_epoch"] == adversarial["first_epoch"] and adversarial["last_epoch"] == \
        plan["settings"]["epochs"]
    assert plan["teacher_sampler"]["steps"] == 25 and plan["teacher_sampler"]["spacing"] == "leading"
    assert not (tmp_path / "out").exists()
