"""The shape attribution rule (models/steering/shape_match.py) and the readable scores: it is stored by
extract_reference_features.py and read back, it never reads a label, the stage, the API and the server use it by
default when the features carry it, percentiles are right on constructed examples, and feature files without it
keep the bottleneck rule."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import assert_identical, load_pt, run_main_in_process, use_cached_mnist5k
from models.api import DirectDecoderPipeline
from models.io.errors import PipelineError
from models.steering.shape_match import (ShapeMatch, calibration_rows, cosine_calibration, distortion_distance,
                                         percentile, reference_views, shape_record, shape_similarity, shape_top_k)

SETTINGS = ShapeMatch()


def _stroke_image(rows: slice, cols: slice) -> torch.Tensor:
    """A [-1, 1] image, background -1, one bright bar."""
    x = -torch.ones(1, 1, 28, 28)
    x[..., rows, cols] = 1.0
    return x


def test_percentile_on_constructed_calibration():
    calibration = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    got = percentile(torch.tensor([0.05, 0.1, 0.55, 0.95, 1.0]), calibration)
    assert got.tolist() == pytest.approx([0.0, 10.0, 50.0, 90.0, 100.0])


def test_shape_rule_forgives_a_shift_and_percentiles_separate_a_near_copy_from_a_look_alike():
    """Reference set: a vertical bar, the same bar one column to the right of a thicker one, a horizontal bar, a
    cross. The vertical bar shifted by one pixel scores 1 against itself (the generation's shifts include it) and
    ranks it first; its percentile is at the top of the calibration, a mere look-alike's is not."""
    vertical, horizontal = _stroke_image(slice(6, 22), slice(13, 15)), _stroke_image(slice(13, 15), slice(6, 22))
    thick = _stroke_image(slice(6, 22), slice(12, 17))
    cross = torch.maximum(vertical, horizontal)
    references = torch.cat([vertical, thick, horizontal, cross])
    record = shape_record(references, SETTINGS)
    views = reference_views(record["images"].float(), SETTINGS)
    shifted = torch.roll(vertical, shifts=1, dims=-1)
    scores, idx = shape_top_k(shifted, views, SETTINGS, k=4)
    assert idx[0, 0].item() == 0 and scores[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert idx[0, -1].item() == 2  # the horizontal bar is the last match of a vertical one
    # calibration: each reference row's best score to the *other* rows, sorted
    assert record["calibration"].shape == (4,) and (record["calibration"].diff() >= 0).all()
    assert record["calibration"].max() < 1 - 1e-3  # no reference row is a copy of another
    assert percentile(scores[:, :1], record["calibration"]).item() == 100.0
    assert percentile(scores[:, -1:], record["calibration"]).item() < 50.0


def _digit_like() -> torch.Tensor:
    """A [-1, 1] image with a bent stroke well inside the frame: an L and a short diagonal."""
    x = -torch.ones(1, 1, 28, 28)
    x[..., 8:20, 10:12] = 1.0
    x[..., 18:20, 10:18] = 1.0
    for i in range(5):
        x[..., 9 + i, 14 + i] = 1.0
    return x


def test_distortion_distance_forgives_moves_within_its_window_only():
    """Zero to itself and to the same image moved by up to ``distortion_window`` pixels (every pixel finds its match
    that far away), positive beyond; a moved copy ranks above a different image."""
    image, other = _digit_like(), _stroke_image(slice(13, 15), slice(6, 22))
    w = SETTINGS.distortion_window
    moved = [torch.roll(image, shifts=(d, d), dims=(-2, -1)) for d in (0, 1, w, w + 1)]
    d = distortion_distance(image, torch.cat(moved + [other]).unsqueeze(0), SETTINGS)[0]
    assert d[:3].abs().max().item() < 1e-6
    assert d[3].item() > 1e-3 and d[4].item() > d[3].item()


def test_the_cosine_pool_is_reordered_by_distortion_distance(mnist5k):
    """With the reference images, the top k are the ``rerank`` best by cosine, ordered by distortion distance; the
    scores stay each one's cosine."""
    references, queries = mnist5k.images[:200].half().float(), mnist5k.images[200:206] * 0.8
    settings = dataclasses.replace(SETTINGS, rerank=20)
    views = reference_views(references, settings)
    cosines = shape_similarity(queries, views, settings)
    pool = cosines.topk(20, dim=1).indices
    scores, idx = shape_top_k(queries, views, settings, 5, references)
    for q in range(len(queries)):
        dist = distortion_distance(queries[q:q + 1], references[pool[q]].unsqueeze(0), settings)[0]
        assert torch.equal(idx[q], pool[q][dist.argsort()[:5]])
        torch.testing.assert_close(scores[q], cosines[q, idx[q]])
    plain = shape_top_k(queries, views, settings, 5)[1]  # without the images: the cosine order
    assert torch.equal(plain, cosines.topk(5, dim=1).indices) and not torch.equal(plain, idx)


def test_calibration_rows_depend_on_the_set_size_alone():
    assert calibration_rows(10, 4).tolist() == [0, 3, 6, 9]
    assert calibration_rows(3, 256).tolist() == [0, 1, 2]


def test_extraction_stores_the_shape_rule_and_reads_it_back(tiny_pipeline, mnist5k):
    ref = load_pt(tiny_pipeline.features)
    n = len(ref["labels"])
    rule = ref["attribution"]
    assert rule["rule"] == "shape" and ref["metadata"]["attribution_rule"] == "shape"
    assert rule["settings"] == dataclasses.asdict(SETTINGS) | {"rotations": list(SETTINGS.rotations)}
    assert rule["images"].dtype == torch.float16 and torch.equal(rule["images"], mnist5k.images[:n].half())
    for space in ("shape", "bottleneck"):
        calibration = rule["calibration"][space]
        assert calibration.shape == (min(n, SETTINGS.calibration_rows),) and (calibration.diff() >= 0).all()
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student),
                                      str(tiny_pipeline.features), device="cpu")
    assert pipe.steering.default_attribute_by == "shape"
    out = pipe.generate(4, seed=3, top_k=3)
    scores, idx = shape_top_k(out.images, reference_views(rule["images"].float(), SETTINGS), SETTINGS, 3,
                              rule["images"])
    assert out.attribute_by == "shape" and torch.equal(out.top_k_indices, idx)
    torch.testing.assert_close(out.top_k_scores, scores)
    assert torch.equal(out.top_k_labels, ref["labels"][idx])
    assert torch.equal(out.top_k_percentiles, percentile(out.top_k_scores, rule["calibration"]["shape"]))
    # attribute_images follows the same default; "image" keeps the encoder's rule
    feats, s, i, _ = pipe.attribute_images(out.images, 3)
    assert torch.equal(i, idx) and feats.shape == out.features.shape
    assert torch.equal(pipe.attribute_images(out.images, 3, "image")[2],
                       pipe.steering.attribute(pipe.steering.encode_images(out.images), 3)[1])


def _extract(tiny_pipeline, out, monkeypatch, capsys, repo_root, *extra) -> dict:
    code, _, err = run_main_in_process(repo_root / "extract_reference_features.py", [
        "--ddpm_ckpt", tiny_pipeline.teacher, "--decoder_ckpt", tiny_pipeline.student, "--output_path", out,
        *tiny_pipeline.feature_args, *extra], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    return load_pt(out)


def test_the_rule_never_reads_labels(tiny_pipeline, tmp_path, monkeypatch, capsys, repo_root, mnist5k):
    """Extraction with the dataset's labels replaced by random ones stores bitwise the same attribution record
    (rule, reference images, both calibrations) as with the true labels: no label reaches the rule."""
    import models.stages.features as features_stage
    g = torch.Generator().manual_seed(99)
    shuffled_data = dataclasses.replace(mnist5k, labels=torch.randint(0, 10, mnist5k.labels.shape, generator=g))
    runs = {}
    for name, data in (("true", mnist5k), ("random", shuffled_data)):
        monkeypatch.setattr(features_stage, "load_dataset", lambda *args, data=data, **kwargs: data)
        runs[name] = _extract(tiny_pipeline, tmp_path / f"{name}.pt", monkeypatch, capsys, repo_root)
    assert not torch.equal(runs["true"]["labels"], runs["random"]["labels"])  # the labels did change
    assert_identical(runs["true"]["attribution"], runs["random"]["attribution"], "attribution")


def test_features_without_the_rule_keep_the_bottleneck_rule(tiny_pipeline, tmp_path):
    """A features file from before the shape rule (no "attribution" record) loads, attributes by the bottleneck
    with percentiles calibrated on the fly, and refuses "shape" in one line."""
    old = load_pt(tiny_pipeline.features)
    old.pop("attribution")
    old["metadata"].pop("attribution_rule")
    torch.save(old, tmp_path / "old.pt")
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student), str(tmp_path / "old.pt"),
                                      device="cpu")
    out = pipe.generate(3, seed=1, top_k=2)
    assert out.attribute_by == "bottleneck"
    assert torch.equal(out.top_k_indices, pipe.steering.attribute(out.features, 2)[1])
    assert out.top_k_percentiles.shape == (3, 2)
    assert ((out.top_k_percentiles >= 0) & (out.top_k_percentiles <= 100)).all()
    with pytest.raises(PipelineError, match="carry no shape rule"):
        pipe.generate(1, attribute_by="shape")
    with pytest.raises(PipelineError, match="attribute_by must be one of"):
        pipe.generate(1, attribute_by="pixels")


def test_bottleneck_option_stores_no_shape_rule(tiny_pipeline, tmp_path, monkeypatch, capsys, repo_root, mnist5k):
    import models.stages.features as features_stage
    use_cached_mnist5k(monkeypatch, features_stage, mnist5k)
    ref = _extract(tiny_pipeline, tmp_path / "bottleneck.pt", monkeypatch, capsys, repo_root,
                   "--attribution_rule", "bottleneck")
    assert ref["attribution"]["rule"] == "bottleneck" and "images" not in ref["attribution"]
    assert_identical(ref["attribution"]["calibration"]["bottleneck"], cosine_calibration(ref["features"]),
                     "calibration")
    assert ref["metadata"]["attribution_rule"] == "bottleneck"
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student),
                                      str(tmp_path / "bottleneck.pt"), device="cpu")
    assert pipe.generate(2, top_k=1).attribute_by == "bottleneck"


def test_stage_attributes_by_shape_by_default(tiny_pipeline, tmp_path, monkeypatch, capsys, repo_root):
    """attribution_generation.py without --attribute_by: the features' rule, its percentiles in the results and the
    grid captions' data."""
    out = tmp_path / "out"
    code, _, err = run_main_in_process(repo_root / "attribution_generation.py", [
        "--ddpm_ckpt", tiny_pipeline.teacher, "--decoder_ckpt", tiny_pipeline.student, "--ref_features_path",
        tiny_pipeline.features, "--output_dir", out, "--n_samples", 4, "--top_k", 2, "--include", 0, "--exclude", 1,
        "--target_class", 0, "--no_evaluate", "--cpu"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    results = load_pt(out / "attribution_results.pt")
    assert results["attribute_by"] == "shape"
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student),
                                      str(tiny_pipeline.features), device="cpu")
    base = results["runs"]["baseline"]
    scores, idx, _ = pipe.steering.attribute_shape(base["images"], 2)
    assert torch.equal(base["top_k_indices"], idx)
    assert torch.equal(base["top_k_percentiles"], pipe.steering.percentiles(scores, "shape"))
    assert all(math.isfinite(p) for p in base["top_k_percentiles"].flatten().tolist())
