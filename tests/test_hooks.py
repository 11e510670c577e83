"""models.steering.hooks: what each hook does to bottleneck features, and how invalid hooks are refused."""
from __future__ import annotations

import math

import pytest
import torch

from models.io.errors import PipelineError
from models.steering.hooks import (SHIFT_NEAREST_PULL, SHIFT_REACH, HookError, channel_scale_hook, class_direction,
                                   class_hook, class_means, compose, exclude_hook, include_hook, interpolate_hook,
                                   multi_include_hook, nearest_exclude_hook, nearest_hook, shift_hook,
                                   shift_nearest_hook)

SHAPE = (8, 7, 7)  # the tiny teacher's bottleneck (base_dim 4, dim_mults [2, 4])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def h() -> torch.Tensor:
    return torch.randn((5, *SHAPE), generator=_gen(0))


@pytest.fixture
def targets() -> torch.Tensor:
    return torch.randn((3, *SHAPE), generator=_gen(1)) + 2.0


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample distance of a batch [N, C, H, W] to one target [C, H, W]."""
    return (a - b).flatten(1).norm(dim=1)


# ---------------------------------------------------------------- include / exclude

def test_include_strength_zero_is_identity(h, targets):
    assert torch.equal(include_hook(targets, 0.0)(h), h)
    assert torch.equal(exclude_hook(targets, 0.0)(h), h)


def test_include_strength_one_gives_target_mean(h, targets):
    out = include_hook(targets, 1.0)(h)
    assert out.shape == h.shape
    mean = targets.mean(0)
    for row in out:
        torch.testing.assert_close(row, mean)


def test_include_moves_the_given_fraction_of_the_way(h, targets):
    mean = targets.mean(0)
    out = include_hook(targets, 0.25)(h)
    torch.testing.assert_close(out, h + 0.25 * (mean - h))
    torch.testing.assert_close(_dist(out, mean), 0.75 * _dist(h, mean))


def test_single_target_sample_is_its_own_mean(h, targets):
    torch.testing.assert_close(include_hook(targets[1], 0.6)(h), include_hook(targets[1:2], 0.6)(h))


def test_exclude_moves_away_and_mirrors_include(h, targets):
    mean = targets.mean(0)
    for s in (0.3, 1.0, 2.0):
        exc = exclude_hook(targets, s)(h)
        assert (_dist(exc, mean) > _dist(h, mean)).all(), f"exclude at {s} did not move away from the target"
        torch.testing.assert_close(_dist(exc, mean), (1 + s) * _dist(h, mean))
        if s <= 1:  # the mirror image of include around h
            torch.testing.assert_close(exc - h, -(include_hook(targets, s)(h) - h))


def test_hook_does_not_modify_its_input(h, targets):
    before = h.clone()
    for hook in (include_hook(targets, 0.5), exclude_hook(targets, 0.5), channel_scale_hook([0, 2], 3.0)):
        hook(h)
    assert torch.equal(h, before)


def test_hook_keeps_dtype_of_features(targets):
    h16 = torch.randn((2, *SHAPE), generator=_gen(5)).half()
    out = include_hook(targets, 0.5)(h16)
    assert out.dtype == torch.float16 and out.shape == h16.shape


# ---------------------------------------------------------------- class / interpolate / multi-include

def test_class_hook_is_include_toward_class_mean(h):
    feats = torch.randn((12, *SHAPE), generator=_gen(2))
    labels = torch.tensor([0, 1, 2] * 4)
    means = class_means(feats, labels)
    out = class_hook(means[2], 0.7)(h)
    torch.testing.assert_close(out, include_hook(feats[labels == 2], 0.7)(h))
    torch.testing.assert_close(out, h + 0.7 * (feats[labels == 2].mean(0) - h))
    # a stack of class members means the same as their mean
    torch.testing.assert_close(class_hook(feats[labels == 2], 0.7)(h), out)


def test_class_means():
    feats = torch.arange(4 * 2 * 1 * 1, dtype=torch.float32).reshape(4, 2, 1, 1)
    labels = torch.tensor([3, 5, 3, 5])
    means = class_means(feats, labels)
    assert sorted(means) == [3, 5] and all(type(k) is int for k in means)
    torch.testing.assert_close(means[3], (feats[0] + feats[2]) / 2)
    torch.testing.assert_close(means[5], (feats[1] + feats[3]) / 2)


def test_interpolate_endpoints_and_midpoint(h, targets):
    a, b = targets[0], targets[1]
    for row in interpolate_hook(a, b, alpha=0.0, strength=1.0)(h):
        torch.testing.assert_close(row, a)
    for row in interpolate_hook(a, b, alpha=1.0, strength=1.0)(h):
        torch.testing.assert_close(row, b)
    torch.testing.assert_close(interpolate_hook(a, b, alpha=0.5, strength=0.4)(h),
                               h + 0.4 * ((a + b) / 2 - h))


def test_multi_include_weights_are_normalised(h, targets):
    torch.testing.assert_close(multi_include_hook(targets[:2], [2, 2], 0.5)(h),
                               multi_include_hook(targets[:2], [1, 1], 0.5)(h))
    torch.testing.assert_close(multi_include_hook(targets[:2], [1, 1], 0.5)(h), include_hook(targets[:2], 0.5)(h))
    # all weight on one sample: that sample is the target
    for row in multi_include_hook(targets, [0, 0, 5], 1.0)(h):
        torch.testing.assert_close(row, targets[2])
    # 3:1 weighting
    torch.testing.assert_close(multi_include_hook(targets[:2], [3, 1], 1.0)(h)[0],
                               0.75 * targets[0] + 0.25 * targets[1])


@pytest.mark.parametrize("weights", [[1.0], [1, 1, 1, 1], [1, -1, 1], [0, 0, 0], [1, math.nan, 1], [1, math.inf, 1]])
def test_multi_include_bad_weights(targets, weights):
    with pytest.raises(HookError):
        multi_include_hook(targets, weights, 0.5)


# ---------------------------------------------------------------- channel scale / compose

def test_channel_scale_only_touches_chosen_channels(h):
    out = channel_scale_hook([1, 3], 2.5)(h)
    torch.testing.assert_close(out[:, [1, 3]], 2.5 * h[:, [1, 3]])
    others = [c for c in range(SHAPE[0]) if c not in (1, 3)]
    assert torch.equal(out[:, others], h[:, others])
    out = channel_scale_hook(slice(0, 2), 0.0)(h)
    assert (out[:, :2] == 0).all() and torch.equal(out[:, 2:], h[:, 2:])


def test_compose_applies_left_to_right(h, targets):
    scale, inc = channel_scale_hook([0], 3.0), include_hook(targets, 0.5)
    torch.testing.assert_close(compose(scale, inc)(h), inc(scale(h)))
    torch.testing.assert_close(compose(inc, scale)(h), scale(inc(h)))
    assert not torch.allclose(compose(scale, inc)(h), compose(inc, scale)(h))  # order matters, so it was respected
    assert torch.equal(compose()(h), h)


# ---------------------------------------------------------------- refusals

BAD_STRENGTHS = [math.nan, math.inf, -math.inf, -0.1, "0.5", None, [0.5]]


@pytest.mark.parametrize("strength", BAD_STRENGTHS + [1.5])
@pytest.mark.parametrize("make", [include_hook, class_hook], ids=["include", "class"])
def test_invalid_strength_raises(targets, make, strength):
    with pytest.raises(HookError) as info:
        make(targets, strength)
    assert isinstance(info.value, ValueError) and isinstance(info.value, PipelineError)
    assert "strength" in str(info.value)


@pytest.mark.parametrize("strength", BAD_STRENGTHS + [2.5])
def test_invalid_exclude_strength_raises(targets, strength):
    with pytest.raises(HookError):
        exclude_hook(targets, strength)


def test_exclude_accepts_up_to_two(h, targets):
    exclude_hook(targets, 2.0)(h)
    include_hook(targets, 1.0)(h)


@pytest.mark.parametrize("call", [
    lambda t: interpolate_hook(t[0], t[1], alpha=1.5),
    lambda t: interpolate_hook(t[0], t[1], alpha=math.nan),
    lambda t: interpolate_hook(t[0], t[1], strength=-0.1),
    lambda t: multi_include_hook(t, [1, 1, 1], strength=math.inf),
    lambda t: channel_scale_hook([0], math.nan),
    lambda t: channel_scale_hook([0], -1.0),
], ids=["interp-alpha", "interp-alpha-nan", "interp-strength", "multi-inf", "scale-nan", "scale-negative"])
def test_other_invalid_values_raise(targets, call):
    with pytest.raises(HookError):
        call(targets)


def test_hook_error_is_value_error_and_pipeline_error():
    assert issubclass(HookError, ValueError) and issubclass(HookError, PipelineError)
    with pytest.raises(ValueError):
        include_hook(torch.zeros(SHAPE), math.nan)
    assert HookError("x").exit_code == 1


def test_wrong_target_shape_raises_when_applied(h):
    for hook in (include_hook(torch.zeros(16, 7, 7)), exclude_hook(torch.zeros(2, 8, 4, 4)),
                 class_hook(torch.zeros(8, 7, 8))):
        with pytest.raises(HookError, match="shape"):
            hook(h)


@pytest.mark.parametrize("target", [torch.zeros(8, 49), torch.zeros(2, 1, 8, 7, 7)], ids=["2d", "5d"])
def test_target_of_wrong_rank_raises(target):
    with pytest.raises(HookError):
        include_hook(target)


def test_empty_target_set_raises():
    empty = torch.empty((0, *SHAPE))
    for make in (include_hook, exclude_hook, class_hook):
        with pytest.raises(HookError, match="empty"):
            make(empty, 0.5)


# ---------------------------------------------------------------- nearest / shift styles

def _clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """Four well separated clusters of 5 members each, and one query row near each cluster."""
    g = _gen(7)
    centres = torch.randn((4, *SHAPE), generator=g) * 3
    members = (centres[:, None] + 0.1 * torch.randn((4, 5, *SHAPE), generator=g)).flatten(0, 1)
    queries = centres + 0.5 * torch.randn((4, *SHAPE), generator=g)
    return members, queries


def test_new_styles_at_strength_zero_are_the_identity(h, targets):
    members, _ = _clusters()
    for hook in (nearest_hook(targets, 0.0), shift_hook(targets[0], 0.0),
                 nearest_exclude_hook(targets[:1], members, 0.0), shift_nearest_hook(targets, targets[0], 0.0)):
        assert torch.equal(hook(h), h)


def test_nearest_moves_each_row_toward_its_own_neighbours():
    members, queries = _clusters()
    unit = torch.nn.functional.normalize(members.flatten(1), dim=1)
    for k in (1, 3, 5):
        out = nearest_hook(members, 1.0, k=k)(queries)
        for i, q in enumerate(queries):
            nearest = (torch.nn.functional.normalize(q.flatten(), dim=0) @ unit.T).topk(k).indices
            assert set(nearest.tolist()) <= set(range(5 * i, 5 * i + 5)), "neighbours left the query's cluster"
            torch.testing.assert_close(out[i], members[nearest].mean(0))
    half = nearest_hook(members, 0.4, k=3)(queries)
    torch.testing.assert_close(half, queries + 0.4 * (nearest_hook(members, 1.0, k=3)(queries) - queries))
    # rows that differed keep differing: four rows, four different targets (the mean style gives one)
    assert len({tuple(row.flatten().round(decimals=4).tolist()) for row in nearest_hook(members, 1.0)(queries)}) == 4
    assert torch.equal(nearest_hook(members, 1.0, k=100)(queries)[0], nearest_hook(members, 1.0, k=20)(queries)[0])


def test_shift_adds_the_same_vector_to_every_row(h, targets):
    direction = targets[0] - targets[1]
    out = shift_hook(direction, 0.6)(h)
    moved = out - h
    for row in moved:
        torch.testing.assert_close(row, 0.6 * direction)
    torch.testing.assert_close(out[0] - out[1], h[0] - h[1])  # differences between generations kept
    reference = torch.cat([targets, -targets])
    torch.testing.assert_close(class_direction(targets, reference), targets.mean(0) - reference.mean(0))


def test_shift_nearest_shifts_then_pulls_toward_the_shifted_points_neighbours():
    members, queries = _clusters()
    direction = members[5:10].mean(0) - members.mean(0)  # toward cluster 1
    unit = torch.nn.functional.normalize(members.flatten(1), dim=1)
    for s in (0.4, 1.0):
        out = shift_nearest_hook(members, direction, s, k=2)(queries)
        shifted = queries + s * SHIFT_REACH * direction
        for i in range(4):
            idx = (torch.nn.functional.normalize(shifted[i].flatten(), dim=0) @ unit.T).topk(2).indices
            expected = shifted[i] + s * SHIFT_NEAREST_PULL * (members[idx].mean(0) - shifted[i])
            torch.testing.assert_close(out[i], expected)
    # each row keeps a target of its own: four rows, four results
    out = shift_nearest_hook(members, direction, 1.0, k=2)(queries)
    assert len({tuple(row.flatten().round(decimals=4).tolist()) for row in out}) == 4


def test_nearest_exclude_moves_away_toward_real_candidates():
    members, queries = _clusters()
    excluded, candidates = members[:5], members[5:]
    centre = torch.nn.functional.normalize(excluded.mean(0).flatten(), dim=0)

    def likeness(x):
        return torch.nn.functional.normalize(x.flatten(1), dim=1) @ centre
    before, after = likeness(queries), likeness(nearest_exclude_hook(excluded, candidates, 1.0, k=2)(queries))
    assert (after <= before + 1e-6).all() and after[0] < before[0] - 0.1, (before, after)
    # at strength 1 each row is the mean of its (up to) 2 nearest candidates less like the excluded than it was,
    # or unchanged when there is none (row 1 here: already less like them than any candidate)
    out = nearest_exclude_hook(excluded, candidates, 1.0, k=2)(queries)
    unit = torch.nn.functional.normalize(candidates.flatten(1), dim=1)
    for i in range(4):
        allowed = torch.nonzero(likeness(candidates) < before[i]).flatten()
        if len(allowed) == 0:
            assert torch.equal(out[i], queries[i])
            continue
        sims = unit[allowed] @ torch.nn.functional.normalize(queries[i].flatten(), dim=0)
        idx = allowed[sims.topk(min(2, len(allowed))).indices]
        torch.testing.assert_close(out[i], candidates[idx].mean(0))
    assert torch.equal(out[1], queries[1]) and not torch.equal(out[0], queries[0])
    # a row already less like the excluded images than every candidate stays where it is
    far = -excluded.mean(0, keepdim=True)
    assert torch.equal(nearest_exclude_hook(excluded, candidates, 1.0)(far), far)


@pytest.mark.parametrize("call", [
    lambda t: nearest_hook(t, 1.5), lambda t: nearest_hook(t, math.nan), lambda t: nearest_hook(t, 0.5, k=0),
    lambda t: nearest_hook(t, 0.5, k=2.5), lambda t: nearest_hook(t[0], 0.5), lambda t: nearest_hook(t[:0], 0.5),
    lambda t: shift_hook(t[0], -0.1), lambda t: shift_hook(t[0], 1.5),
    lambda t: nearest_exclude_hook(t, t, 2.5), lambda t: nearest_exclude_hook(t, t[:0], 0.5),
    lambda t: shift_nearest_hook(t, t[0], 1.1), lambda t: shift_nearest_hook(t, t[0], 0.5, k=0),
    lambda t: shift_nearest_hook(t[:0], t[0], 0.5),
], ids=["near-strength", "near-nan", "near-k0", "near-k-float", "near-3d", "near-empty", "shift-negative",
        "shift-over", "near-exclude-strength", "near-exclude-empty", "shift-near-strength", "shift-near-k0",
        "shift-near-empty"])
def test_new_styles_refuse_bad_values(targets, call):
    with pytest.raises(HookError):
        call(targets)


def test_new_styles_refuse_features_of_another_decoder(h):
    for hook in (nearest_hook(torch.zeros(3, 16, 7, 7)), shift_hook(torch.zeros(16, 7, 7)),
                 nearest_exclude_hook(torch.zeros(2, 16, 7, 7), torch.ones(3, 16, 7, 7)),
                 shift_nearest_hook(torch.zeros(3, 16, 7, 7), torch.zeros(16, 7, 7))):
        with pytest.raises(HookError, match="shape"):
            hook(h)
