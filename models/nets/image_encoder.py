"""The image encoder: the UNet's encoder reading a clean image (t = 0) and returning the student's bottleneck for
it, the network behind reference features (why, and its training: models/training/image_encoder.py)."""
from __future__ import annotations

import torch

from .teacher import TeacherConfig
from .unet import Unet

ENCODER_KEYS = ("init_conv.", "time_embedding.", "encoder_blocks.", "mid_block.")


class ImageEncoder(torch.nn.Module):
    """The UNet's encoder reading a clean image (t = 0), warm-started from the teacher, whose encoder at t = 0
    already describes clean digits."""

    def __init__(self, config: TeacherConfig):
        super().__init__()
        self.config = config
        self.unet = Unet(config.timesteps, config.time_embedding_dim, config.in_channels, config.in_channels,
                         config.base_dim, list(config.dim_mults))
        del self.unet.decoder_blocks, self.unet.final_conv  # encode() needs none of the decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
        return self.unet.encode(x, t)[0]

    @classmethod
    def from_teacher(cls, teacher_unet: Unet, config: TeacherConfig) -> "ImageEncoder":
        encoder = cls(config)
        state = {k: v for k, v in teacher_unet.state_dict().items() if k.startswith(ENCODER_KEYS)}
        encoder.unet.load_state_dict(state, strict=True)
        return encoder


def load_image_encoder(record: dict, device="cpu") -> ImageEncoder:
    encoder = ImageEncoder(TeacherConfig(**record["model_args"]))
    encoder.load_state_dict(record["state_dict"], strict=True)
    return encoder.to(device).eval().requires_grad_(False)
