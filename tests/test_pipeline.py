"""run_pipeline.py (the README's main command): all four stages in order, the report with every stage's figures,
numbers and wall time, and a rerun that skips finished stages. On the tiny teacher (T = 50) with tiny sizes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import models.evaluation.evaluate
import models.stages.attribution
import models.stages.features
import models.stages.pipeline
from models.data.pairs import noise_seeds
from helpers import every_nth_image, load_pt, sha256, use_cached_mnist5k
from models.io.errors import PipelineError
from models.stages.pipeline import STAGES, run_pipeline

REPO = Path(__file__).resolve().parents[1]
# The stages read every 10th mnist5k image (500, 50 of each class): extraction, attribution and the evaluation's real
# images scale with the dataset, and nothing asserted here depends on its size.
EVERY_NTH = 10

TINY = {"n_pairs": 60, "ddim_steps": 5, "gen_batch": 8, "epochs": 2, "train_batch": 8, "lr": 1e-3,
        "perceptual_weight": 0.05, "encoder_steps": 3, "feature_batch": 1000, "n_attr": 4, "n_eval": 8}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_teacher_ckpt, mnist5k):
    mp = pytest.MonkeyPatch()
    mp.setitem(models.stages.pipeline.PRESETS, "tiny", TINY)
    for module in (models.stages.features, models.stages.attribution, models.evaluation.evaluate):
        use_cached_mnist5k(mp, module, every_nth_image(mnist5k, EVERY_NTH))
    out = tmp_path_factory.mktemp("pipeline") / "tiny"
    try:
        state = run_pipeline("tiny", str(out), str(tiny_teacher_ckpt), cpu=True)
        rerun = run_pipeline("tiny", str(out), str(tiny_teacher_ckpt), cpu=True)
    finally:
        mp.undo()
    return out, state, rerun


def test_every_stage_ran_and_wrote_its_product(tiny_run):
    out, state, _ = tiny_run
    assert list(state["stages"]) == list(STAGES)
    assert all(v["wall_s"] > 0 for v in state["stages"].values())
    for product in ("data/training_data.pt", "student/best_model.pt", "student/evaluation.json",
                    "reference_features.pt", "attribution/attribution_report.json", "attribution/attribution_grid.png",
                    "report.md", "pipeline_state.json"):
        assert (out / product).is_file(), product
    assert json.loads((out / "pipeline_state.json").read_text()) == state
    assert load_pt(out / "student" / "best_model.pt")["config"]["options"]["perceptual_weight"] == 0.05


def test_report_shows_times_numbers_and_existing_figures(tiny_run):
    out, state, _ = tiny_run
    report = (out / "report.md").read_text()
    for stage in STAGES:
        assert re.search(rf"\| {stage} \| {state['stages'][stage]['wall_s']:.1f} \|", report), stage
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(figures) >= 7
    missing = [f for f in figures if not (out / f).is_file()]
    assert not missing, missing
    evaluation = json.loads((out / "student" / "evaluation.json").read_text())
    assert f"{evaluation['class_agreement_student_teacher']:.1%}" in report
    audit_fd = evaluation["audit"]["frechet_distance"]["student_vs_real"]
    assert re.search(rf"\| audit classifier: Frechet distance [^|]*\| {audit_fd:.2f} / ", report)
    assert "consistency (a)" in report and "image_encoder" in report


def test_rerun_skips_finished_stages(tiny_run):
    out, state, rerun = tiny_run
    assert rerun == state  # nothing ran again: the recorded wall times are the first run's


def test_a_preset_can_continue_a_student_on_pairs_of_an_unseen_seed(tmp_path, tiny_teacher_ckpt, tiny_student,
                                                                     mnist5k):
    """The demo's shape: continue a finished student (init_from) on pairs of another seed, from the teacher sampler
    it learned (its K wins over the preset's), with the preset's losses, and say so."""
    preset = TINY | {"init_from": str(tiny_student), "pairs_seed": 5, "epochs": 1, "val_fraction": 0.2,
                     "gen_channels_last": True, "ddim_steps": 3, "adv_weight": 1.5, "class_weight": 0.05}
    mp = pytest.MonkeyPatch()
    mp.setitem(models.stages.pipeline.PRESETS, "tiny_continue", preset)
    for module in (models.stages.features, models.stages.attribution, models.evaluation.evaluate):
        use_cached_mnist5k(mp, module, every_nth_image(mnist5k, EVERY_NTH))
    out = tmp_path / "run"
    try:
        run_pipeline("tiny_continue", str(out), str(tiny_teacher_ckpt), cpu=True)
    finally:
        mp.undo()
    pairs = load_pt(out / "data" / "training_data.pt")
    assert pairs["metadata"]["seed"] == 5 and pairs["n_samples"] == TINY["n_pairs"]
    learned = load_pt(tiny_student)["config"]["training_data"]["metadata"]
    assert (pairs["metadata"]["steps"], pairs["metadata"]["spacing"]) == (learned["steps"], learned["spacing"]) \
        == (5, "leading")
    options = json.loads((out / "student" / "training_options.json").read_text())
    assert options["init_from"]["sha256"] == sha256(tiny_student)
    assert options["init_from"]["epochs_before"] == load_pt(tiny_student)["epoch"]
    assert options["n_val"] == int(0.2 * TINY["n_pairs"])
    assert (options["options"]["adv_weight"], options["options"]["class_weight"]) == (1.5, 0.05)  # the preset's losses
    report = (out / "report.md").read_text()
    assert f"continues `{tiny_student}`" in report and "of seed 5, which it had never seen" in report


def test_continuing_preset_with_another_teacher_says_which_preset_to_use(tmp_path, tiny_teacher_ckpt):
    """The shipped demo continues the shipped student; with your own teacher it must point at demo_from_teacher."""
    with pytest.raises(PipelineError) as err:
        run_pipeline("demo", str(tmp_path / "out"), str(tiny_teacher_ckpt), cpu=True)
    assert "--preset demo_from_teacher" in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == 1
    assert not (tmp_path / "out").exists()


def test_shipped_presets_are_consistent():
    """The demo continues the shipped student with the losses of its last leg (so its pictures keep the shipped
    student's quality), on pairs of a seed it never trained on."""
    from models.io.paths import DEFAULT_STUDENT
    demo = models.stages.pipeline.PRESETS["demo"]
    assert demo["init_from"] == DEFAULT_STUDENT
    last_leg = load_pt(DEFAULT_STUDENT)["config"]["options"]
    for weight in ("perceptual_weight", "class_weight", "adv_weight"):
        assert demo.get(weight, 0.0) == last_leg.get(weight, 0.0), weight  # options older runs lacked were 0
    # The seeds of its pairs, from the commands that made it and the student it continues (only the last leg's pairs
    # are in the checkpoint).
    made_by = json.loads((REPO / "checkpoints" / "MANIFEST.json").read_text())["checkpoints/student_mnist5k.pt"]
    seen = {int(seed) for seed in re.findall(r"generate_training_data\.py [^&]*--seed (\d+)", made_by["produced_by"])}
    assert {0, 1, 2} <= seen
    last_pairs = noise_seeds(load_pt(DEFAULT_STUDENT)["config"]["training_data"]["metadata"])
    assert last_pairs and last_pairs <= seen
    assert demo["pairs_seed"] not in seen
    assert not models.stages.pipeline.PRESETS["demo_from_teacher"].get("init_from")
