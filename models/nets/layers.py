"""The direct decoder's hookable layers, and hooks placed at them.

With zeroed skips the decoder is a chain: the bottleneck (7x7), then one decoder block per resolution, coarse to fine
(14x14, 28x28 on the upstream UNet), then a 1x1 convolution to pixels. Every block's output is a function of the
bottleneck alone, so a hook may act after any block as well as at the bottleneck. The layers are named here, once:
``"bottleneck"``, then ``"up1"``, ``"up2"``, ... for the outputs of ``unet.decoder_blocks[0]``, ``[1]``, ...

A plain function ``features -> features`` is a bottleneck hook (every hook written before layers existed, bitwise as
before); ``at_layer`` places one at another layer; ``compose`` chains hooks, each keeping its layer, and the decoder
applies them in decoder order (bottleneck first), in the order composed within a layer.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from ..io.errors import PipelineError

Hook = Callable[[torch.Tensor], torch.Tensor]

BOTTLENECK = "bottleneck"
UP_PREFIX = "up"  # "up1": the output of decoder block 0 (2x the bottleneck's side), "up2": block 1, ...


class LayerError(PipelineError, ValueError):
    """A hook placed at a layer this decoder (or these reference features) cannot serve."""


def layer_names(n_decoder_blocks: int) -> tuple[str, ...]:
    """Every hookable layer of a decoder with ``n_decoder_blocks`` blocks, in decoder order."""
    return (BOTTLENECK, *(f"{UP_PREFIX}{i + 1}" for i in range(n_decoder_blocks)))


def block_index(layer: str, names: Sequence[str]) -> int:
    """How many decoder blocks run before ``layer`` (0: the bottleneck); one line naming the choices otherwise."""
    if layer not in names:
        raise LayerError(f"hook layer must be one of {', '.join(names)} for this decoder, got {layer!r}")
    return list(names).index(layer)


class LayerHook:
    """Hook steps ``(layer, fn)`` in the order composed. The decoder applies each at its layer (``layer_plan``);
    called on a tensor directly it runs its steps only when they all sit at one layer (that layer's features)."""

    def __init__(self, steps: Iterable[tuple[str, Hook]]):
        self.steps = tuple(steps)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(layer for layer, _ in self.steps))

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if len(self.layers) > 1:
            raise LayerError(f"this hook acts at layers {', '.join(self.layers)}: pass it to the decoder "
                             "(generate, forward or decode), which applies each part at its layer")
        for _, fn in self.steps:
            h = fn(h)
        return h

    def __repr__(self) -> str:
        return f"LayerHook({', '.join(layer for layer, _ in self.steps)})"


def hook_steps(hook: Optional[Hook]) -> list[tuple[str, Hook]]:
    """A hook as its steps: a plain function is one bottleneck step."""
    if hook is None:
        return []
    return list(hook.steps) if isinstance(hook, LayerHook) else [(BOTTLENECK, hook)]


def at_layer(layer: str, hook: Hook) -> Hook:
    """``hook`` applied at ``layer`` (checked against the decoder when it runs). At the bottleneck: ``hook`` itself."""
    if not isinstance(layer, str) or not layer:
        raise LayerError(f"hook layer must be a layer name such as {BOTTLENECK!r} or 'up1', got {layer!r}")
    placed = {step_layer for step_layer, _ in hook_steps(hook)}
    if isinstance(hook, LayerHook) and placed != {BOTTLENECK} and placed != {layer}:
        raise LayerError(f"this hook is already placed at {', '.join(sorted(placed))}; compose hooks of different "
                         "layers instead of placing them again")
    if layer == BOTTLENECK:
        return hook
    return LayerHook([(layer, fn) for _, fn in hook_steps(hook)])


def compose(*hooks: Hook) -> Hook:
    """Hooks chained left to right, each at its own layer. All at the bottleneck: a plain function, the original
    chain; otherwise a ``LayerHook`` the decoder applies in decoder order."""
    steps = [step for hook in hooks for step in hook_steps(hook)]
    if any(layer != BOTTLENECK for layer, _ in steps):
        return LayerHook(steps)
    fns = [fn for _, fn in steps]

    def chained(h: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            h = fn(h)
        return h
    return chained


def layer_plan(hook: Optional[Hook], names: Sequence[str]) -> list[Optional[Hook]]:
    """One entry per layer of ``names`` (decoder order): the composed steps at that layer, or None."""
    by_layer: list[list[Hook]] = [[] for _ in names]
    for layer, fn in hook_steps(hook):
        by_layer[block_index(layer, names)].append(fn)
    return [None if not fns else fns[0] if len(fns) == 1 else compose(*fns) for fns in by_layer]
