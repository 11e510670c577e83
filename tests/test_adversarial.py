"""The adversarial and class terms of train_direct_decoder.py: the hinge losses, a discriminator that learns,
what the run records, bit-exact resume with the discriminator, and refusal of the audit classifier."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import models.evaluation.evaluate
import models.training.student
from helpers import (assert_identical, every_nth_image, load_pt, one_error_line, run_main_in_process,
                     use_cached_mnist5k)
from models.io.paths import AUDIT_CLASSIFIER
from models.nets.discriminator import Discriminator
from models.training.adversarial import discriminator_hinge_loss, generator_hinge_loss, AdversarialTerm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_direct_decoder.py"
ADV_ARGS = ["--epochs", "2", "--batch_size", "8", "--lr", "1e-3", "--cpu", "--no_evaluate", "--adv_weight", "0.1",
            "--class_weight", "0.2", "--disc_width", "8", "--adv_real", "both"]


@pytest.fixture
def train(monkeypatch, capsys, mnist5k):
    use_cached_mnist5k(monkeypatch, models.evaluation.evaluate, mnist5k)
    monkeypatch.setattr("models.data.datasets.load_dataset", lambda *a, **k: mnist5k)
    return lambda *args: run_main_in_process(SCRIPT, args, monkeypatch, capsys)


def test_hinge_losses_pinned():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # real: relu(1-2)=0, relu(0.5)=0.5, relu(2)=2 -> 2.5/3; fake: relu(-1)=0, relu(1)=1, relu(2.5)=2.5 -> 3.5/3
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(2.5 / 3 + 3.5 / 3)
    assert generator_hinge_loss(fake).item() == pytest.approx(0.5 / 3)  # -(mean of -2, 0, 1.5)


def test_discriminator_learns_to_separate_real_from_fake():
    torch.manual_seed(0)
    real = torch.full((64, 1, 28, 28), -1.0)
    real[:, :, 8:20, 12:16] = 1.0                      # a bar: "digits"
    term = AdversarialTerm(real, width=8, lr=2e-3, max_shift=2, device="cpu")
    fake = torch.rand(16, 1, 28, 28) * 2 - 1           # noise: "student images"
    gen = torch.Generator().manual_seed(0)
    first = term.discriminator_step(fake, gen)
    for _ in range(40):
        last = term.discriminator_step(fake, gen)
    assert last < first - 0.5, (first, last)
    with torch.no_grad():
        term.discriminator.eval()
        assert term.discriminator(real[:16]).mean() > term.discriminator(fake).mean() + 1.0
    # The generator's loss is high where the discriminator says fake, and its gradient reaches the images only.
    images = fake.clone().requires_grad_(True)
    loss = term.generator_loss(images, gen)
    loss.backward()
    assert loss.item() > 0 and images.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in term.discriminator.parameters())


def test_discriminator_is_28x28_to_one_score():
    assert Discriminator(8)(torch.zeros(5, 1, 28, 28)).shape == (5,)


@pytest.fixture(scope="module")
def adversarial_run(tiny_teacher_ckpt, tiny_pairs, tmp_path_factory, mnist5k_module):
    out = tmp_path_factory.mktemp("adv") / "run"
    opts = models.training.student.StudentTrainOptions(
        ddpm_ckpt=str(tiny_teacher_ckpt), data_path=str(tiny_pairs), output_dir=str(out), epochs=2, batch_size=8,
        lr=1e-3, cpu=True, evaluate=False, adv_weight=0.1, class_weight=0.2, disc_width=8, adv_real="both")
    models.training.student.train_student(opts)
    return out


@pytest.fixture(scope="module")
def mnist5k_module(mnist5k):
    mp = pytest.MonkeyPatch()
    mp.setattr("models.data.datasets.load_dataset", lambda *a, **k: mnist5k)
    yield mnist5k
    mp.undo()


def test_adversarial_run_records_its_terms(adversarial_run):
    stats = [json.loads(line) for line in (adversarial_run / "stats.jsonl").read_text().splitlines()]
    assert [s["epoch"] for s in stats] == [1, 2]
    for s in stats:
        for key in ("train_pixel", "train_class", "train_adv", "train_adv_scale", "train_disc", "val_fd"):
            assert key in s and s[key] == s[key], key  # present and not NaN
        assert s["val_fd"] >= 0 and s["train_disc"] >= 0
    ckpt = load_pt(adversarial_run / "ckpt_epoch_002.pt")
    assert ckpt["selected_by"] == "val_fd"
    assert ckpt["best_score"] == min(s["val_fd"] for s in stats)
    assert set(ckpt["discriminator"]) == {"model", "optimizer", "width"} and ckpt["discriminator"]["width"] == 8
    opts = ckpt["config"]["options"]
    assert opts["adv_weight"] == 0.1 and opts["class_weight"] == 0.2 and opts["adv_real"] == "both"
    best = load_pt(adversarial_run / "best_model.pt")
    assert best["epoch"] == min(stats, key=lambda s: s["val_fd"])["epoch"]


def test_adversarial_resume_is_bitwise_identical(adversarial_run, tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    """Epoch 2 replayed from epoch 1's checkpoint: student, EMA, both optimizers and the discriminator identical."""
    work = tmp_path / "run"
    shutil.copytree(adversarial_run, work)
    (work / "ckpt_epoch_002.pt").unlink()
    code, out, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", work,
                           *ADV_ARGS, "--resume")
    assert code == 0, err[-3000:]
    assert "epoch 1/2" in out
    resumed, straight = load_pt(work / "ckpt_epoch_002.pt"), load_pt(adversarial_run / "ckpt_epoch_002.pt")
    for key in ("model", "model_ema", "optimizer", "discriminator"):
        assert_identical(resumed[key], straight[key], key)
    one = load_pt(work / "ckpt_epoch_001.pt")
    assert not torch.equal(one["discriminator"]["model"]["head.parametrizations.weight.original"],
                           resumed["discriminator"]["model"]["head.parametrizations.weight.original"])


def test_resuming_a_regression_run_with_the_adversarial_term_is_refused(tiny_student, tiny_teacher_ckpt, tiny_pairs,
                                                                       tmp_path, train):
    work = tmp_path / "run"
    shutil.copytree(tiny_student.parent, work)
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", work,
                         "--epochs", "2", "--batch_size", "8", "--lr", "1e-3", "--cpu", "--no_evaluate",
                         "--adv_weight", "0.1", "--disc_width", "8", "--resume")
    assert code == 1
    assert "without the adversarial term" in one_error_line(err, allow_progress=True)


@pytest.mark.parametrize("flags, message", [
    (["--class_weight", "0.5", "--classifier", "AUDIT"], "audit classifier"),
    (["--adv_weight", "-1"], "--adv_weight"),
    (["--adv_weight", "0.1", "--disc_lr", "0"], "--disc_lr"),
    (["--adv_weight", "0.1", "--disc_width", "0"], "--disc_width"),
])
def test_bad_adversarial_options_exit_1(flags, message, tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    if "AUDIT" in flags:
        copy = tmp_path / "renamed_audit.pt"
        shutil.copy(AUDIT_CLASSIFIER, copy)
        flags = [str(copy) if f == "AUDIT" else f for f in flags]
    code, _, err = train("--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--output_dir", tmp_path / "o",
                         "--epochs", "1", "--cpu", *flags)
    assert code == 1 and message in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_student_quality_bench_reports_the_audit_figures(tiny_student, tiny_teacher_ckpt, tiny_pairs, tmp_path,
                                                        monkeypatch, capsys, mnist5k):
    """One row per student, with the audit classifier's ratio and both recalls, from the same held-out pairs (real
    images: every 10th of mnist5k, as tests/test_student.py evaluates)."""
    use_cached_mnist5k(monkeypatch, models.evaluation.evaluate, every_nth_image(mnist5k, 10))
    record = tmp_path / "quality.jsonl"
    code, out, err = run_main_in_process(REPO / "bench" / "bench_student_quality.py",
                                         ["--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--students",
                                          tiny_student, tiny_student, "--record", record, "--cpu"], monkeypatch, capsys)
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["student_sha256"] == rows[1]["student_sha256"]
    row = rows[0]
    assert row["audit_fd_ratio"] == pytest.approx(row["audit_fd_student"] / row["audit_fd_teacher"])
    assert 0 <= row["audit_recall_student"] <= 1 and 0 <= row["audit_recall_teacher"] <= 1
    assert 0 <= row["audit_class_agreement"] <= 1 and row["speedup_vs_default_ddim50"] > 0
    assert 0 <= row["audit_share_teacher_confident"] <= 1
    confident = row["audit_class_agreement_where_teacher_confident"]
    assert (confident is None) == (row["audit_share_teacher_confident"] == 0)
    assert {k: v for k, v in rows[0].items() if "speedup" not in k} == \
        {k: v for k, v in rows[1].items() if "speedup" not in k}  # deterministic apart from timing
    assert "audit FD" in out


def _disc_weights(ckpt: dict) -> dict:
    """Learned tensors only (spectral norm's power-iteration vectors _u/_v move on every forward pass)."""
    return {k: v for k, v in ckpt["discriminator"]["model"].items() if not k.endswith(("._u", "._v"))}


def test_init_from_continues_the_discriminator(adversarial_run, tiny_teacher_ckpt, tiny_pairs, tmp_path, train):
    """A new adversarial leg keeps the init checkpoint's discriminator (a fresh one made the student worse every
    epoch); --fresh_discriminator starts a new one; each leg records which."""
    init = load_pt(adversarial_run / "best_model.pt")
    leg = ["--ddpm_ckpt", tiny_teacher_ckpt, "--data_path", tiny_pairs, "--init_from", adversarial_run / "best_model.pt",
           "--epochs", "1", "--batch_size", "8", "--lr", "1e-12", "--disc_lr", "1e-12", "--cpu", "--no_evaluate",
           "--adv_weight", "0.1"]
    for name, extra in (("kept", []), ("fresh", ["--fresh_discriminator"])):
        code, _, err = train(*leg, "--disc_width", "8", *extra, "--output_dir", tmp_path / name)
        assert code == 0, err[-3000:]
    kept, fresh = load_pt(tmp_path / "kept" / "ckpt_epoch_001.pt"), load_pt(tmp_path / "fresh" / "ckpt_epoch_001.pt")
    assert kept["config"]["init_from"]["discriminator"] == "continued"
    assert fresh["config"]["init_from"]["discriminator"] == "fresh"
    before = _disc_weights(init)
    for key, weight in _disc_weights(kept).items():  # disc_lr 1e-12: still the init's discriminator
        assert torch.allclose(weight, before[key], atol=1e-6), key
    assert any((weight - before[key]).abs().max() > 1e-3 for key, weight in _disc_weights(fresh).items())
    # Another width cannot continue it: one line, exit 1.
    code, _, err = train(*leg, "--disc_width", "16", "--output_dir", tmp_path / "wide")
    assert code == 1 and "--fresh_discriminator" in one_error_line(err, allow_progress=True)
