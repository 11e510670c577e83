"""The cosine noise schedule, apart from any network (diffusers-style), so samplers and tests need no UNet."""
from __future__ import annotations

import math

import torch


def cosine_betas(timesteps: int, epsilon: float = 0.008) -> torch.Tensor:
    """Upstream MNISTDiffusion's schedule: float32 throughout, betas clipped at 0.999."""
    steps = torch.linspace(0, timesteps, steps=timesteps + 1, dtype=torch.float32)
    f_t = torch.cos(((steps / timesteps + epsilon) / (1.0 + epsilon)) * math.pi * 0.5) ** 2
    return torch.clip(1.0 - f_t[1:] / f_t[:timesteps], 0.0, 0.999)


def schedule_buffers(timesteps: int) -> dict[str, torch.Tensor]:
    betas = cosine_betas(timesteps)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=-1)
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "sqrt_alphas_cumprod": torch.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - alphas_cumprod),
    }
