"""The image encoder: the UNet's encoder reading a clean image (t = 0) and returning the student's bottleneck for
it, the network behind reference features (why, and its training: models/training/image_encoder.py)."""
from __future__ import annotations

import torch

from ..io.errors import PipelineError
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
        self.frozen_blocks = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
        return self.unet.encode(x, t)[0]

    def _t_emb(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet.time_embedding(torch.zeros(x.shape[0], device=x.device, dtype=torch.long))

    def stem(self, x: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The input conv and the first ``n_blocks`` encoder blocks: ``head(stem(x, n), n)`` is ``forward(x)``."""
        t_emb = self._t_emb(x)
        x = self.unet.init_conv(x)
        for block in self.unet.encoder_blocks[:n_blocks]:
            x = block(x, t_emb)[0]
        return x

    def head(self, x: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The encoder blocks after the first ``n_blocks``, then the mid block: the bottleneck."""
        t_emb = self._t_emb(x)
        for block in self.unet.encoder_blocks[n_blocks:]:
            x = block(x, t_emb)[0]
        return self.unet.mid_block(x)

    def head_modules(self, n_blocks: int) -> torch.nn.ModuleList:
        return torch.nn.ModuleList([*self.unet.encoder_blocks[n_blocks:], self.unet.mid_block])

    def freeze_stem(self, n_blocks: int) -> None:
        """Keeps the input conv, the time embedding and the first ``n_blocks`` encoder blocks at the teacher's
        weights and BatchNorm statistics (eval mode whatever ``train()`` says), so training runs the rest only and
        the stem's output of a fixed image can be computed once. *Why:* the full-resolution layers are most of a
        training step's cost, and the teacher's filters there already describe clean strokes."""
        if not 0 <= n_blocks <= len(self.unet.encoder_blocks):
            raise PipelineError(f"--encoder_frozen_blocks must be in 0..{len(self.unet.encoder_blocks)}, got {n_blocks}")
        self.frozen_blocks = n_blocks
        for module in self._stem_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def _stem_modules(self) -> list[torch.nn.Module]:
        if not self.frozen_blocks:
            return []
        return [self.unet.init_conv, self.unet.time_embedding, *self.unet.encoder_blocks[:self.frozen_blocks]]

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._stem_modules():
            module.eval()
        return self

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
