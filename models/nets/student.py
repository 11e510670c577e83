"""The direct decoder: the teacher's UNet used as a one-step map noise -> image, steerable at its bottleneck.

It runs the UNet at a fixed input timestep (T-1, where the starting noise lives) and regresses the teacher's
image directly. Warm-starting from the teacher's weights gives it the teacher's features from step one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..io.checkpoints import load_checkpoint
from ..io.errors import PipelineError
from ..io.files import sha256_file
from ..io.teacher_checkpoints import (LoadedTeacher, inference_weights, load_strict, load_teacher,
                                      require_finite_checkpoint)
from .layers import BOTTLENECK, LayerError, block_index, layer_names, layer_plan
from .teacher import TeacherConfig
from .unet import BottleneckHook, Unet, stage_channels

STUDENT_FIX = "pass a checkpoint written by train_direct_decoder.py (e.g. direct_decoder_results/best_model.pt)"


SKIP_MODES = ("zero", "keep")
GLOBAL_CONTEXT = ("none", "attention")


class GlobalAttention(nn.Module):
    """Self-attention over every position of the deepest features, before the mid block.

    The teacher decides which digit a noise becomes over many steps, each a fresh pass that lets distant pixels
    interact; one pass of its convolutions sees a field whose effective size is a fraction of the image. This
    block lets every position read the whole noise at once. Its output projection starts at zero, so a student
    gains it as an identity and keeps everything it learned; it sits in the encoder, so the image stays a
    function of the bottleneck alone.
    """

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = next(h for h in (heads, 2, 1) if channels % h == 0)
        self.norm = nn.GroupNorm(math.gcd(8, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (n, heads, h*w, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class DirectDecoder(nn.Module):
    """``skips="zero"`` (the default) feeds the decoder zeros instead of the encoder's skip connections, so every
    output pixel depends on the input only through the bottleneck: a hook there then steers all of the image.
    With ``"keep"`` (the teacher's wiring) the 28x28 and 14x14 skips carry most of the content past the
    bottleneck, and bottleneck hooks barely move the output (measured in BENCHMARKS.md)."""

    def __init__(self, teacher_config: TeacherConfig, input_timestep: Optional[int] = None, skips: str = "zero",
                 global_context: str = "none"):
        super().__init__()
        if skips not in SKIP_MODES:
            raise PipelineError(f"skips must be one of {SKIP_MODES}, got {skips!r}")
        if global_context not in GLOBAL_CONTEXT:
            raise PipelineError(f"global_context must be one of {GLOBAL_CONTEXT}, got {global_context!r}")
        c = teacher_config
        self.teacher_config = c
        self.skips = skips
        self.global_context = global_context
        self.input_timestep = c.timesteps - 1 if input_timestep is None else int(input_timestep)
        self.unet = Unet(c.timesteps, c.time_embedding_dim, c.in_channels, c.in_channels, c.base_dim,
                         list(c.dim_mults))
        # the student's only module outside the teacher's format; absent unless asked for
        self.context = GlobalAttention(c.base_dim * c.dim_mults[-1]) if global_context == "attention" else None

    @property
    def model_args(self) -> dict:
        return {"teacher": self.teacher_config.to_dict(), "input_timestep": self.input_timestep, "skips": self.skips,
                "global_context": self.global_context}

    @property
    def bottleneck_shape(self) -> tuple[int, int, int]:
        return self.teacher_config.bottleneck_shape

    def _timestep(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full((z.shape[0],), self.input_timestep, device=z.device, dtype=torch.long)

    def _encode(self, z: torch.Tensor):
        h, shortcuts, t_emb = self.unet.encode(z, self._timestep(z), self.context)
        if self.skips == "zero":
            shortcuts = self._zero_skips(h)
        return h, shortcuts, t_emb

    def _zero_skips(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Zeros in the shapes of the encoder's shortcuts (stage i: c_out/2 channels at side image_size / 2^i)."""
        c = self.teacher_config
        return [h.new_zeros(h.shape[0], c_out // 2, c.image_size >> i, c.image_size >> i)
                for i, (_, c_out) in enumerate(stage_channels(c.base_dim, c.dim_mults))]

    def forward(self, z: torch.Tensor, hook: Optional[BottleneckHook] = None) -> torch.Tensor:
        return self.generate(z, hook)[0]

    @property
    def hook_layers(self) -> tuple[str, ...]:
        """The layers a hook may act at, in decoder order (models/nets/layers.py names them)."""
        return layer_names(len(self.unet.decoder_blocks))

    def layer_shape(self, layer: str) -> tuple[int, int, int]:
        """[C, H, W] of ``layer``'s features (decoder block i halves its input's channels twice, doubles the side)."""
        i = block_index(layer, self.hook_layers)
        c, side, _ = self.bottleneck_shape
        stages = stage_channels(self.teacher_config.base_dim, self.teacher_config.dim_mults)
        return (c, side, side) if i == 0 else (stages[-i][0] // 2, side << i, side << i)

    def _decoder_inputs(self, h: torch.Tensor):
        if self.skips != "zero":
            raise PipelineError("decoding from the bottleneck alone needs a student trained with --skips zero")
        return self._zero_skips(h), self.unet.time_embedding(self._timestep(h))

    def decode(self, h: torch.Tensor, hook: Optional[BottleneckHook] = None, layer: str = BOTTLENECK) -> torch.Tensor:
        """The image for features ``h`` at ``layer`` (default: the bottleneck) alone, ``hook``'s parts at that layer
        and later ones applied (zero-skip students: the image depends on nothing else)."""
        start = block_index(layer, self.hook_layers)
        plan = layer_plan(hook, self.hook_layers)
        if any(plan[:start]):
            raise LayerError(f"this hook acts at layers before {layer}, where decoding starts")
        shortcuts, t_emb = self._decoder_inputs(h)
        if plan[start] is not None:
            h = plan[start](h)
        if start == 0 and hook is None:
            return self.unet.decode(h, shortcuts, t_emb)
        return self.unet.final_conv(self.unet.decode_blocks(h, shortcuts, t_emb, start, after_block=plan[1:]))

    def layer_features(self, h: torch.Tensor, layer: str, from_layer: str = BOTTLENECK) -> torch.Tensor:
        """``layer``'s features (unhooked) for features ``h`` at ``from_layer`` (default: the bottleneck): what a
        hook at ``layer`` acts on."""
        start, stop = block_index(from_layer, self.hook_layers), block_index(layer, self.hook_layers)
        if stop < start:
            raise LayerError(f"{layer} comes before {from_layer} in the decoder")
        if stop == start:
            return h
        shortcuts, t_emb = self._decoder_inputs(h)
        return self.unet.decode_blocks(h, shortcuts, t_emb, start, stop)

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """The features hooks act on (before any hook), e.g. to build reference features."""
        return self.unet.encode(z, self._timestep(z), self.context)[0]

    def generate(self, z: torch.Tensor, hook: Optional[BottleneckHook] = None):
        """Image plus the bottleneck before and after the hook, from one encoder pass. ``hook``: a function of the
        bottleneck, or hooks placed at finer layers (models/nets/layers.py), each applied at its layer."""
        h, shortcuts, t_emb = self._encode(z)
        if hook is None:
            return self.unet.decode(h, shortcuts, t_emb), h, h
        plan = layer_plan(hook, self.hook_layers)
        steered = plan[0](h) if plan[0] is not None else h
        finer = plan[1:] if any(plan[1:]) else None
        return self.unet.decode(steered, shortcuts, t_emb, after_block=finer), h, steered

    @classmethod
    def from_teacher(cls, teacher_unet: Unet, teacher_config: TeacherConfig, skips: str = "zero",
                     global_context: str = "none") -> "DirectDecoder":
        student = cls(teacher_config, skips=skips, global_context=global_context)
        student.unet.load_state_dict(teacher_unet.state_dict())
        return student


@dataclass
class LoadedStudent:
    decoder: DirectDecoder
    path: str
    sha256: str
    teacher_sha256: str
    checkpoint: dict


def load_student(path: str | Path, device="cpu", use_ema: bool = True) -> LoadedStudent:
    ckpt = load_checkpoint(path, device, what="direct-decoder checkpoint", fix=STUDENT_FIX)
    if ckpt.get("kind") != "direct_decoder":
        what = "a teacher (DDPM) checkpoint" if "model" in ckpt and ckpt.get("kind") in (None, "teacher") \
            else f"a {ckpt.get('kind', 'unknown')} file"
        raise PipelineError(f"{path} is {what}, not a direct-decoder checkpoint; {STUDENT_FIX}")
    args = ckpt["model_args"]
    # checkpoints from before the skips option kept the teacher's skip connections
    decoder = DirectDecoder(TeacherConfig(**args["teacher"]), args["input_timestep"], args.get("skips", "keep"),
                            args.get("global_context", "none"))
    state, weights = inference_weights(ckpt, use_ema)
    require_finite_checkpoint(state, path, "direct-decoder checkpoint", weights)
    load_strict(decoder, state, path, "its recorded architecture")
    decoder.to(device).eval().requires_grad_(False)
    return LoadedStudent(decoder, str(path), sha256_file(path), ckpt["teacher"]["sha256"], ckpt)


def check_pairing(student: LoadedStudent, teacher_sha256: str, teacher_path: str) -> None:
    """A student only makes sense with the teacher it was distilled from."""
    if student.teacher_sha256 != teacher_sha256:
        raise PipelineError(f"{student.path} was distilled from teacher sha256 {student.teacher_sha256[:12]}, "
                            f"but --ddpm_ckpt {teacher_path} has sha256 {teacher_sha256[:12]}; pass the matching "
                            "teacher")


def load_teacher_and_student(ddpm_ckpt: str, decoder_ckpt: str, device) -> tuple[LoadedTeacher, LoadedStudent]:
    """Every stage after training needs both, and only as a pair that belongs together."""
    teacher = load_teacher(ddpm_ckpt, device)
    student = load_student(decoder_ckpt, device)
    check_pairing(student, teacher.sha256, ddpm_ckpt)
    return teacher, student
