"""Bottleneck hooks: functions features -> features that steer the direct decoder.

Targets are bottleneck features ([C, H, W] or [K, C, H, W]) in the same space the decoder computes, e.g.
rows of reference_features.pt. Hooks compose left to right with ``compose``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..io.errors import PipelineError

Hook = Callable[[torch.Tensor], torch.Tensor]


class HookError(PipelineError, ValueError):
    """A hook built with values that cannot mean what the user intended."""


def _check_strength(name: str, value: float, lo: float, hi: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not (lo <= value <= hi):
        raise HookError(f"{name} strength must be a finite number in [{lo}, {hi}], got {value}")
    return float(value)


def _mean_target(features: torch.Tensor) -> torch.Tensor:
    if features.ndim == 4:
        if features.shape[0] == 0:
            raise HookError("hook target set is empty")
        return features.float().mean(0)
    if features.ndim == 3:
        return features.float()
    raise HookError(f"hook target must be [C,H,W] or [K,C,H,W] features, got shape {tuple(features.shape)}")


def _checked(target: torch.Tensor) -> Hook:
    def check(h: torch.Tensor) -> torch.Tensor:
        if h.shape[1:] != target.shape:
            raise HookError(f"hook target has shape {tuple(target.shape)} but the bottleneck is "
                            f"{tuple(h.shape[1:])}: features from another decoder?")
        return target.to(device=h.device, dtype=h.dtype)
    return check


def include_hook(target_features: torch.Tensor, strength: float = 0.5) -> Hook:
    """Moves features a fraction ``strength`` of the way toward the mean of the target samples."""
    s = _check_strength("include", strength, 0.0, 1.0)
    target = _checked(_mean_target(target_features))
    return lambda h: h + s * (target(h) - h)


def exclude_hook(target_features: torch.Tensor, strength: float = 0.5) -> Hook:
    """Moves features away from the mean of the target samples (mirror image of include)."""
    s = _check_strength("exclude", strength, 0.0, 2.0)
    target = _checked(_mean_target(target_features))
    return lambda h: h - s * (target(h) - h)


def class_hook(class_mean: torch.Tensor, strength: float = 0.5) -> Hook:
    """Include toward a class's mean feature (see ``class_means``)."""
    s = _check_strength("class", strength, 0.0, 1.0)
    target = _checked(_mean_target(class_mean))
    return lambda h: h + s * (target(h) - h)


def interpolate_hook(features_a: torch.Tensor, features_b: torch.Tensor, alpha: float = 0.5,
                     strength: float = 0.5) -> Hook:
    """Toward the point ``alpha`` of the way from sample a to sample b."""
    a = _check_strength("interpolate alpha", alpha, 0.0, 1.0)
    s = _check_strength("interpolate", strength, 0.0, 1.0)
    target = _checked((1 - a) * _mean_target(features_a) + a * _mean_target(features_b))
    return lambda h: h + s * (target(h) - h)


def multi_include_hook(features: torch.Tensor, weights: Sequence[float], strength: float = 0.5) -> Hook:
    """Toward a weighted mean of several samples (weights need not sum to one; they are normalised)."""
    s = _check_strength("multi-include", strength, 0.0, 1.0)
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    if features.ndim != 4 or w.numel() != features.shape[0]:
        raise HookError(f"multi-include needs one weight per target sample ({features.shape[0]}), got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise HookError(f"multi-include weights must be finite, non-negative and not all zero, got {w.tolist()}")
    target = _checked(torch.einsum("k,kchw->chw", w / w.sum(), features.float()))
    return lambda h: h + s * (target(h) - h)


def channel_scale_hook(channels: slice | Sequence[int], scale: float = 1.2) -> Hook:
    """Multiplies chosen bottleneck channels, to probe what they encode."""
    sc = _check_strength("channel scale", scale, 0.0, 10.0)

    def hook(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[:, channels] = out[:, channels] * sc
        return out
    return hook


def compose(*hooks: Hook) -> Hook:
    def chained(h: torch.Tensor) -> torch.Tensor:
        for hook in hooks:
            h = hook(h)
        return h
    return chained


def class_means(features: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    return {int(c): features[labels == c].float().mean(0) for c in labels.unique()}
