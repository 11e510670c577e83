"""The discriminator of adversarial distillation: tells real 28x28 digits from the student's one-step images
(spectral norm on every layer; its loss and training: models/training/adversarial.py)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class Discriminator(nn.Module):
    """28 -> 14 -> 7 -> 4 strided convolutions, then a linear score; about 0.4M parameters at width 64."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.width = width
        self.body = nn.Sequential(
            spectral_norm(nn.Conv2d(1, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * width, 4 * width, 3, 2, 1)), nn.LeakyReLU(0.2),
        )
        self.head = spectral_norm(nn.Linear(4 * width * 4 * 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1)).squeeze(1)
