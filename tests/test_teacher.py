"""The teacher is upstream MNISTDiffusion, bit for bit: its checkpoints load strictly and its arithmetic matches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import load_pt, run_main_in_process
from models.diffusion.samplers import ddpm_reverse_step
from models.diffusion.schedule import schedule_buffers
from models.io.errors import MissingInputError, PipelineError
from models.io.teacher_checkpoints import infer_teacher_config, load_teacher, strip_ema
from models.nets.teacher import MNISTDiffusion, TeacherConfig

REPO = Path(__file__).resolve().parents[1]

TOL = 1e-5


def test_upstream_checkpoint_loads_strictly_and_prefers_ema(upstream_teacher, upstream_raw):
    assert upstream_teacher.weights == "ema"
    cfg = upstream_teacher.config
    assert (cfg.base_dim, list(cfg.dim_mults), cfg.timesteps) == (64, [2, 4], 1000)
    assert (cfg.image_size, cfg.in_channels, cfg.time_embedding_dim) == (28, 1, 256)
    diffusion = upstream_teacher.diffusion
    assert not diffusion.training
    assert not any(p.requires_grad for p in diffusion.parameters())
    # The loaded weights are the EMA's, not the raw model's.
    ema = strip_ema(upstream_raw["model_ema"])
    state = diffusion.state_dict()
    assert set(state) == set(ema)
    key = "model.final_conv.weight"
    assert torch.equal(state[key], ema[key])
    assert not torch.equal(state[key], upstream_raw["model"][key])
    assert len(upstream_teacher.sha256) == 64


def test_infer_config_from_either_weight_set(upstream_raw):
    for state in (upstream_raw["model"], strip_ema(upstream_raw["model_ema"])):
        assert infer_teacher_config(state) == TeacherConfig(base_dim=64, dim_mults=[2, 4], timesteps=1000)
    with pytest.raises(PipelineError):
        infer_teacher_config({"weight": torch.zeros(3)})


def test_model_weights_when_ema_not_preferred(upstream_teacher_model_weights):
    assert upstream_teacher_model_weights.weights == "model"


@pytest.mark.parametrize("which", ["ema", "model"])
def test_eps_prediction_matches_golden(which, golden, upstream_teacher, upstream_teacher_model_weights):
    teacher = upstream_teacher if which == "ema" else upstream_teacher_model_weights
    with torch.no_grad():
        eps = teacher.diffusion.predict_noise(golden["x"], golden["t"])
    expected = golden["eps_ema" if which == "ema" else "eps_model"]
    assert (eps - expected).abs().max().item() < TOL


@pytest.mark.parametrize("key,t,clip", [("reverse_clip_t500", 500, True), ("reverse_noclip_t500", 500, False),
                                        ("reverse_clip_t0", 0, True)])
def test_reverse_step_matches_golden(key, t, clip, golden, upstream_teacher):
    d = upstream_teacher.diffusion
    tt = torch.full((golden["x"].shape[0],), t, dtype=torch.long)
    with torch.no_grad():
        out = ddpm_reverse_step(d.predict_noise, golden["x"], tt, golden["noise"], d.betas, d.alphas,
                                d.alphas_cumprod, clip_x0=clip)
    assert (out - golden[key]).abs().max().item() < TOL


def test_clipped_step_at_t0_adds_no_noise(golden, upstream_teacher):
    d = upstream_teacher.diffusion
    tt = torch.zeros(golden["x"].shape[0], dtype=torch.long)
    with torch.no_grad():
        a = ddpm_reverse_step(d.predict_noise, golden["x"], tt, golden["noise"], d.betas, d.alphas, d.alphas_cumprod)
        b = ddpm_reverse_step(d.predict_noise, golden["x"], tt, torch.zeros_like(golden["noise"]), d.betas, d.alphas,
                              d.alphas_cumprod)
    assert torch.equal(a, b)


def test_alphas_cumprod_matches_golden(golden, upstream_teacher):
    assert (upstream_teacher.diffusion.alphas_cumprod - golden["alphas_cumprod"]).abs().max().item() < TOL
    # Recomputed from scratch, not just copied out of the checkpoint's buffers.
    fresh = schedule_buffers(1000)
    assert (fresh["alphas_cumprod"] - golden["alphas_cumprod"]).abs().max().item() < TOL
    assert fresh["betas"].max().item() == pytest.approx(0.999)
    assert MNISTDiffusion(TeacherConfig(base_dim=4, timesteps=1000)).alphas_cumprod.equal(fresh["alphas_cumprod"])


def _write(tmp_path, ckpt, name="edited.pt"):
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def test_strict_loading_rejects_missing_key(tmp_path, upstream_raw):
    ema = dict(upstream_raw["model_ema"])
    del ema["module.model.final_conv.bias"]
    with pytest.raises(PipelineError, match="do not match"):
        load_teacher(_write(tmp_path, {"model": upstream_raw["model"], "model_ema": ema}))
    model = dict(upstream_raw["model"])
    del model["model.mid_block.0.branch1.0.weight"]
    with pytest.raises(PipelineError, match="do not match"):
        load_teacher(_write(tmp_path, {"model": model}))


def test_strict_loading_rejects_wrong_shape_and_extra_key(tmp_path, upstream_raw):
    ema = dict(upstream_raw["model_ema"])
    w = ema["module.model.final_conv.weight"]
    ema["module.model.final_conv.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1, *w.shape[2:])
    with pytest.raises(PipelineError, match="do not match"):
        load_teacher(_write(tmp_path, {"model": upstream_raw["model"], "model_ema": ema}))
    model = dict(upstream_raw["model"])
    model["model.extra.weight"] = torch.zeros(2)
    with pytest.raises(PipelineError, match="do not match"):
        load_teacher(_write(tmp_path, {"model": model}, "extra.pt"))


def test_load_teacher_user_errors(tmp_path, upstream_raw):
    with pytest.raises(MissingInputError) as err:
        load_teacher(tmp_path / "nope.pt")
    assert err.value.exit_code == 2
    with pytest.raises(PipelineError, match="direct-decoder"):
        load_teacher(_write(tmp_path, {"kind": "direct_decoder", "model": upstream_raw["model"]}, "student.pt"))
    with pytest.raises(PipelineError, match="not a teacher checkpoint"):
        load_teacher(_write(tmp_path, {"state_dict": upstream_raw["model"]}, "other.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(PipelineError) as err:
        load_teacher(garbage)
    assert err.value.exit_code == 1


def test_average_teacher_checkpoints_is_the_elementwise_mean(tmp_path, upstream_raw, monkeypatch, capsys):
    """bench/average_teacher_checkpoints.py: float weights averaged, integer buffers kept, optimizer dropped, and the
    result loads as a teacher with its sources recorded."""
    first = {"model": dict(upstream_raw["model"]), "model_ema": dict(upstream_raw["model_ema"]), "optimizer": {}}
    second = {name: {k: v + 1 if v.is_floating_point() else v for k, v in first[name].items()}
              for name in ("model", "model_ema")}
    paths = [_write(tmp_path, first, "a.pt"), _write(tmp_path, second, "b.pt")]
    out = tmp_path / "avg.pt"
    code, stdout, err = run_main_in_process(REPO / "bench" / "average_teacher_checkpoints.py",
                                            [*paths, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    averaged = load_pt(out)
    assert "optimizer" not in averaged
    assert [entry["path"] for entry in averaged["averaged_from"]] == [str(p) for p in paths]
    for name in ("model", "model_ema"):
        for key, value in first[name].items():
            expected = value + 0.5 if value.is_floating_point() else value
            assert torch.allclose(averaged[name][key], expected, atol=1e-6), (name, key)
    assert averaged["model_ema"]["n_averaged"] == first["model_ema"]["n_averaged"]
    teacher = load_teacher(out)
    assert teacher.weights == "ema"
    assert torch.equal(teacher.diffusion.model.final_conv.weight,
                       averaged["model_ema"]["module.model.final_conv.weight"])
