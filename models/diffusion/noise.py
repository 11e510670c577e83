"""Per-sample seeding: sample i's noise depends only on (seed, i), never on batch size or device count."""
from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + index * 7_919 + stream * _MIX) % (2 ** 63 - 1)


def per_sample_noise(seed: int, indices, shape=(1, 28, 28), stream: int = 0, device="cpu") -> torch.Tensor:
    """Generated on the CPU so the same seed gives the same noise on every device."""
    gen = torch.Generator()
    out = torch.empty((len(indices), *shape))
    for row, index in enumerate(indices):
        gen.manual_seed(sample_seed(seed, int(index), stream))
        out[row] = torch.randn(shape, generator=gen)
    return out.to(device)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The RNG of one training step: resuming at step k replays exactly what an unbroken run would draw."""
    return torch.Generator().manual_seed(sample_seed(seed, step, stream=1))
