"""Samplers as plain functions of an epsilon predictor ``eps_fn(x_t, t) -> eps`` and ``alphas_cumprod``.

Nothing here knows about the UNet, so tests drive every sampler with a network-free dummy.

DDIM spacings, each followed by a final step to the clean image (alpha_bar = 1):
- "trailing": ``round(linspace(T-1, 0, K))``, starting at T-1 where the starting noise lives. With the cosine
  schedule alpha_bar[T-1] ~ 2e-9, so the first x0 estimate divides by ~5e-5 and small K suffers.
- "leading" (DDIM paper, diffusers' default): ``range(0, T, T//K)`` reversed, starting at T - T//K, where
  alpha_bar is small but not degenerate; the starting noise is taken as x at that timestep.
K = T gives every timestep for both. Inversion walks the same grid backwards with the same timestep labels, so
``ddim_sample(ddim_invert(x0))`` is the identity up to the ODE's discretisation error.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, t).view(-1, 1, 1, 1)


def ddpm_reverse_step(eps_fn: EpsFn, x_t, t, noise, betas, alphas, alphas_cumprod, clip_x0: bool = True):
    """One ancestral step x_t -> x_{t-1}, arithmetic identical to upstream's (clipped and unclipped variants)."""
    eps = eps_fn(x_t, t)
    alpha_t = _per_sample(alphas, t)
    abar_t = _per_sample(alphas_cumprod, t)
    beta_t = _per_sample(betas, t)
    last = bool(t.min() == 0)
    if clip_x0:
        x0 = (torch.sqrt(1.0 / abar_t) * x_t - torch.sqrt(1.0 / abar_t - 1.0) * eps).clamp_(-1.0, 1.0)
        if last:
            return (beta_t / (1.0 - abar_t)) * x0
        abar_prev = _per_sample(alphas_cumprod, t - 1)
        mean = (beta_t * torch.sqrt(abar_prev) / (1.0 - abar_t)) * x0 + \
               ((1.0 - abar_prev) * torch.sqrt(alpha_t) / (1.0 - abar_t)) * x_t
    else:
        sqrt_one_minus_abar = torch.sqrt(1.0 - abar_t)
        mean = (1.0 / torch.sqrt(alpha_t)) * (x_t - ((1.0 - alpha_t) / sqrt_one_minus_abar) * eps)
        if last:
            return mean
        abar_prev = _per_sample(alphas_cumprod, t - 1)
    std = torch.sqrt(beta_t * (1.0 - abar_prev) / (1.0 - abar_t))
    return mean + std * noise


def ddpm_sample(eps_fn: EpsFn, x_T, betas, alphas, alphas_cumprod, step_noise: Callable[[int], torch.Tensor],
                clip_x0: bool = True, progress: Optional[Callable[[int], None]] = None):
    """Upstream's 1000-step ancestral sampler; ``step_noise(t)`` supplies the fresh noise of step t."""
    x = x_T
    for i in range(len(betas) - 1, -1, -1):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x = ddpm_reverse_step(eps_fn, x, t, step_noise(i), betas, alphas, alphas_cumprod, clip_x0)
        if progress:
            progress(1)
    return x


SPACINGS = ("trailing", "leading")


def ddim_timesteps(num_train_steps: int, num_steps: int, spacing: str = "trailing") -> list[int]:
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"DDIM steps must be in [1, {num_train_steps}], got {num_steps}")
    if spacing == "trailing":
        return torch.linspace(num_train_steps - 1, 0, num_steps, dtype=torch.float64).round().long().tolist()
    if spacing == "leading":
        return list(range(0, num_train_steps, num_train_steps // num_steps))[:num_steps][::-1]
    raise ValueError(f"unknown DDIM spacing {spacing!r}; choose one of {SPACINGS}")


def _ddim_move(x, eps, abar_from, abar_to, clip_x0: bool):
    x0 = (x - torch.sqrt(1.0 - abar_from) * eps) / torch.sqrt(abar_from)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    return torch.sqrt(abar_to) * x0 + torch.sqrt(1.0 - abar_to) * eps


def ddim_sample(eps_fn: EpsFn, x_T, alphas_cumprod, num_steps: int, eta: float = 0.0, clip_x0: bool = False,
                step_noise: Optional[Callable[[int], torch.Tensor]] = None,
                progress: Optional[Callable[[int], None]] = None, spacing: str = "trailing"):
    """DDIM from x_T (at t = T-1) to the clean image. eta=0 is a deterministic ODE map: noise -> image."""
    if eta < 0 or eta > 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta > 0 and step_noise is None:
        raise ValueError("eta > 0 needs step_noise")
    grid = ddim_timesteps(len(alphas_cumprod), num_steps, spacing)
    one = torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    x = x_T
    for i, t in enumerate(grid):
        abar_t = alphas_cumprod[t]
        abar_prev = alphas_cumprod[grid[i + 1]] if i + 1 < len(grid) else one
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        if eta == 0:
            x = _ddim_move(x, eps, abar_t, abar_prev, clip_x0)
        else:
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
            x0 = (x - torch.sqrt(1.0 - abar_t) * eps) / torch.sqrt(abar_t)
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
            x = torch.sqrt(abar_prev) * x0 + torch.sqrt(1.0 - abar_prev - sigma ** 2) * eps + sigma * step_noise(t)
        if progress:
            progress(1)
    return x


def inversion_timesteps(end_timestep: int, num_steps: int) -> list[int]:
    """An ascending grid of ``num_steps`` timesteps from 0 to ``end_timestep``, evenly spaced.

    Inversion must end where the sampler it inverts starts (e.g. t = 960 for leading K = 25), or the latent
    holds a different share of signal than the noise the sampler, and a student distilled from it, expects.
    With end = T - T//K and num_steps = K it is exactly the leading grid walked upwards.
    """
    if num_steps < 1:
        raise ValueError(f"inversion steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return [int(end_timestep)]
    grid = torch.linspace(0, end_timestep, num_steps, dtype=torch.float64).round().long().tolist()
    return sorted(set(grid))


def ddim_invert(eps_fn: EpsFn, x_0, alphas_cumprod, num_steps: int,
                progress: Optional[Callable[[int], None]] = None, spacing: str = "trailing",
                timesteps: Optional[list[int]] = None):
    """Image -> the latent that eta=0 DDIM maps back to it: the sampling grid of (num_steps, spacing) walked
    upwards, or an explicit ascending ``timesteps`` grid (see ``inversion_timesteps``)."""
    grid = list(timesteps) if timesteps is not None else \
        list(reversed(ddim_timesteps(len(alphas_cumprod), num_steps, spacing)))
    if any(b <= a for a, b in zip(grid, grid[1:])) or not grid or grid[0] < 0 or grid[-1] >= len(alphas_cumprod):
        raise ValueError(f"inversion timesteps must ascend within [0, {len(alphas_cumprod) - 1}], got {grid}")
    abar_from = torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    x = x_0
    for t in grid:
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        abar_to = alphas_cumprod[t]
        x = _ddim_move(x, eps, abar_from, abar_to, clip_x0=False)
        abar_from = abar_to
        if progress:
            progress(1)
    return x
