"""Teacher sampling with per-sample randomness: what generate, evaluation and benchmarks all call."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch

from .diffusion import MNISTDiffusion
from .noise import per_sample_noise
from .samplers import ddim_sample, ddpm_sample

SAMPLERS = ("ddim", "ddpm")
# Chosen from the DDIM-K quality sweeps in BENCHMARKS.md (bench/bench_ddim_quality.py). Trailing spacing starts
# at t = T-1, where the starting noise is the prior (leading K = 50 starts at t = 980 and broke on teachers with a
# poorly trained top band); K = 50 instead of 25 draws the thin 1s at their share.
DEFAULT_DDIM_STEPS = 50
DEFAULT_SPACING = "trailing"
SPACING_HELP = ("leading: range(0, T, T//K) reversed (DDIM paper); trailing: round(linspace(T-1, 0, K)); "
                "both end with a step to the clean image")


def pairs_sampler(student_checkpoint: dict) -> dict:
    """The teacher sampler behind a student's training pairs: the map it learned, so comparisons with the teacher,
    continued training and inversion all use that map rather than today's default."""
    meta = student_checkpoint.get("training_data", {}).get("metadata", {})
    if meta.get("sampler", "ddim") != "ddim":
        return {"sampler": meta["sampler"], "steps": DEFAULT_DDIM_STEPS, "spacing": DEFAULT_SPACING}
    return {"sampler": "ddim", "steps": int(meta.get("steps", DEFAULT_DDIM_STEPS)),
            "spacing": meta.get("spacing", "trailing")}


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast only on CUDA and only when asked; CPU paths stay fp32 and bit-reproducible."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def configure_precision(device: torch.device, precision: str) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision in ("tf32", "bf16")
        torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")


def teacher_sample(diffusion: MNISTDiffusion, noise: torch.Tensor, sampler: str = "ddim",
                   steps: int = DEFAULT_DDIM_STEPS, eta: float = 0.0, clip_x0: bool = True,
                   seed: int = 0, indices: Optional[Sequence[int]] = None, precision: str = "fp32",
                   eps_fn: Optional[Callable] = None, progress: Optional[Callable[[int], None]] = None,
                   spacing: str = DEFAULT_SPACING):
    """Images in [-1, 1] for starting noise ``noise`` (sample i's extra noise, if any, is keyed by (seed, i))."""
    eps_fn = eps_fn or diffusion.predict_noise
    device = noise.device
    indices = list(range(noise.shape[0])) if indices is None else list(indices)

    def step_noise(t: int) -> torch.Tensor:
        return per_sample_noise(seed, indices, tuple(noise.shape[1:]), stream=1 + t, device=device)

    with torch.inference_mode(), autocast_for(device, precision):
        if sampler == "ddim":
            x = ddim_sample(eps_fn, noise, diffusion.alphas_cumprod, steps, eta=eta, clip_x0=clip_x0,
                            step_noise=step_noise if eta > 0 else None, progress=progress, spacing=spacing)
        elif sampler == "ddpm":
            x = ddpm_sample(eps_fn, noise, diffusion.betas, diffusion.alphas, diffusion.alphas_cumprod,
                            step_noise, clip_x0=clip_x0, progress=progress)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    return x.float().clamp(-1.0, 1.0)
