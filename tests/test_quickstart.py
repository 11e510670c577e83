"""The user's quickstart ("1. Small Test Run"), verbatim, on a checkpoint in upstream's format.

The three commands run in order from a scratch directory laid out as the user's: jenny_6x0/steps_00046900.pt,
holding exactly what upstream's training code writes ({"model", "model_ema"}: MNISTDiffusion's state dict and its
AveragedModel EMA, nothing of ours), at base_dim 4 and upstream's T = 1000. *Why not the base_dim-64 fixture:* on a
2-core CPU its 100 pairs x 50 DDIM steps made this a third of the suite's time; that loading such a file reproduces
upstream's network exactly is pinned in tests/test_teacher.py against golden outputs of the upstream code.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from helpers import load_pt, subprocess_env
from models.diffusion.sampling import DEFAULT_DDIM_STEPS
from models.nets.teacher import MNISTDiffusion, TeacherConfig
from models.training.teacher import make_ema

REPO = Path(__file__).resolve().parents[1]

QUICKSTART = [
    ["generate_training_data.py", "--ckpt", "jenny_6x0/steps_00046900.pt", "--n_samples", "100", "--batch_size", "10",
     "--output_dir", "test_data"],
    ["train_direct_decoder.py", "--ddpm_ckpt", "jenny_6x0/steps_00046900.pt", "--data_path",
     "test_data/training_data.pt", "--epochs", "2", "--batch_size", "10", "--output_dir", "test_results"],
    ["test_direct_decoder.py", "--ddpm_ckpt", "jenny_6x0/steps_00046900.pt", "--decoder_ckpt",
     "test_results/ckpt_epoch_002.pt", "--n_samples", "9", "--output_dir", "test_outputs"],
]
HOOK_PNGS = ("baseline", "include", "exclude", "interpolate", "multi_include", "channel_scale", "class_3",
             "hooks_overview")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_upstream_format_teacher(path: Path, base_dim: int = 4) -> None:
    """What upstream's train_mnist.py saves: {"model": MNISTDiffusion.state_dict(), "model_ema": its EMA's}."""
    torch.manual_seed(0)
    diffusion = MNISTDiffusion(TeacherConfig(base_dim=base_dim))
    torch.save({"model": diffusion.state_dict(), "model_ema": make_ema(diffusion, 0.995).state_dict()}, path)


def test_quickstart_small_test_run(tmp_path):
    (tmp_path / "jenny_6x0").mkdir()
    teacher = tmp_path / "jenny_6x0" / "steps_00046900.pt"
    write_upstream_format_teacher(teacher)
    assert set(load_pt(teacher)) == {"model", "model_ema"}
    env = subprocess_env()

    for script, *args in QUICKSTART:
        proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"`python {script} {' '.join(args)}` failed ({proc.returncode}):\n" \
                                     f"{proc.stderr[-3000:]}"

        if script == "generate_training_data.py":
            data = load_pt(tmp_path / "test_data" / "training_data.pt")
            assert data["n_samples"] == 100 and data["kind"] == "training_pairs"
            assert data["noise"].shape == data["images"].shape == (100, 1, 28, 28)
            assert data["images"].abs().max() <= 1.0 and torch.isfinite(data["images"]).all()
            meta = data["metadata"]
            assert meta["sampler"] == "ddim" and meta["steps"] == DEFAULT_DDIM_STEPS and meta["eta"] == 0.0
            assert not (tmp_path / "test_data" / "shards").exists()

        elif script == "train_direct_decoder.py":
            out = tmp_path / "test_results"
            for name in ("ckpt_epoch_001.pt", "ckpt_epoch_002.pt", "best_model.pt", "stats.jsonl", "loss.png",
                         "samples_epoch_002.png", "training_options.json", "evaluation.json"):
                assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
            ckpt = load_pt(out / "ckpt_epoch_002.pt")
            assert ckpt["kind"] == "direct_decoder" and ckpt["epoch"] == 2
            assert ckpt["model_args"]["teacher"]["base_dim"] == 4
            assert ckpt["model_args"]["teacher"]["timesteps"] == 1000
            assert math.isfinite(ckpt["val_loss"])
            report = json.loads((out / "evaluation.json").read_text())
            assert math.isfinite(report["val_mse_to_teacher"]) and report["n_val"] == 10

        else:
            out = tmp_path / "test_outputs"
            for name in HOOK_PNGS:
                path = out / f"{name}.png"
                assert path.is_file(), f"{name}.png missing from {sorted(p.name for p in out.iterdir())}"
                assert path.read_bytes()[:8] == PNG_MAGIC, name
            from PIL import Image
            with Image.open(out / "baseline.png") as im:
                assert im.size == (92, 92)  # 9 samples: 3 x 3 tiles of 28 px with 2 px padding
            effects = json.loads((out / "hook_effects.json").read_text())
            assert set(effects["rows_of_hooks_overview"]) == set(HOOK_PNGS) - {"hooks_overview"}
            for name, effect in effects["effects"].items():
                assert math.isfinite(effect["mean_abs_pixel_change"]) and effect["mean_abs_pixel_change"] >= 0, name
            assert effects["effects"]["baseline"]["mean_abs_pixel_change"] == 0.0
