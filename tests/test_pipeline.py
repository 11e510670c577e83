"""run_pipeline.py (the README's main command): all four stages in order, the report with every stage's figures,
numbers and wall time, and a rerun that skips finished stages. On the tiny teacher (T = 50) with tiny sizes."""
from __future__ import annotations

import json
import re

import pytest

import models.attribution
import models.evaluate
import models.features
import models.pipeline
from helpers import load_pt, use_cached_mnist5k
from models.pipeline import STAGES, run_pipeline

TINY = {"n_pairs": 60, "ddim_steps": 5, "gen_batch": 8, "epochs": 2, "train_batch": 8, "lr": 1e-3,
        "perceptual_weight": 0.05, "encoder_steps": 3, "feature_batch": 1000, "n_attr": 4, "n_eval": 8}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_teacher_ckpt, mnist5k):
    mp = pytest.MonkeyPatch()
    mp.setitem(models.pipeline.PRESETS, "tiny", TINY)
    for module in (models.features, models.attribution, models.evaluate):
        use_cached_mnist5k(mp, module, mnist5k)
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
