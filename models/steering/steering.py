"""Steering by training image or class: hooks built from reference features by training-set index, at the
bottleneck or a finer decoder layer (``layer``: models/nets/layers.py), and the attribution of what was generated to
its nearest training images.

Attribution here is *similarity* in the student's bottleneck space: which training images sit closest to the
features that produced a generation. It is not causal influence (what would change had an image been left out).

A generation can be placed among the training images three ways: by the features that produced it ("bottleneck"),
by reading its image back through the image encoder that placed the training images there ("image"), or by digit
shape, pixels compared with tolerance for small shifts, rotations and stroke width ("shape", models/steering/
shape_match.py). Shape finds a training image of the generation's digit most often (BENCHMARKS.md, Attribution),
so it is the default wherever the reference features carry it (extract_reference_features.py stores it by
default); older feature files keep the bottleneck rule. Every score comes with its percentile among the reference
set's own nearest-neighbour scores under the same rule.
"""
from __future__ import annotations

import torch

from ..io.errors import PipelineError
from ..nets.image_encoder import load_image_encoder
from .hooks import (BOTTLENECK, DEFAULT_HOOK_STYLE, HOOK_STYLES, NEAREST_K, SHIFT_NEAREST_K, SHIFT_REACH, at_layer,
                    class_direction, class_hook, exclude_hook, include_hook, interpolate_hook, nearest_exclude_hook,
                    nearest_hook, shift_hook, shift_nearest_hook)
from .layer_features import LayerFeatures, served_layers
from .search import top_k_similar
from .shape_match import SHAPE, ShapeMatch, cosine_calibration, percentile, reference_views, shape_top_k

ATTRIBUTE_BY = ("bottleneck", "image", SHAPE)


def _check_indices(name: str, indices: list[int], n: int) -> torch.Tensor:
    if not indices:
        raise PipelineError(f"--{name} needs at least one index")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise PipelineError(f"--{name} indices {bad[:5]} are outside the reference set (0..{n - 1})")
    return torch.as_tensor(indices)


def check_hook_style(style: str) -> str:
    if style not in HOOK_STYLES:
        raise PipelineError(f"--hook_style must be one of {', '.join(HOOK_STYLES)}, got {style!r}")
    return style


class Steering:
    """Reference features + a student: hooks by training-set index or class, and attribution of outputs."""

    def __init__(self, decoder, ref: dict, device):
        self.decoder = decoder
        self.ref = ref
        self.features = ref["features"].to(device)
        self.labels = ref["labels"]
        self.device = device
        self._encoder = None
        self.attribution = ref.get("attribution") or {}
        self._shape_views = None
        self._shape_images = None  # the reference images as floats on the device, for the re-ranking
        self._calibration = dict(self.attribution.get("calibration") or {})
        self._layers = LayerFeatures(ref, decoder, self.features)

    @property
    def default_attribute_by(self) -> str:
        """The rule the reference features were extracted for: shape when they carry it, else the bottleneck."""
        return SHAPE if self.attribution.get("rule") == SHAPE else "bottleneck"

    def resolve_attribute_by(self, by) -> str:
        if by is None or by == "auto":
            return self.default_attribute_by
        if by not in ATTRIBUTE_BY:
            raise PipelineError(f"attribute_by must be one of auto, {', '.join(ATTRIBUTE_BY)}, got {by!r}")
        if by == "image":
            self.require_image_encoder()
        if by == SHAPE and self.attribution.get("rule") != SHAPE:
            raise PipelineError("these reference features carry no shape rule (extracted before it existed, or with "
                                "--attribution_rule bottleneck); re-extract them, or attribute by the bottleneck")
        return by

    @property
    def hook_layers(self) -> tuple[str, ...]:
        """The layers these reference features serve hooks at (models/steering/layer_features.py)."""
        return served_layers(self.ref, self.decoder)

    def layer_features(self, layer: str = BOTTLENECK) -> torch.Tensor:
        """The reference features at ``layer``: the stored bottleneck, or a finer layer derived from it (cached)."""
        return self._layers[layer]

    def include(self, indices, strength, style: str = DEFAULT_HOOK_STYLE, k: int | None = None,
                layer: str = BOTTLENECK):
        """Toward training images ``indices`` in ``style`` (hooks.HOOK_STYLES; shift_nearest includes as nearest),
        at ``layer``."""
        rows = _check_indices("include", list(indices), len(self.labels))
        style = check_hook_style(style)
        feats = self.layer_features(layer)
        return at_layer(layer, self._toward(feats[rows.to(feats.device)], feats, strength, style, "include", k))

    def exclude(self, indices, strength, style: str = DEFAULT_HOOK_STYLE, k: int = NEAREST_K,
                layer: str = BOTTLENECK):
        """Away from training images ``indices`` in ``style``, at ``layer``: the mean style mirrors include;
        nearest and shift_nearest step toward the nearest other training images less like them; shift subtracts
        their direction."""
        rows = _check_indices("exclude", list(indices), len(self.labels))
        style = check_hook_style(style)
        feats = self.layer_features(layer)
        targets = feats[rows.to(feats.device)]
        if style == "mean":
            return at_layer(layer, exclude_hook(targets, strength))
        if style == "shift":
            return at_layer(layer, shift_hook(-SHIFT_REACH * class_direction(targets, feats), strength, "exclude",
                                              max_strength=2.0))
        keep = torch.ones(len(self.labels), dtype=torch.bool)
        keep[rows] = False
        return at_layer(layer, nearest_exclude_hook(targets, feats[keep.to(feats.device)], strength, k))

    def _toward(self, targets: torch.Tensor, reference: torch.Tensor, strength, style: str, name: str,
                k: int | None):
        if style == "mean":
            return (class_hook if name == "class" else include_hook)(targets, strength)
        if style == "nearest" or (style == "shift_nearest" and name == "include"):
            # a handful of chosen images has no direction worth shifting by: their mean minus the average digit is
            # their class's direction, which makes every generation that digit instead of like those images
            return nearest_hook(targets, strength, NEAREST_K if k is None else k, name)
        direction = class_direction(targets, reference)
        if style == "shift":
            return shift_hook(SHIFT_REACH * direction, strength, name)
        return shift_nearest_hook(targets, direction, strength, SHIFT_NEAREST_K if k is None else k, name)

    def interpolate(self, a_indices, b_indices, alpha, strength, layer: str = BOTTLENECK):
        """Toward the point ``alpha`` of the way from the mean of training images a to the mean of images b."""
        n = len(self.labels)
        a = _check_indices("interpolate a", list(a_indices), n)
        b = _check_indices("interpolate b", list(b_indices), n)
        feats = self.layer_features(layer)
        return at_layer(layer, interpolate_hook(feats[a.to(feats.device)], feats[b.to(feats.device)], alpha,
                                                strength))

    def toward_class(self, label: int, strength, style: str = DEFAULT_HOOK_STYLE, k: int | None = None,
                     layer: str = BOTTLENECK):
        """Toward the reference features of class ``label`` in ``style`` (hooks.HOOK_STYLES), at ``layer``."""
        classes = sorted(int(c) for c in self.labels.unique())
        if label not in classes:
            raise PipelineError(f"--target_class {label} is not a label of the reference set ({classes})")
        style = check_hook_style(style)
        feats = self.layer_features(layer)
        return at_layer(layer, self._toward(feats[(self.labels == label).to(feats.device)], feats, strength, style,
                                            "class", k))

    @torch.inference_mode()
    def generate(self, z: torch.Tensor, hook=None):
        images, _, steered = self.decoder.generate(z, hook)
        return images.float().clamp(-1, 1), steered

    def attribute(self, features: torch.Tensor, k: int):
        scores, idx = top_k_similar(features, self.features, k)
        return scores.cpu(), idx.cpu(), self.labels[idx.cpu()]

    @property
    def has_image_encoder(self) -> bool:
        return self.ref.get("image_encoder") is not None

    def require_image_encoder(self) -> None:
        if not self.has_image_encoder:
            raise PipelineError("these reference features were extracted by DDIM inversion and carry no image "
                                "encoder; re-extract with --method image_encoder, or attribute by the bottleneck")

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Any 28x28 images in [-1, 1] into the bottleneck space, by the stored image encoder."""
        self.require_image_encoder()
        if self._encoder is None:
            self._encoder = load_image_encoder(self.ref["image_encoder"], self.device)
        return self._encoder(images.to(self.device).float())

    def attribute_generation(self, images: torch.Tensor, features, k: int, by=None):
        """Top-k training images (scores, indices, labels) of generations placed by their ``features``
        ("bottleneck"), their ``images`` re-encoded ("image") or their ``images``' digit shape ("shape"); ``by``
        None or "auto": the reference features' default rule."""
        by = self.resolve_attribute_by(by)
        if by == SHAPE:
            return self.attribute_shape(images, k)
        return self.attribute(features if by == "bottleneck" else self.encode_images(images), k)

    @torch.inference_mode()
    def attribute_shape(self, images: torch.Tensor, k: int):
        """Top-k training images (scores, indices, labels) of any images by digit shape (models/steering/
        shape_match.py); the reference views are built at first use."""
        self.resolve_attribute_by(SHAPE)  # features without the rule: one line saying so
        settings = ShapeMatch.from_dict(self.attribution["settings"])
        if self._shape_views is None:
            self._shape_images = self.attribution["images"].float().to(self.device)
            self._shape_views = reference_views(self._shape_images, settings)
        scores, idx = shape_top_k(images.to(self.device).float(), self._shape_views, settings, k,
                                  self._shape_images)
        return scores.cpu(), idx.cpu(), self.labels[idx.cpu()]

    def percentiles(self, scores: torch.Tensor, by=None) -> torch.Tensor:
        """Each score's percentile (0-100) among the reference images' scores to their nearest other reference
        image under the same rule: near 100 for a near-copy, lower for a mere look-alike."""
        space = SHAPE if self.resolve_attribute_by(by) == SHAPE else "bottleneck"  # image: the bottleneck's space
        if space not in self._calibration:  # feature files from before calibration was stored
            self._calibration[space] = cosine_calibration(self.features)
        return percentile(scores.cpu(), self._calibration[space])
