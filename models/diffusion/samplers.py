"""Samplers as plain functions of an epsilon predictor ``eps_fn(x_t, t) -> eps`` and ``alphas_cumprod``.

Nothing here knows about the UNet, so tests drive every sampler with a network-free dummy.

DDIM spacings, each followed by a final step to the clean image (alpha_bar = 1):
- "trailing": ``round(linspace(T-1, 0, K))``, starting at T-1 where the starting noise lives. With the cosine
  schedule alpha_bar[T-1] ~ 2e-9, so the first x0 estimate divides by ~5e-5 and small K suffers.
- "leading" (DDIM paper, diffusers' default): ``range(0, T, T//K)`` reversed, starting at T - T//K, where
  alpha_bar is small but not degenerate; the starting noise is taken as x at that timestep.
K = T gives every timestep for both. Inversion walks the same grid backwards with the same timestep labels, so
``ddim_sample(ddim_invert(x0))`` is the identity up to the ODE's discretisation error.

DPM-Solver++ (Lu et al. 2022; multistep, data prediction) integrates the same ODE as eta=0 DDIM, at second (2M) or
third (3M) order in lambda = log(alpha / sigma), with alpha, sigma and lambda read off the discrete
``alphas_cumprod`` (see ``dpmpp_sample``).
"""
from __future__ import annotations

import math
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


# DPM-Solver++ on the discrete cosine schedule. lambda[999] is -9.9 (alpha_bar ~ 2e-9): an x0 estimate there divides
# the network's error by alpha ~ 5e-5, and a multistep solver would carry it into its next, higher-order steps. As
# diffusers' ``lambda_min_clipped`` does for cosine schedules, the grid starts at the top timestep whose lambda is at
# least LAMBDA_MIN_CLIPPED (t = 995 for T = 1000, alpha_bar 3.9e-5, where x_t is 99.998% noise by variance), and the
# starting noise is taken as x at that timestep.
LAMBDA_MIN_CLIPPED = -5.1
DPMPP_SPACINGS = ("logsnr", "trailing")
DPMPP_SPACING_HELP = ("logsnr: uniform in lambda = log(alpha/sigma) from the clipped top to t = 0, each point at the "
                      "nearest timestep (DPM-Solver's choice for small images); trailing: round(linspace(t_top, 0, K))")


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t) = 0.5 * log(alpha_bar / (1 - alpha_bar)), in float64."""
    abar = alphas_cumprod.double()
    return 0.5 * (torch.log(abar) - torch.log1p(-abar))


def _strictly_descending(grid: list[int], top: int) -> list[int]:
    """Nearest-timestep rounding can repeat a timestep where lambda moves fast (both ends of the cosine schedule):
    push repeats apart, keeping the ends (top, 0). Needs len(grid) <= top + 1."""
    grid = list(grid)
    grid[-1] = 0
    for i in range(len(grid) - 2, -1, -1):
        grid[i] = max(grid[i], grid[i + 1] + 1)
    grid[0] = top
    for i in range(1, len(grid)):
        grid[i] = min(grid[i], grid[i - 1] - 1)
    return grid


def dpmpp_timesteps(alphas_cumprod: torch.Tensor, num_steps: int, spacing: str = "logsnr",
                    lambda_min: float = LAMBDA_MIN_CLIPPED) -> list[int]:
    """K descending timesteps from the highest one with lambda >= lambda_min down to 0 (the solver then steps to
    the clean image, as DDIM does); see DPMPP_SPACING_HELP."""
    if spacing not in DPMPP_SPACINGS:
        raise ValueError(f"unknown DPM-Solver++ spacing {spacing!r}; choose one of {DPMPP_SPACINGS}")
    lam = log_snr(alphas_cumprod)
    above = (lam >= lambda_min).nonzero()
    if len(above) == 0:
        raise ValueError(f"no timestep has lambda >= {lambda_min}")
    top = int(above.max())
    if not 1 <= num_steps <= top + 1:
        raise ValueError(f"DPM-Solver++ steps must be in [1, {top + 1}], got {num_steps}")
    if spacing == "trailing" or num_steps == 1:
        return torch.linspace(top, 0, num_steps, dtype=torch.float64).round().long().tolist()
    targets = torch.linspace(lam[top].item(), lam[0].item(), num_steps, dtype=torch.float64)
    nearest = (lam[:top + 1].view(1, -1) - targets.view(-1, 1)).abs().argmin(dim=1).tolist()
    return _strictly_descending(nearest, top)


def _dpmpp_update(x, x0s: list, lambdas: list, alpha_to: float, sigma_to: float, sigma_from: float,
                  lambda_to: float, order: int):
    """One multistep DPM-Solver++ update from the last of ``lambdas`` to ``lambda_to`` using the last ``order`` data
    predictions ``x0s`` (diffusers' DPMSolverMultistepScheduler, midpoint form of 2M)."""
    h = lambda_to - lambdas[-1]
    phi = -math.expm1(-h)  # 1 - e^{-h}
    x = (sigma_to / sigma_from) * x + (alpha_to * phi) * x0s[-1]
    if order >= 2:
        r0 = (lambdas[-1] - lambdas[-2]) / h
        d1_0 = (x0s[-1] - x0s[-2]) / r0
        if order == 2:
            return x + (0.5 * alpha_to * phi) * d1_0
        r1 = (lambdas[-2] - lambdas[-3]) / h
        d1_1 = (x0s[-2] - x0s[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x = x + (alpha_to * (1.0 - phi / h)) * d1 + (alpha_to * ((phi - h) / h ** 2 + 0.5)) * d2
    return x


def dpmpp_sample(eps_fn: EpsFn, x_T, alphas_cumprod, num_steps: int, order: int = 2, clip_x0: bool = False,
                 spacing: str = "logsnr", lambda_min: float = LAMBDA_MIN_CLIPPED,
                 progress: Optional[Callable[[int], None]] = None):
    """DPM-Solver++(2M/3M) from x_T to the clean image in ``num_steps`` network evaluations (as many as DDIM-K).

    The default grid is uniform in lambda: on the cosine schedule a grid uniform in t takes lambda from -5.1 to
    -1.7 in its first step and from 1.8 to 5.0 in its last, where a linear extrapolation of x0 in lambda is poor
    (on the dummy model 2M on that grid is less accurate than DDIM below K = 30; on the lambda grid it is 8x
    more accurate at K = 8).

    The first step is first order (no history yet); the final step to the clean image (sigma = 0) is the x0
    prediction itself, i.e. first order; with K < 15 the step before it is at most second order (diffusers'
    ``lower_order_final``). ``clip_x0`` clamps each data prediction to [-1, 1] before it enters the update, as
    DDIM's clip option does. Unclipped at order 1 this is exactly eta=0 DDIM on the same grid.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    grid = dpmpp_timesteps(alphas_cumprod, num_steps, spacing, lambda_min)
    abar = alphas_cumprod.double()
    lam = log_snr(alphas_cumprod)
    x, x0s, lambdas = x_T, [], []
    for i, t in enumerate(grid):
        alpha, sigma = abar[t].sqrt().item(), (1.0 - abar[t]).sqrt().item()
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - sigma * eps) / alpha
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        if i + 1 == len(grid):
            x = x0  # sigma = 0: the first-order step to the clean image is the data prediction
        else:
            x0s, lambdas = (x0s + [x0])[-3:], (lambdas + [lam[t].item()])[-3:]
            step_order = min(order, i + 1, 2 if len(grid) < 15 and i + 2 == len(grid) else 3)
            nxt = grid[i + 1]
            x = _dpmpp_update(x, x0s, lambdas, abar[nxt].sqrt().item(), (1.0 - abar[nxt]).sqrt().item(), sigma,
                              lam[nxt].item(), step_order)
        if progress:
            progress(1)
    return x
