"""Teacher sampling with per-sample randomness: what generate, evaluation and benchmarks all call."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional, Sequence

import torch

from ..nets.teacher import MNISTDiffusion
from .noise import per_sample_noise
from .samplers import DPMPP_SPACINGS, SPACINGS, ddim_sample, ddim_timesteps, ddpm_sample, dpmpp_sample, dpmpp_timesteps

SAMPLERS = ("ddim", "ddpm", "dpmpp2m", "dpmpp3m")
DPMPP_ORDERS = {"dpmpp2m": 2, "dpmpp3m": 3}
# Chosen from the DDIM-K quality sweeps in BENCHMARKS.md (bench/bench_ddim_quality.py). Trailing spacing starts
# at t = T-1, where the starting noise is the prior (leading K = 50 starts at t = 980 and broke on teachers with a
# poorly trained top band); K = 50 instead of 25 draws the thin 1s at their share.
DEFAULT_DDIM_STEPS = 50
DEFAULT_SPACING = "trailing"
SPACING_HELP = ("leading: range(0, T, T//K) reversed (DDIM paper); trailing: round(linspace(T-1, 0, K)); "
                "both end with a step to the clean image")


ALL_TIMESTEPS = "all timesteps"
SPACINGS_OF = {"ddim": SPACINGS, "ddpm": (ALL_TIMESTEPS,), "dpmpp2m": DPMPP_SPACINGS, "dpmpp3m": DPMPP_SPACINGS}
DEFAULT_SPACING_OF = {"ddim": DEFAULT_SPACING, "ddpm": ALL_TIMESTEPS, "dpmpp2m": "logsnr", "dpmpp3m": "logsnr"}


@dataclass(frozen=True)
class SamplerConfig:
    """The teacher sampler that makes a set of pairs: saved with the pairs (metadata "sampler_config"), recorded by
    the student that learned them, and read back by everything that must use the same noise -> image map
    (comparisons with the teacher, continued training, inversion to where the student's noise lives).

    ``spacing`` None picks the sampler's default (DEFAULT_SPACING_OF); ddpm always runs every timestep
    (``steps`` = the teacher's T) with eta 1; DPM-Solver++ is deterministic (eta 0).
    """
    name: str = "ddim"
    steps: int = DEFAULT_DDIM_STEPS
    spacing: Optional[str] = None
    eta: float = 0.0
    clip_x0: bool = True

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {SAMPLERS}")
        if self.spacing is None:
            object.__setattr__(self, "spacing", DEFAULT_SPACING_OF[self.name])
        if self.name == "ddpm":
            object.__setattr__(self, "eta", 1.0)
        if self.spacing not in SPACINGS_OF[self.name]:
            raise ValueError(f"spacing {self.spacing!r} is not one of {self.name}'s: {SPACINGS_OF[self.name]}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.name in DPMPP_ORDERS and self.eta != 0.0:
            raise ValueError(f"{self.name} is deterministic: eta must be 0, got {self.eta}")

    @property
    def deterministic(self) -> bool:
        return self.name != "ddpm" and self.eta == 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SamplerConfig":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampler config keys {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_metadata(cls, meta: dict) -> "SamplerConfig":
        """From a pairs file's metadata; files written before "sampler_config" existed carry the same facts in
        their flat keys (sampler, steps, spacing, eta, clip_x0; missing ones were the defaults of their day)."""
        if "sampler_config" in meta:
            return cls.from_dict(meta["sampler_config"])
        name = meta.get("sampler", "ddim")
        if name == "ddpm":
            return cls("ddpm", int(meta.get("steps", 1000)), clip_x0=bool(meta.get("clip_x0", True)))
        return cls(name, int(meta.get("steps", DEFAULT_DDIM_STEPS)), meta.get("spacing", DEFAULT_SPACING_OF[name]),
                   float(meta.get("eta", 0.0)), bool(meta.get("clip_x0", True)))

    @classmethod
    def from_student(cls, student_checkpoint: dict) -> "SamplerConfig":
        """The sampler behind a student's training pairs (its checkpoint or its config records them)."""
        return cls.from_metadata(student_checkpoint.get("training_data", {}).get("metadata", {}))

    def deterministic_map(self) -> "SamplerConfig":
        """The noise -> image map to compare a student with: this sampler, or for ancestral pairs (no map) the
        default DDIM."""
        return self if self.deterministic else SamplerConfig()

    def timesteps(self, alphas_cumprod: torch.Tensor) -> list[int]:
        """The timesteps the sampler evaluates, descending; the first is where its starting noise lives."""
        if self.name == "ddim":
            return ddim_timesteps(len(alphas_cumprod), self.steps, self.spacing)
        if self.name in DPMPP_ORDERS:
            return dpmpp_timesteps(alphas_cumprod, self.steps, self.spacing)
        return list(range(len(alphas_cumprod) - 1, -1, -1))

    def describe(self) -> str:
        eta = f", eta {self.eta:g}" if self.name == "ddim" and self.eta else ""
        return f"{self.name} K={self.steps} {self.spacing}{eta}" + ("" if self.clip_x0 else ", x0 not clipped")

    def sample(self, diffusion: MNISTDiffusion, noise: torch.Tensor, seed: int = 0,
               indices: Optional[Sequence[int]] = None, **kwargs) -> torch.Tensor:
        """``teacher_sample`` with this configuration (``kwargs``: precision, eps_fn, progress)."""
        return teacher_sample(diffusion, noise, self.name, self.steps, self.eta, self.clip_x0, seed, indices,
                              spacing=self.spacing, **kwargs)


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
                   spacing: Optional[str] = None):
    """Images in [-1, 1] for starting noise ``noise`` (sample i's extra noise, if any, is keyed by (seed, i));
    ``spacing`` None is the sampler's default grid."""
    eps_fn = eps_fn or diffusion.predict_noise
    spacing = spacing or DEFAULT_SPACING_OF.get(sampler, DEFAULT_SPACING)
    device = noise.device
    indices = list(range(noise.shape[0])) if indices is None else list(indices)

    def step_noise(t: int) -> torch.Tensor:
        return per_sample_noise(seed, indices, tuple(noise.shape[1:]), stream=1 + t, device=device)

    with torch.inference_mode(), autocast_for(device, precision):
        if sampler == "ddim":
            x = ddim_sample(eps_fn, noise, diffusion.alphas_cumprod, steps, eta=eta, clip_x0=clip_x0,
                            step_noise=step_noise if eta > 0 else None, progress=progress, spacing=spacing)
        elif sampler in DPMPP_ORDERS:
            x = dpmpp_sample(eps_fn, noise, diffusion.alphas_cumprod, steps, order=DPMPP_ORDERS[sampler],
                             clip_x0=clip_x0, spacing=spacing, progress=progress)
        elif sampler == "ddpm":
            x = ddpm_sample(eps_fn, noise, diffusion.betas, diffusion.alphas, diffusion.alphas_cumprod,
                            step_noise, clip_x0=clip_x0, progress=progress)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    return x.float().clamp(-1.0, 1.0)
