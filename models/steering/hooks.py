"""Hooks: functions features -> features that steer the direct decoder.

Targets are features ([C, H, W] or [K, C, H, W]) in the space the hook acts on: the bottleneck (rows of
reference_features.pt) by default, or a finer decoder layer (``at_layer``, models/nets/layers.py; reference features
there: models/steering/layer_features.py). Every rule below works on any layer's features, flattened. Hooks compose
left to right with ``compose``, each at its own layer, applied in decoder order.

Class, include and exclude hooks come in styles (``HOOK_STYLES``), because a shared target erases variety:

- ``mean``: every generation moves toward one point, the targets' mean (``h + s (mean - h)``); at strength s each
  keeps only (1 - s) of what made it different.
- ``nearest``: each generation moves toward the mean of its own k nearest targets (cosine), so generations that
  differed go to different real digits; exclude moves toward its nearest reference features that are less like
  the excluded images than it is, so it never leaves the reference set's neighbourhood.
- ``shift``: every generation gets the same displacement, ``SHIFT_REACH`` times the targets' mean minus the
  reference set's mean (added for class and include, subtracted for exclude), so differences between generations
  are kept exactly.
- ``shift_nearest``: the shift, then a pull toward the mean of the shifted point's own k nearest targets: the shift
  carries each generation into the class keeping its differences, the pull brings it onto real digits there.
  Include and exclude as in ``nearest`` (a few chosen images' direction is their class's: shifting by it makes
  every generation that digit rather than like them).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..io.errors import PipelineError
from ..nets.layers import BOTTLENECK, Hook, LayerHook, at_layer, compose  # noqa: F401 (the hooks' public names)

HOOK_STYLES = ("mean", "nearest", "shift", "shift_nearest")
DEFAULT_HOOK_STYLE = "shift_nearest"  # chosen by bench/bench_hook_variety.py (BENCHMARKS.md, Hooks)
NEAREST_K = 8  # targets averaged per generation by the nearest style: a local mean, not one image copied
SHIFT_REACH = 2.0  # class directions added at strength 1 (one direction reaches about half of a class: the bench)
SHIFT_NEAREST_K = 2  # targets averaged after the shift: the shifted point already sits among its class
SHIFT_NEAREST_PULL = 0.75  # share of the way to those targets at strength 1 (1 would drop the shift's variety)


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
            raise HookError(f"hook target has shape {tuple(target.shape)} but the hooked features are "
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
    """Multiplies chosen channels of the hooked features, to probe what they encode."""
    sc = _check_strength("channel scale", scale, 0.0, 10.0)

    def hook(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[:, channels] = out[:, channels] * sc
        return out
    return hook


def _unit_rows(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.flatten(1).float(), dim=1)


def _members(features: torch.Tensor, what: str) -> torch.Tensor:
    if features.ndim != 4:
        raise HookError(f"{what} must be [K,C,H,W] features, got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise HookError("hook target set is empty")
    return features.float()


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise HookError(f"nearest-style k must be a positive integer, got {k!r}")
    return k


def _checked_members(members: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if h.shape[1:] != members.shape[1:]:
        raise HookError(f"hook target has shape {tuple(members.shape[1:])} but the hooked features are "
                        f"{tuple(h.shape[1:])}: features from another decoder?")
    return members.to(h.device)


def nearest_hook(members: torch.Tensor, strength: float = 0.5, k: int = NEAREST_K, name: str = "include") -> Hook:
    """Moves each generation a fraction ``strength`` of the way toward the mean of its own ``k`` nearest members
    (cosine): generations that differed get different targets, so variety survives the pull."""
    s = _check_strength(name, strength, 0.0, 1.0)
    members, k = _members(members, f"{name} targets"), _check_k(k)
    unit = _unit_rows(members)

    def hook(h: torch.Tensor) -> torch.Tensor:
        m = _checked_members(members, h)
        idx = (_unit_rows(h) @ unit.to(h.device).T).topk(min(k, len(m)), dim=1).indices
        target = m[idx].mean(1).to(h.dtype)
        return h + s * (target - h)
    return hook


def shift_hook(direction: torch.Tensor, strength: float = 0.5, name: str = "include", max_strength: float = 1.0
               ) -> Hook:
    """Adds ``strength * direction`` to every generation: the same displacement for all, so the differences
    between generations are kept exactly."""
    s = _check_strength(name, strength, 0.0, max_strength)
    target = _checked(direction.float())
    return lambda h: h + s * target(h)


def shift_nearest_hook(members: torch.Tensor, direction: torch.Tensor, strength: float = 0.5,
                       k: int = SHIFT_NEAREST_K, name: str = "include") -> Hook:
    """Adds ``strength * SHIFT_REACH * direction``, then moves the result ``strength * SHIFT_NEAREST_PULL`` of the
    way toward the mean of its own ``k`` nearest members (cosine)."""
    s = _check_strength(name, strength, 0.0, 1.0)
    members, k = _members(members, f"{name} targets"), _check_k(k)
    shift = _checked(direction.float())
    unit = _unit_rows(members)

    def hook(h: torch.Tensor) -> torch.Tensor:
        m = _checked_members(members, h)
        q = h + (s * SHIFT_REACH) * shift(h)
        idx = (_unit_rows(q) @ unit.to(h.device).T).topk(min(k, len(m)), dim=1).indices
        return q + (s * SHIFT_NEAREST_PULL) * (m[idx].mean(1).to(h.dtype) - q)
    return hook


def class_direction(members: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The targets' mean minus the reference set's mean: what sets the targets apart from an average digit."""
    return _members(members, "targets").mean(0) - _members(reference, "reference features").mean(0)


def nearest_exclude_hook(excluded: torch.Tensor, candidates: torch.Tensor, strength: float = 0.5,
                         k: int = NEAREST_K) -> Hook:
    """Moves each generation toward the mean of its ``k`` nearest ``candidates`` (reference features, the excluded
    ones left out) among those less similar (cosine) to the excluded images' mean than the generation is: away
    from the excluded images, but only ever toward real digits. A generation with no such candidate is unchanged."""
    s = _check_strength("exclude", strength, 0.0, 2.0)
    excluded, k = _members(excluded, "exclude targets"), _check_k(k)
    candidates = _members(candidates, "exclude candidates")
    centre = torch.nn.functional.normalize(excluded.mean(0).flatten(), dim=0)
    unit = _unit_rows(candidates)
    likeness = unit @ centre

    def hook(h: torch.Tensor) -> torch.Tensor:
        c = _checked_members(candidates, h)
        if excluded.shape[1:] != h.shape[1:]:
            _checked_members(excluded, h)
        hu = _unit_rows(h)
        allowed = likeness.to(h.device)[None, :] < (hu @ centre.to(h.device))[:, None]
        sims = (hu @ unit.to(h.device).T).masked_fill(~allowed, -math.inf)
        top, idx = sims.topk(min(k, len(c)), dim=1)
        weight = torch.isfinite(top).float()
        target = (c[idx] * weight[:, :, None, None, None]).sum(1) / weight.sum(1).clamp(min=1)[:, None, None, None]
        moved = h + s * (target.to(h.dtype) - h)
        return torch.where(weight.sum(1)[:, None, None, None] > 0, moved, h)
    return hook


def class_means(features: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    return {int(c): features[labels == c].float().mean(0) for c in labels.unique()}
