"""The teacher: MNISTDiffusion's module layout (schedule buffers + ``model`` UNet), so its state dict is upstream's."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..diffusion.schedule import schedule_buffers
from .unet import Unet


@dataclass
class TeacherConfig:
    """Everything needed to rebuild the teacher; stored in every checkpoint as ``model_args``."""
    image_size: int = 28
    in_channels: int = 1
    time_embedding_dim: int = 256
    timesteps: int = 1000
    base_dim: int = 64
    dim_mults: list = field(default_factory=lambda: [2, 4])

    def __post_init__(self):
        self.dim_mults = list(self.dim_mults)  # a tuple from inference and a list from JSON are the same architecture

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def bottleneck_shape(self) -> tuple[int, int, int]:
        side = self.image_size // 2 ** len(self.dim_mults)
        return (self.base_dim * self.dim_mults[-1] // 2, side, side)


class MNISTDiffusion(nn.Module):
    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.config = config
        self.timesteps = config.timesteps
        self.in_channels = config.in_channels
        self.image_size = config.image_size
        for name, value in schedule_buffers(config.timesteps).items():
            self.register_buffer(name, value)
        self.model = Unet(config.timesteps, config.time_embedding_dim, config.in_channels, config.in_channels,
                          config.base_dim, list(config.dim_mults))

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x_t, t)

    def q_sample(self, x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0)."""
        a = self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        return a * x_0 + s * noise

    def forward(self, x_0, noise, t):
        """Training objective input/target pair: epsilon prediction at (x_t, t), as upstream."""
        return self.model(self.q_sample(x_0, t, noise), t)
