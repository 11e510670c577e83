"""One import for notebooks: load teacher, student and reference features from their files (no architecture
flags), generate with any hook, and get attributions back as tensors.

    from models.api import DirectDecoderPipeline
    pipe = DirectDecoderPipeline.load("teacher.pt", "best_model.pt", "reference_features.pt")
    out = pipe.generate(16, hook=pipe.toward_class(3, 0.8))               # or layer="up1": the 14x14 layer
    out.images, out.top_k_indices, out.top_k_labels, out.top_k_percentiles
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .diffusion.noise import per_sample_noise
from .diffusion.sampling import SamplerConfig
from .io.device import pick_device
from .io.errors import PipelineError
from .io.guards import require_finite
from .nets.student import load_teacher_and_student
from .stages.features import check_feature_pairing, load_reference_features
from .steering.hooks import BOTTLENECK, DEFAULT_HOOK_STYLE, Hook
from .steering.steering import Steering


@dataclass
class Generation:
    noise: torch.Tensor           # [N, 1, 28, 28]
    images: torch.Tensor          # [N, 1, 28, 28] in [-1, 1]
    features: torch.Tensor        # bottleneck after the hook's bottleneck part, [N, C, 7, 7]
    top_k_scores: Optional[torch.Tensor] = None
    top_k_indices: Optional[torch.Tensor] = None
    top_k_labels: Optional[torch.Tensor] = None
    top_k_percentiles: Optional[torch.Tensor] = None  # each score among the reference set's nearest-neighbour scores
    attribute_by: Optional[str] = None                # the rule that chose the top-k


class DirectDecoderPipeline:
    def __init__(self, teacher, student, reference: Optional[dict], device):
        self.teacher, self.student, self.reference, self.device = teacher, student, reference, device
        self.steering = Steering(student.decoder, reference, device) if reference is not None else None

    @classmethod
    def load(cls, teacher_path: str, decoder_path: str, features_path: Optional[str] = None,
             device: Optional[str] = None) -> "DirectDecoderPipeline":
        dev = torch.device(device) if device else pick_device()
        teacher, student = load_teacher_and_student(teacher_path, decoder_path, dev)
        pipe = cls(teacher, student, None, dev)
        return pipe.with_features(features_path) if features_path is not None else pipe

    def with_features(self, features_path: str) -> "DirectDecoderPipeline":
        """This teacher and student with reference features, refused unless extracted from this very pair."""
        reference = load_reference_features(features_path, self.device)
        check_feature_pairing(reference, self.teacher.sha256, self.student.sha256, str(features_path))
        return type(self)(self.teacher, self.student, reference, self.device)

    def _need_reference(self) -> Steering:
        if self.steering is None:
            raise PipelineError("this needs reference features: DirectDecoderPipeline.load(..., features_path=...)")
        return self.steering

    @property
    def hook_layers(self) -> tuple[str, ...]:
        """Where hooks may act, in decoder order: "bottleneck" (7x7 on the shipped pair), then the decoder's finer
        layers "up1" (14x14), "up2" (28x28) where the reference features serve them."""
        return self._need_reference().hook_layers

    def include(self, indices, strength: float = 0.5, style: str = DEFAULT_HOOK_STYLE, layer: str = BOTTLENECK) -> Hook:
        """Toward training images ``indices``; ``style``: one of models.steering.hooks.HOOK_STYLES; ``layer``: one
        of ``hook_layers``."""
        return self._need_reference().include(indices, strength, style, layer=layer)

    def exclude(self, indices, strength: float = 0.5, style: str = DEFAULT_HOOK_STYLE, layer: str = BOTTLENECK) -> Hook:
        return self._need_reference().exclude(indices, strength, style, layer=layer)

    def interpolate(self, a_indices, b_indices, alpha: float = 0.5, strength: float = 0.5,
                    layer: str = BOTTLENECK) -> Hook:
        return self._need_reference().interpolate(a_indices, b_indices, alpha, strength, layer=layer)

    def toward_class(self, label: int, strength: float = 0.5, style: str = DEFAULT_HOOK_STYLE,
                     layer: str = BOTTLENECK) -> Hook:
        return self._need_reference().toward_class(label, strength, style, layer=layer)

    def noise(self, n: int, seed: int = 0) -> torch.Tensor:
        return per_sample_noise(seed, range(n), device=self.device)

    @torch.inference_mode()
    def generate(self, n: int = 16, seed: int = 0, hook: Optional[Hook] = None, top_k: int = 5,
                 noise: Optional[torch.Tensor] = None, attribute_by: Optional[str] = None) -> Generation:
        """``attribute_by``: place each generation among the training images by its digit shape ("shape"), by
        the bottleneck features that made it ("bottleneck"), or by its image read back through the image encoder
        ("image"); None: the reference features' default rule (shape when they carry it)."""
        z = self.noise(n, seed) if noise is None else noise.to(self.device)
        images, _, feats = self.student.decoder.generate(z, hook)
        require_finite(images, "the student's output", "its weights are finite (checked at load), so this noise or "
                       "hook made it overflow")
        result = Generation(z, images.float().clamp(-1, 1), feats)
        if self.steering is not None:
            result.attribute_by = self.steering.resolve_attribute_by(attribute_by)
            result.top_k_scores, result.top_k_indices, result.top_k_labels = self.steering.attribute_generation(
                result.images, feats, top_k, result.attribute_by)
            result.top_k_percentiles = self.steering.percentiles(result.top_k_scores, result.attribute_by)
        return result

    @torch.inference_mode()
    def attribute_images(self, images: torch.Tensor, top_k: int = 5, attribute_by: Optional[str] = None):
        """Training images nearest to any images of yours (e.g. the teacher's): (features, top-k scores, indices,
        labels). By the reference features' default rule (shape when they carry it), or ``attribute_by="image"``:
        through the image encoder stored in the reference features. Features: the image encoder's, None for
        features extracted by DDIM inversion."""
        steering = self._need_reference()
        by = steering.resolve_attribute_by(attribute_by)
        feats = steering.encode_images(images) if steering.has_image_encoder else None
        if by == "shape":
            return (feats, *steering.attribute_shape(images, top_k))
        steering.require_image_encoder()  # images have no bottleneck of their own but their encoding
        return (feats, *steering.attribute(feats, top_k))

    def score_percentiles(self, scores: torch.Tensor, attribute_by: Optional[str] = None) -> torch.Tensor:
        """Attribution scores as percentiles (0-100) among the reference set's own nearest-neighbour scores under
        the same rule: near 100 for a near-copy of a training image, lower for a look-alike."""
        return self._need_reference().percentiles(scores, attribute_by)

    def teacher_images(self, noise: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        """The teacher's image for the same noise, by the sampler the student learned (its training pairs'
        sampler, K and spacing; DDIM's default for ancestral pairs) unless ``steps`` overrides K, so the two are
        compared on one map."""
        sampler = SamplerConfig.from_student(self.student.checkpoint).deterministic_map()
        if steps:
            sampler = replace(sampler, steps=steps)
        return sampler.sample(self.teacher.diffusion, noise.to(self.device))
