"""Hook styles (mean, nearest, shift, shift_nearest) through every interface: Steering by index and class (the mean style bitwise the
original hooks), the Python API, the attribution stage's --hook_style, and the server's JSON and /v1/info.

The tiny reference set is the first 120 mnist5k images, all zeros, so class hooks target class 0.
"""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from helpers import gallery_panel, load_pt, one_error_line, run_gallery, run_main_in_process, served_test_client
from models.api import DirectDecoderPipeline
from models.io.errors import PipelineError
from models.server.generation import HookStyle
from models.stages.attribution import AttributionOptions, attribution_generation
from models.steering.hooks import (DEFAULT_HOOK_STYLE, HOOK_STYLES, SHIFT_REACH, class_hook, compose, exclude_hook,
                                   include_hook, nearest_exclude_hook, nearest_hook, shift_hook, shift_nearest_hook)
from models.steering.steering import Steering

SHAPE = (8, 7, 7)


@pytest.fixture(scope="module")
def synthetic() -> Steering:
    """Steering over 30 random reference rows of three labels (hooks never touch the decoder)."""
    g = torch.Generator().manual_seed(3)
    ref = {"features": torch.randn((30, *SHAPE), generator=g), "labels": torch.tensor([0, 1, 2] * 10)}
    return Steering(None, ref, torch.device("cpu"))


@pytest.fixture(scope="module")
def h() -> torch.Tensor:
    return torch.randn((6, *SHAPE), generator=torch.Generator().manual_seed(4))


def test_mean_style_is_bitwise_the_original_hooks(synthetic, h):
    feats, labels = synthetic.features, synthetic.labels
    members = feats[labels == 1]
    out = synthetic.toward_class(1, 0.7, "mean")(h)
    assert torch.equal(out, class_hook(members, 0.7)(h))
    assert torch.equal(out, h + 0.7 * (members.float().mean(0) - h))  # the formula the seed shipped
    assert torch.equal(synthetic.include([3, 4, 5], 0.4, "mean")(h), include_hook(feats[[3, 4, 5]], 0.4)(h))
    assert torch.equal(synthetic.exclude([7, 8], 1.5, "mean")(h), exclude_hook(feats[[7, 8]], 1.5)(h))


def test_steering_builds_each_style_from_the_reference_set(synthetic, h):
    feats, labels = synthetic.features, synthetic.labels
    members = feats[labels == 2]
    torch.testing.assert_close(synthetic.toward_class(2, 0.6, "nearest")(h), nearest_hook(members, 0.6)(h))
    torch.testing.assert_close(synthetic.toward_class(2, 0.6, "shift")(h),
                               shift_hook(SHIFT_REACH * (members.mean(0) - feats.mean(0)), 0.6)(h))
    torch.testing.assert_close(synthetic.toward_class(2, 0.6, "shift_nearest")(h),
                               shift_nearest_hook(members, members.mean(0) - feats.mean(0), 0.6)(h))
    torch.testing.assert_close(synthetic.include([0, 1, 2, 3], 0.5, "nearest")(h), nearest_hook(feats[:4], 0.5)(h))
    assert torch.equal(synthetic.include([0, 1, 2, 3], 0.5, "shift_nearest")(h),
                       synthetic.include([0, 1, 2, 3], 0.5, "nearest")(h))  # a few images: no direction to shift by
    torch.testing.assert_close(synthetic.exclude([0, 1], 0.5, "shift")(h),
                               shift_hook(SHIFT_REACH * (feats.mean(0) - feats[:2].mean(0)), 0.5)(h))
    torch.testing.assert_close(synthetic.exclude([0, 1], 0.5, "shift_nearest")(h),
                               synthetic.exclude([0, 1], 0.5, "nearest")(h))
    # nearest exclude: the excluded rows are not among the candidates it moves toward
    torch.testing.assert_close(synthetic.exclude([0, 1], 0.5, "nearest")(h),
                               nearest_exclude_hook(feats[:2], feats[2:], 0.5)(h))
    assert torch.equal(synthetic.toward_class(2, 0.6)(h), synthetic.toward_class(2, 0.6, DEFAULT_HOOK_STYLE)(h))
    for style in HOOK_STYLES:
        for hook in (synthetic.toward_class(0, 0.0, style), synthetic.include([1], 0.0, style),
                     synthetic.exclude([1], 0.0, style)):
            assert torch.equal(hook(h), h), f"{style} at strength 0 is not the identity"


def test_nearest_style_keeps_generations_apart_where_mean_collapses_them(synthetic, h):
    def spread(x):
        return (x - x.mean(0)).flatten(1).norm(dim=1).mean().item()
    assert spread(synthetic.toward_class(0, 1.0, "mean")(h)) < 1e-5
    # ten members, so 8 neighbours are almost all of them; with 2 each generation keeps a target of its own
    assert spread(synthetic.toward_class(0, 1.0, "nearest", k=2)(h)) > 0.3 * spread(h)
    collapsed = spread(synthetic.toward_class(0, 1.0, "mean")(h))
    assert spread(synthetic.toward_class(0, 1.0, "nearest")(h)) > 100 * collapsed
    assert spread(synthetic.toward_class(0, 1.0, "shift")(h)) == pytest.approx(spread(h), rel=1e-5)


def test_unknown_style_is_refused(synthetic):
    for call in (lambda: synthetic.toward_class(0, 0.5, "median"), lambda: synthetic.include([0], 0.5, "Mean"),
                 lambda: synthetic.exclude([0], 0.5, "")):
        with pytest.raises(PipelineError, match="hook_style must be one of mean, nearest, shift, shift_nearest"):
            call()


def test_api_takes_the_style(tiny_pipeline):
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student),
                                      str(tiny_pipeline.features), device="cpu")
    z = pipe.noise(4, seed=9)
    h = pipe.student.decoder.bottleneck(z)
    members = pipe.steering.features[pipe.steering.labels == 0]
    direction = members.mean(0) - pipe.steering.features.mean(0)
    for style, expected in (("mean", class_hook(members, 0.8)), ("nearest", nearest_hook(members, 0.8)),
                            ("shift", shift_hook(SHIFT_REACH * direction, 0.8)),
                            ("shift_nearest", shift_nearest_hook(members, direction, 0.8))):
        out = pipe.generate(4, hook=pipe.toward_class(0, 0.8, style), noise=z, top_k=1)
        torch.testing.assert_close(out.features, expected(h), rtol=1e-5, atol=1e-6)
    with pytest.raises(PipelineError, match="hook_style"):
        pipe.include([0], 0.5, style="closest")


# ---------------------------------------------------------------- the attribution stage

SCRIPT = "attribution_generation.py"


def test_stage_flag_applies_the_style_and_refuses_a_bad_one(tiny_pipeline, tmp_path, monkeypatch, capsys,
                                                            repo_root):
    common = ["--ddpm_ckpt", tiny_pipeline.teacher, "--decoder_ckpt", tiny_pipeline.student, "--ref_features_path",
              tiny_pipeline.features, "--n_samples", 4, "--top_k", 2, "--target_class", 0, "--include", 0, 1, 2,
              "--exclude", 5, 6, "--strength", 0.6, "--no_evaluate", "--cpu"]
    code, _, err = run_main_in_process(repo_root / SCRIPT, [*common, "--output_dir", tmp_path / "bad",
                                                            "--hook_style", "median"], monkeypatch, capsys)
    assert code == 1 and "--hook_style" in one_error_line(err) and "median" in err
    assert not (tmp_path / "bad").exists()
    code, _, err = run_main_in_process(repo_root / SCRIPT, [*common, "--output_dir", tmp_path / "out",
                                                            "--hook_style", "shift"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    results = load_pt(tmp_path / "out" / "attribution_results.pt")
    assert results["options"]["hook_style"] == "shift"
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student),
                                      str(tiny_pipeline.features), device="cpu")
    h = pipe.student.decoder.bottleneck(results["noise"])
    for name, hook in (("class_0", pipe.toward_class(0, 0.6, "shift")), ("include", pipe.include([0, 1, 2], 0.6,
                                                                                                 "shift")),
                       ("exclude", pipe.exclude([5, 6], 0.6, "shift"))):
        torch.testing.assert_close(results["runs"][f"{name}@0.6"]["features"], hook(h), rtol=1e-5, atol=1e-6)
    with pytest.raises(PipelineError, match="hook_style"):
        attribution_generation(AttributionOptions(hook_style="closest"))


# ---------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def client(tiny_pipeline, tmp_path_factory):
    with served_test_client(tiny_pipeline, tmp_path_factory.mktemp("styles_serve")) as served:
        yield served


def test_server_json_takes_the_style(client):
    http, pipe = client
    assert HookStyle.__args__ == HOOK_STYLES
    info = http.get("/v1/info").json()
    assert info["hook_styles"] == list(HOOK_STYLES) and info["default_hook_style"] == DEFAULT_HOOK_STYLE
    def raw(body):
        r = http.post("/v1/generate", json=body | {"n": 3, "seed": 2, "raw": True, "top_k": 0})
        assert r.status_code == 200, r.text
        return torch.from_numpy(np.frombuffer(base64.b64decode(r.json()["raw_f32"]), dtype="<f4").copy()
                                ).reshape(3, 1, 28, 28)
    for style in HOOK_STYLES:
        hooks = [{"type": "class", "label": 0, "strength": 0.9, "style": style},
                 {"type": "exclude", "indices": [4], "strength": 0.5, "style": style}]
        expected = pipe.generate(3, seed=2, hook=compose(pipe.toward_class(0, 0.9, style),
                                                         pipe.exclude([4], 0.5, style)), top_k=0).images
        assert torch.equal(raw({"hooks": hooks}), expected), style
    default = raw({"hooks": [{"type": "include", "indices": [1, 2], "strength": 0.7}]})
    assert torch.equal(default, pipe.generate(3, seed=2, hook=pipe.include([1, 2], 0.7), top_k=0).images)


@pytest.mark.parametrize("style", ["median", "", 1, None])
def test_server_refuses_a_bad_style_with_a_422(client, style):
    r = client[0].post("/v1/generate", json={"n": 2, "hooks": [{"type": "class", "label": 0, "style": style}]})
    assert r.status_code == 422, r.text
    assert "hooks.0.class.style: Input should be 'mean', 'nearest', 'shift' or 'shift_nearest'" in r.json()["detail"]


def test_make_figures_strip_rises_from_the_unhooked_images(tiny_pipeline, tmp_path, monkeypatch, capsys, repo_root):
    """bench/make_figures.py's strength strip: one row per noise, one column per strength, the first column (strength
    0) the unhooked generations, later columns the class hook in the chosen style."""
    from PIL import Image
    out = tmp_path / "figures"
    code, _, err = run_main_in_process(
        repo_root / "bench" / "make_figures.py",
        ["--ddpm_ckpt", tiny_pipeline.teacher, "--decoder_ckpt", tiny_pipeline.student, "--ref_features_path",
         tiny_pipeline.features, "--n", 4, "--pairs", 2, "--label", 0, "--include", 0, 1, "--exclude", 2,
         "--strip", 0, 0.5, 1, "--strip_rows", 2, "--hook_style", "shift", "--output_dir", out, "--cpu"],
        monkeypatch, capsys)
    assert code == 0, err
    strip = torch.tensor(np.asarray(Image.open(out / "hooks_class_strip.png").convert("L")), dtype=torch.float)
    assert strip.shape == (2 * 30 + 2, 3 * 30 + 2)
    pipe = DirectDecoderPipeline.load(tiny_pipeline.teacher, tiny_pipeline.student, tiny_pipeline.features, "cpu")
    base = pipe.generate(2, seed=0, top_k=0).images
    hooked = pipe.generate(2, seed=0, hook=pipe.toward_class(0, 1.0, "shift"), top_k=0).images
    for row in range(2):
        cell = lambda col: strip[2 + 30 * row:30 + 30 * row, 2 + 30 * col:30 + 30 * col] / 255 * 2 - 1  # noqa: E731
        assert (cell(0) - base[row, 0]).abs().max() < 2 / 255 + 1e-6
        assert (cell(2) - hooked[row, 0]).abs().max() < 2 / 255 + 1e-6
    record = json.loads((out / "figures.json").read_text())
    assert record["hook_style"] == "shift" and record["strip_strengths"] == [0.0, 0.5, 1.0]


def test_gallery_class_hook_takes_the_style(tiny_pipeline, tmp_path, monkeypatch, capsys, repo_root):
    """test_direct_decoder.py --hook_style: the gallery's class panel (probes stand in for reference features) differs
    by style, strength 0.5 of the mean style is the classifier-weighted mean hook, and a bad style is one line."""
    panels = {}
    for style in HOOK_STYLES:
        code, err = run_gallery(tiny_pipeline, repo_root, tmp_path / style, ["--hook_style", style], monkeypatch, capsys)
        assert code == 0, err
        assert json.loads((tmp_path / style / "hook_effects.json").read_text())["hook_style"] == style
        panels[style] = gallery_panel(tmp_path / style, "class_0")
        assert np.array_equal(gallery_panel(tmp_path / style, "include"), gallery_panel(tmp_path / "mean", "include"))
    assert not np.array_equal(panels["mean"], panels["shift"])
    code, err = run_gallery(tiny_pipeline, repo_root, tmp_path / "bad", ["--hook_style", "median"], monkeypatch, capsys)
    assert code == 1 and "--hook_style" in one_error_line(err) and not (tmp_path / "bad").exists()
