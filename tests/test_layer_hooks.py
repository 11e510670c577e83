"""Hooks at the decoder's finer layers (models/nets/layers.py): the layers' names and shapes, bottleneck hooks bitwise
as before, strength 0 the identity at every layer, a finer hook changing the image, composition in decoder order,
reference features derived from the bottleneck (and refused where a file does not serve a layer), and the layer
through the API, attribution_generation.py, test_direct_decoder.py and the server's JSON.

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
from models.nets.layers import BOTTLENECK, LayerError, LayerHook, at_layer, compose, layer_names
from models.steering.hooks import HOOK_STYLES

LAYERS = ("bottleneck", "up1", "up2")


@pytest.fixture(scope="module")
def pipe(tiny_pipeline) -> DirectDecoderPipeline:
    return DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student),
                                      str(tiny_pipeline.features), device="cpu")


@pytest.fixture(scope="module")
def noise(pipe) -> torch.Tensor:
    return pipe.noise(5, seed=4)


def images(pipe, noise, hook=None) -> torch.Tensor:
    return pipe.generate(len(noise), noise=noise, hook=hook, top_k=0).images


def test_layers_are_named_once_and_shaped_by_the_decoder(pipe, noise):
    decoder = pipe.student.decoder
    assert layer_names(2) == LAYERS and decoder.hook_layers == LAYERS and pipe.hook_layers == LAYERS
    h = decoder.bottleneck(noise)
    c = decoder.teacher_config.base_dim
    assert decoder.layer_shape("bottleneck") == decoder.bottleneck_shape == (2 * c, 7, 7)
    assert decoder.layer_shape("up1") == (c, 14, 14) and decoder.layer_shape("up2") == (c // 2, 28, 28)
    for layer in LAYERS:
        assert decoder.layer_features(h, layer).shape[1:] == decoder.layer_shape(layer)
    with pytest.raises(LayerError, match="hook layer must be one of bottleneck, up1, up2 for this decoder, got 'up3'"):
        decoder.layer_shape("up3")


def test_bottleneck_hooks_are_bitwise_the_original_path(pipe, noise):
    """The default layer is the bottleneck, and there the image is exactly the pre-layer computation: the hook on the
    encoder's bottleneck, then every decoder block and the final convolution."""
    decoder, unet = pipe.student.decoder, pipe.student.decoder.unet
    h, _, t_emb = decoder._encode(noise)
    skips = list(reversed(decoder._zero_skips(h)))

    def original(hook):
        x = hook(h)
        for block, skip in zip(unet.decoder_blocks, skips):
            x = block(x, skip, t_emb)
        return unet.final_conv(x).float().clamp(-1, 1)

    for style in HOOK_STYLES:
        for hook, explicit in ((pipe.toward_class(0, 0.8, style), pipe.toward_class(0, 0.8, style, layer=BOTTLENECK)),
                               (pipe.include([1, 2, 3], 0.6, style), pipe.include([1, 2, 3], 0.6, style, "bottleneck")),
                               (pipe.exclude([4], 0.6, style), pipe.exclude([4], 0.6, style, layer="bottleneck"))):
            assert not isinstance(hook, LayerHook)
            out = images(pipe, noise, hook)
            assert torch.equal(out, images(pipe, noise, explicit)) and torch.equal(out, original(hook)), style
    hook = compose(pipe.toward_class(0, 0.8), pipe.exclude([4], 0.5))
    assert not isinstance(hook, LayerHook) and torch.equal(images(pipe, noise, hook), original(hook))
    plain = pipe.include([5], 0.5)
    assert at_layer(BOTTLENECK, plain) is plain
    assert torch.equal(decoder.decode(h).float().clamp(-1, 1), original(lambda x: x))


def test_strength_zero_is_the_identity_at_every_layer(pipe, noise):
    base = images(pipe, noise)
    for layer in LAYERS:
        for style in HOOK_STYLES:
            for hook in (pipe.toward_class(0, 0.0, style, layer=layer), pipe.include([1, 2], 0.0, style, layer),
                         pipe.exclude([3], 0.0, style, layer)):
                assert torch.equal(images(pipe, noise, hook), base), (layer, style)
        assert torch.equal(images(pipe, noise, pipe.interpolate([1], [2], 0.5, 0.0, layer=layer)), base), layer


def test_finer_layer_hooks_change_the_image_after_the_bottleneck(pipe, noise):
    decoder = pipe.student.decoder
    base = pipe.generate(5, noise=noise, top_k=0)
    h = decoder.bottleneck(noise)
    for layer in ("up1", "up2"):
        hook = pipe.include([0, 1, 2], 1.0, style="mean", layer=layer)
        assert isinstance(hook, LayerHook) and hook.layers == (layer,)
        out = pipe.generate(5, noise=noise, hook=hook, top_k=0)
        assert (out.images - base.images).abs().max() > 1e-3, layer
        assert torch.equal(out.features, base.features), "a finer hook must leave the bottleneck alone"
        # strength 1 of the mean style puts every generation's layer features at the targets' mean: one image
        target = pipe.steering.layer_features(layer)[[0, 1, 2]].mean(0, keepdim=True)
        expected = decoder.decode(target, layer=layer).float().clamp(-1, 1)
        torch.testing.assert_close(out.images, expected.expand_as(out.images), rtol=1e-5, atol=1e-5)
        # the image is the decoder continued from the hooked layer's features
        torch.testing.assert_close(decoder.decode(decoder.layer_features(h, layer), hook, layer=layer).float()
                                   .clamp(-1, 1), out.images, rtol=0, atol=0)


def test_reference_features_at_a_layer_are_the_decoder_run_from_the_bottleneck(tiny_pipeline):
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student),
                                      str(tiny_pipeline.features), device="cpu")
    steer, decoder = pipe.steering, pipe.student.decoder
    assert set(steer._layers.cache) == {BOTTLENECK}, "finer layers are derived at first use, not at load"
    up2 = steer.layer_features("up2")
    assert set(steer._layers.cache) == set(LAYERS), "deriving up2 keeps up1, met on the way"
    with torch.inference_mode():
        for layer, got in (("up1", steer.layer_features("up1")), ("up2", up2)):
            torch.testing.assert_close(got, decoder.layer_features(steer.features, layer), rtol=1e-5, atol=1e-6)
            assert got.shape == (len(steer.labels), *decoder.layer_shape(layer))
    assert steer.layer_features("up2") is up2
    assert steer.layer_features(BOTTLENECK) is steer.features


def test_composed_hooks_apply_in_decoder_order(pipe, noise):
    """Listed out of order, hooks still run at their layers in decoder order (forward hooks on the decoder's modules
    log the sequence), and within a layer in the order composed."""
    decoder = pipe.student.decoder
    log = []

    def tagged(name, fn):
        def hook(h):
            log.append(name)
            return fn(h)
        return hook

    double, shift = (lambda h: 2 * h), (lambda h: h + 1)
    hook = compose(at_layer("up2", tagged("hook@up2", lambda h: h)), tagged("hook@bottleneck", lambda h: h),
                   at_layer("up1", tagged("hook@up1 a", double)), at_layer("up1", tagged("hook@up1 b", shift)))
    modules = {"block up1": decoder.unet.decoder_blocks[0], "block up2": decoder.unet.decoder_blocks[1],
               "final conv": decoder.unet.final_conv}
    handles = [m.register_forward_hook(lambda *_, name=name: log.append(name)) for name, m in modules.items()]
    try:
        with torch.inference_mode():
            first = decoder(noise, hook)
    finally:
        for handle in handles:
            handle.remove()
    assert log == ["hook@bottleneck", "block up1", "hook@up1 a", "hook@up1 b", "block up2", "hook@up2", "final conv"]
    with torch.inference_mode():
        h = decoder.bottleneck(noise)
        manual = decoder.decode(shift(double(decoder.layer_features(h, "up1"))), layer="up1")
        swapped = decoder(noise, compose(at_layer("up1", shift), at_layer("up1", double)))
    assert torch.equal(first, manual)
    assert (first - swapped).abs().max() > 1e-4, "the order within a layer must matter here"
    with pytest.raises(LayerError, match="acts at layers bottleneck, up1"):
        compose(double, at_layer("up1", shift))(torch.zeros(1, 8, 7, 7))
    with pytest.raises(LayerError, match="already placed at up1"):
        at_layer("up2", at_layer("up1", shift))
    with pytest.raises(LayerError, match="got 'up7'"):
        decoder(noise, at_layer("up7", shift))


# ---------------------------------------------------------------- reference features that do not serve a layer

def test_extraction_records_the_layers_it_serves(tiny_pipeline):
    meta = load_pt(tiny_pipeline.features)["metadata"]
    assert meta["hook_layers"] == list(LAYERS)
    assert meta["layer_shapes"] == {"bottleneck": [8, 7, 7], "up1": [4, 14, 14], "up2": [2, 28, 28]}


@pytest.fixture(scope="module")
def bottleneck_only_features(tiny_pipeline, tmp_path_factory):
    """The tiny features as a student with the teacher's skips would have them: serving the bottleneck only."""
    ref = load_pt(tiny_pipeline.features)
    ref["metadata"]["hook_layers"] = ["bottleneck"]
    path = tmp_path_factory.mktemp("bottleneck_only") / "reference_features.pt"
    torch.save(ref, path)
    return path


def test_features_without_a_layer_are_refused_in_one_line(tiny_pipeline, bottleneck_only_features, tmp_path,
                                                           monkeypatch, capsys, repo_root):
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student),
                                      str(bottleneck_only_features), device="cpu")
    assert pipe.hook_layers == ("bottleneck",)
    pipe.toward_class(0, 0.5)  # the bottleneck still serves
    with pytest.raises(LayerError, match="serve hooks at bottleneck only, not up1"):
        pipe.toward_class(0, 0.5, layer="up1")
    common = ["--ddpm_ckpt", tiny_pipeline.teacher, "--decoder_ckpt", tiny_pipeline.student, "--n_samples", 2,
              "--target_class", 0, "--no_evaluate", "--cpu"]
    for features, layer, expected in ((bottleneck_only_features, "up2", "serve hooks at bottleneck only, not up2"),
                                      (tiny_pipeline.features, "up3", "must be one of bottleneck, up1, up2")):
        out = tmp_path / f"refused_{layer}"
        code, _, err = run_main_in_process(repo_root / "attribution_generation.py",
                                           [*common, "--ref_features_path", features, "--hook_layer", layer,
                                            "--output_dir", out], monkeypatch, capsys)
        line = one_error_line(err)
        assert code == 1 and expected in line and str(features) in line, line
        assert not out.exists()


# ---------------------------------------------------------------- the stage scripts

def test_attribution_stage_hooks_at_the_chosen_layer(tiny_pipeline, pipe, tmp_path, monkeypatch, capsys, repo_root):
    code, _, err = run_main_in_process(
        repo_root / "attribution_generation.py",
        ["--ddpm_ckpt", tiny_pipeline.teacher, "--decoder_ckpt", tiny_pipeline.student, "--ref_features_path",
         tiny_pipeline.features, "--n_samples", 3, "--top_k", 1, "--target_class", 0, "--include", 0, 1, "--exclude",
         5, "--strength", 0.7, "--hook_layer", "up1", "--no_evaluate", "--output_dir", tmp_path / "out", "--cpu"],
        monkeypatch, capsys)
    assert code == 0, err[-2000:]
    results = load_pt(tmp_path / "out" / "attribution_results.pt")
    assert results["options"]["hook_layer"] == "up1"
    for name, hook in (("class_0", pipe.toward_class(0, 0.7, layer="up1")), ("include", pipe.include([0, 1], 0.7,
                                                                                                     layer="up1")),
                       ("exclude", pipe.exclude([5], 0.7, layer="up1"))):
        run = results["runs"][f"{name}@0.7"]
        assert torch.equal(run["images"], images(pipe, results["noise"], hook)), name
        assert torch.equal(run["features"], results["runs"]["baseline"]["features"]), name  # bottleneck untouched


def test_gallery_hooks_at_the_chosen_layer(tiny_pipeline, tmp_path, monkeypatch, capsys, repo_root):
    panels = {}
    for layer in ("bottleneck", "up2"):
        code, err = run_gallery(tiny_pipeline, repo_root, tmp_path / layer, ["--hook_layer", layer], monkeypatch, capsys)
        assert code == 0, err
        assert json.loads((tmp_path / layer / "hook_effects.json").read_text())["hook_layer"] == layer
        panels[layer] = gallery_panel(tmp_path / layer, "include")
        assert np.array_equal(gallery_panel(tmp_path / layer, "baseline"),
                              gallery_panel(tmp_path / "bottleneck", "baseline"))
    assert not np.array_equal(panels["bottleneck"], panels["up2"])
    code, err = run_gallery(tiny_pipeline, repo_root, tmp_path / "bad", ["--hook_layer", "mid"], monkeypatch, capsys)
    assert code == 1 and "--hook_layer must be one of bottleneck, up1, up2" in one_error_line(err)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def client(tiny_pipeline, tmp_path_factory):
    with served_test_client(tiny_pipeline, tmp_path_factory.mktemp("layers_serve")) as served:
        yield served


def test_server_json_takes_the_layer(client):
    http, pipe = client
    info = http.get("/v1/info").json()
    assert info["hook_layers"] == [{"name": "bottleneck", "shape": [8, 7, 7]}, {"name": "up1", "shape": [4, 14, 14]},
                                   {"name": "up2", "shape": [2, 28, 28]}]
    assert info["default_hook_layer"] == "bottleneck"

    def raw(hooks):
        r = http.post("/v1/generate", json={"n": 3, "seed": 2, "raw": True, "top_k": 0, "hooks": hooks})
        assert r.status_code == 200, r.text
        return torch.from_numpy(np.frombuffer(base64.b64decode(r.json()["raw_f32"]), dtype="<f4").copy()
                                ).reshape(3, 1, 28, 28)
    hooks = [{"type": "include", "indices": [1, 2], "strength": 0.6, "layer": "up2"},
             {"type": "class", "label": 0, "strength": 0.9, "layer": "bottleneck"},
             {"type": "exclude", "indices": [4], "strength": 0.5, "layer": "up1"}]
    expected = pipe.generate(3, seed=2, top_k=0, hook=compose(pipe.include([1, 2], 0.6, layer="up2"),
                                                              pipe.toward_class(0, 0.9),
                                                              pipe.exclude([4], 0.5, layer="up1"))).images
    assert torch.equal(raw(hooks), expected)
    assert torch.equal(raw([{"type": "class", "label": 0, "strength": 0.9}]),
                       raw([{"type": "class", "label": 0, "strength": 0.9, "layer": "bottleneck"}]))


@pytest.mark.parametrize("layer, message", [
    ("up9", "hooks[0] (class): hook layer must be one of bottleneck, up1, up2 for this decoder, got 'up9'"),
    ("", "hooks.0.class.layer: String should have at least 1 character"),
    (1, "hooks.0.class.layer: Input should be a valid string"),
])
def test_server_refuses_a_bad_layer_with_a_422(client, layer, message):
    r = client[0].post("/v1/generate", json={"n": 2, "hooks": [{"type": "class", "label": 0, "layer": layer}]})
    assert r.status_code == 422 and r.json()["detail"] == message, r.text


def test_readme_layer_example_runs(pipe, repo_root):
    """README.md's Layer hooks example, on the tiny pair (its reference set holds zeros only: class 0, rows 1-10)."""
    import re
    text = (repo_root / "README.md").read_text()
    block = re.search(r"### Layer hooks.*?```python\n(.*?)```", text, re.S).group(1)
    assert "toward_class(3, 0.75)" in block and 'layer="up2"' in block
    block = re.sub(r"thick_threes = \[[\d, ]+\]", "thick_threes = list(range(1, 11))", block)
    scope = {"pipe": pipe, "compose": compose}
    exec(compile(block.replace("toward_class(3, 0.75)", "toward_class(0, 0.75)"), "README.md", "exec"), scope)
    class_only = pipe.generate(8, seed=0, hook=pipe.toward_class(0, 0.75), top_k=0)
    assert scope["out"].images.shape == (8, 1, 28, 28)
    assert torch.equal(scope["out"].features, class_only.features)  # the include acts after the bottleneck
    assert (scope["out"].images - class_only.images).abs().max() > 1e-3
