"""The teacher's UNet, parameter-for-parameter compatible with MNISTDiffusion checkpoints.

Module names mirror the upstream ones exactly (``init_conv.module.0``, ``encoder_blocks.0.conv0`` ...)
because the state dict is the interchange format: a user's ``steps_00046900.pt`` must load strictly.
The only additions are the optional hooks: ``bottleneck_hook`` and ``decode``'s ``after_block`` (a hook after a decoder
block), the places where the direct decoder is steered.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

BottleneckHook = Callable[[torch.Tensor], torch.Tensor]


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ConvBnSiLu(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.module = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding),
            nn.BatchNorm2d(out_channels),
            nn.SiLU(inplace=True),
        )

    def forward(self, x):
        return self.module(x)


def _depthwise_bn(channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(channels, channels, 3, stride, 1, groups=channels), nn.BatchNorm2d(channels)]


class ResidualBottleneck(nn.Module):
    """ShuffleNet-v2 unit: half the channels pass a cheap branch, half a deeper one, then shuffle."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        half_in, half_out = in_channels // 2, out_channels // 2
        self.branch1 = nn.Sequential(*_depthwise_bn(half_in, 1), ConvBnSiLu(half_in, half_out, 1, 1, 0))
        self.branch2 = nn.Sequential(ConvBnSiLu(half_in, half_in, 1, 1, 0), *_depthwise_bn(half_in, 1),
                                     ConvBnSiLu(half_in, half_out, 1, 1, 0))
        self.channel_shuffle = ChannelShuffle(2)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return self.channel_shuffle(torch.cat([self.branch1(a), self.branch2(b)], dim=1))


class ResidualDownsample(nn.Module):
    """ShuffleNet-v2 stride-2 unit: both branches see all channels and halve the resolution."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        half_out = out_channels // 2
        self.branch1 = nn.Sequential(*_depthwise_bn(in_channels, 2), ConvBnSiLu(in_channels, half_out, 1, 1, 0))
        self.branch2 = nn.Sequential(ConvBnSiLu(in_channels, half_out, 1, 1, 0), *_depthwise_bn(half_out, 2),
                                     ConvBnSiLu(half_out, half_out, 1, 1, 0))
        self.channel_shuffle = ChannelShuffle(2)

    def forward(self, x):
        return self.channel_shuffle(torch.cat([self.branch1(x), self.branch2(x)], dim=1))


class TimeMLP(nn.Module):
    def __init__(self, embedding_dim, hidden_dim, out_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))
        self.act = nn.SiLU()

    def forward(self, x, t_emb):
        return self.act(x + self.mlp(t_emb)[:, :, None, None])


class EncoderBlock(nn.Module):
    def __init__(self, in_channels, out_channels, time_embedding_dim):
        super().__init__()
        self.conv0 = nn.Sequential(*[ResidualBottleneck(in_channels, in_channels) for _ in range(3)],
                                   ResidualBottleneck(in_channels, out_channels // 2))
        self.time_mlp = TimeMLP(time_embedding_dim, out_channels, out_channels // 2)
        self.conv1 = ResidualDownsample(out_channels // 2, out_channels)

    def forward(self, x, t_emb=None):
        shortcut = self.conv0(x)
        x = shortcut if t_emb is None else self.time_mlp(shortcut, t_emb)
        return self.conv1(x), shortcut


class DecoderBlock(nn.Module):
    def __init__(self, in_channels, out_channels, time_embedding_dim):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv0 = nn.Sequential(*[ResidualBottleneck(in_channels, in_channels) for _ in range(3)],
                                   ResidualBottleneck(in_channels, in_channels // 2))
        self.time_mlp = TimeMLP(time_embedding_dim, in_channels, in_channels // 2)
        self.conv1 = ResidualBottleneck(in_channels // 2, out_channels // 2)

    def forward(self, x, shortcut, t_emb=None):
        x = self.conv0(torch.cat([self.upsample(x), shortcut], dim=1))
        if t_emb is not None:
            x = self.time_mlp(x, t_emb)
        return self.conv1(x)


def sinusoidal_table(timesteps: int, dim: int) -> torch.Tensor:
    """Transformer-style sin/cos rows, one per timestep: a smooth start for upstream's learned ``nn.Embedding``.

    Upstream initialises the table at random, so every timestep's row is learned alone from the few hundred
    batches that draw it; smooth rows let neighbouring timesteps share what the network learns from the start.
    """
    if dim % 2:
        raise ValueError(f"time_embedding_dim must be even for a sinusoidal table, got {dim}")
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(timesteps, dtype=torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def stage_channels(base_dim: int, dim_mults: Sequence[int]) -> list[tuple[int, int]]:
    dims = [base_dim] + [base_dim * m for m in dim_mults]
    return list(zip(dims[:-1], dims[1:]))


class Unet(nn.Module):
    """Upstream UNet. ``encode``/``decode`` split it at the bottleneck so the student can be read and steered there."""

    def __init__(self, timesteps, time_embedding_dim, in_channels=1, out_channels=1, base_dim=64, dim_mults=(2, 4)):
        super().__init__()
        if base_dim % 2:
            raise ValueError(f"base_dim must be even, got {base_dim}")
        channels = stage_channels(base_dim, dim_mults)
        self.init_conv = ConvBnSiLu(in_channels, base_dim, 3, 1, 1)
        self.time_embedding = nn.Embedding(timesteps, time_embedding_dim)
        self.encoder_blocks = nn.ModuleList([EncoderBlock(c_in, c_out, time_embedding_dim) for c_in, c_out in channels])
        self.decoder_blocks = nn.ModuleList(
            [DecoderBlock(c_out, c_in, time_embedding_dim) for c_in, c_out in reversed(channels)])
        deepest = channels[-1][1]
        self.mid_block = nn.Sequential(*[ResidualBottleneck(deepest, deepest) for _ in range(2)],
                                       ResidualBottleneck(deepest, deepest // 2))
        self.final_conv = nn.Conv2d(channels[0][0] // 2, out_channels, kernel_size=1)

    def encode(self, x, t=None, before_mid: Optional[nn.Module] = None):
        """Returns the bottleneck features and the skip connections the decoder needs. ``before_mid``: an extra
        module (not part of the upstream format) applied to the deepest features before the mid block."""
        t_emb = None if t is None else self.time_embedding(t)
        x = self.init_conv(x)
        shortcuts = []
        for block in self.encoder_blocks:
            x, shortcut = block(x, t_emb)
            shortcuts.append(shortcut)
        if before_mid is not None:
            x = before_mid(x)
        return self.mid_block(x), shortcuts, t_emb

    def decode(self, h, shortcuts, t_emb=None, after_block: Optional[Sequence[Optional[BottleneckHook]]] = None):
        """``after_block[i]``: a hook applied to decoder block i's output (None: none)."""
        return self.final_conv(self.decode_blocks(h, shortcuts, t_emb, after_block=after_block))

    def decode_blocks(self, h, shortcuts, t_emb=None, start: int = 0, stop: Optional[int] = None,
                      after_block: Optional[Sequence[Optional[BottleneckHook]]] = None):
        """Decoder blocks ``start`` to ``stop - 1`` (default: all) from ``h``, the input of block ``start``: the
        features after block ``stop - 1``, before the final convolution."""
        pairs = list(zip(self.decoder_blocks, reversed(shortcuts)))
        for i in range(start, len(pairs) if stop is None else stop):
            block, shortcut = pairs[i]
            h = block(h, shortcut, t_emb)
            if after_block is not None and after_block[i] is not None:
                h = after_block[i](h)
        return h

    def forward(self, x, t=None, bottleneck_hook: Optional[BottleneckHook] = None):
        h, shortcuts, t_emb = self.encode(x, t)
        if bottleneck_hook is not None:
            h = bottleneck_hook(h)
        return self.decode(h, shortcuts, t_emb)


def batchnorm_layers(model: torch.nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int,
                          forward: Optional[Callable[[torch.Tensor], object]] = None) -> None:
    """Recomputes BatchNorm running statistics as exact averages over ``inputs`` (deterministic, in place).

    The statistics a model carries lag its weights, and the EMA's averaged statistics do not belong to its
    averaged weights; where a channel is constant (the zeroed skips' halves) the variance is ~0 and any lag is
    amplified ~300x in eval mode. Evaluating and saving with recalibrated statistics removes both errors.
    ``forward`` runs one slice of ``inputs`` (default: ``model(slice)``), for models that take more than one input.
    """
    norms = batchnorm_layers(model)
    if not norms or inputs.shape[0] == 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    forward = forward or model
    for start in range(0, inputs.shape[0], batch_size):
        forward(inputs[start:start + batch_size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
