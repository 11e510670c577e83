"""POST /v1/generate: the request's schema and limits, hooks built by the pipeline's own hook constructors, and the
answer (PNGs as base64, per-image top-k training images) from ``DirectDecoderPipeline.generate`` itself."""
from __future__ import annotations

import base64
import threading
import time
from typing import Annotated, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..api import DirectDecoderPipeline
from ..data.datasets import load_dataset
from ..io.errors import PipelineError
from ..io.images import image_grid_png
from ..steering.hooks import BOTTLENECK, DEFAULT_HOOK_STYLE, compose

MAX_N = 64
MAX_TOP_K = 20
MAX_HOOKS = 8
MAX_INDICES = 256
MAX_SEED = 2 ** 53 - 1  # exact in a JavaScript number


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


HookStyle = Literal["mean", "nearest", "shift", "shift_nearest"]  # models.steering.hooks.HOOK_STYLES (tests/test_serve.py checks)
STYLE_DOC = ("how the hook moves each generation: toward the targets' mean (mean), toward its own nearest targets "
             "(nearest), by the targets' direction (shift), or by the direction and then toward the nearest targets "
             "there (shift_nearest)")


LAYER_DOC = ("where the hook acts: the bottleneck, or a finer decoder layer (/v1/info lists them: up1 14x14, up2 "
             "28x28 on the shipped pair); hooks of different layers apply in decoder order")


def _layer_field():
    return Field(BOTTLENECK, min_length=1, max_length=32, description=LAYER_DOC)


class ClassHookSpec(_Strict):
    type: Literal["class"]
    label: int
    strength: float = 0.5
    style: HookStyle = Field(DEFAULT_HOOK_STYLE, description=STYLE_DOC)
    layer: str = _layer_field()


class IncludeHookSpec(_Strict):
    type: Literal["include"]
    indices: list[int] = Field(min_length=1, max_length=MAX_INDICES)
    strength: float = 0.5
    style: HookStyle = Field(DEFAULT_HOOK_STYLE, description=STYLE_DOC)
    layer: str = _layer_field()


class ExcludeHookSpec(_Strict):
    type: Literal["exclude"]
    indices: list[int] = Field(min_length=1, max_length=MAX_INDICES)
    strength: float = 0.5
    style: HookStyle = Field(DEFAULT_HOOK_STYLE, description=STYLE_DOC)
    layer: str = _layer_field()


class InterpolateHookSpec(_Strict):
    type: Literal["interpolate"]
    a: list[int] = Field(min_length=1, max_length=MAX_INDICES)
    b: list[int] = Field(min_length=1, max_length=MAX_INDICES)
    alpha: float = 0.5
    strength: float = 0.5
    layer: str = _layer_field()


HookSpec = Annotated[Union[ClassHookSpec, IncludeHookSpec, ExcludeHookSpec, InterpolateHookSpec],
                     Field(discriminator="type")]


class GenerateRequest(_Strict):
    n: int = Field(16, ge=1, le=MAX_N, description="images to generate")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="noise of image i depends only on (seed, i)")
    hooks: list[HookSpec] = Field(default_factory=list, max_length=MAX_HOOKS,
                                  description="applied in decoder order by layer, in the order given within a layer")
    top_k: int = Field(5, ge=0, le=MAX_TOP_K, description="training images reported per generation (0: none)")
    attribute_by: Literal["auto", "shape", "bottleneck", "image"] = Field(
        "auto", description="place each generation among the training images by its digit shape, by its bottleneck "
                            "features, or by its image read back through the reference features' image encoder; "
                            "auto: the reference features' default rule (shape when they carry it)")
    raw: bool = Field(False, description="also return the images as float32 (base64, little-endian, [n,1,28,28])")


class HookRequestError(PipelineError):
    """A request the pipeline refuses (a hook's values, an attribution rule these features cannot serve): 422 with
    the pipeline's message."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class GenerationService:
    """The served pipeline, one generation at a time (torch runs each request on all its threads)."""

    def __init__(self, pipe: DirectDecoderPipeline):
        self.pipe = pipe
        meta = pipe.reference["metadata"]
        self.dataset = load_dataset(meta["dataset"], meta["split"])
        self.labels = pipe.reference["labels"].cpu()
        self.rows = pipe.reference["indices"].cpu()
        self._lock = threading.Lock()

    def hook_layers(self) -> list[dict]:
        """The layers hooks may act at, in decoder order, with their features' shape [C, H, W]."""
        decoder = self.pipe.student.decoder
        return [{"name": name, "shape": list(decoder.layer_shape(name))} for name in self.pipe.hook_layers]

    def build_hook(self, specs: list) -> Optional[object]:
        hooks = []
        for i, spec in enumerate(specs):
            try:
                if spec.type == "class":
                    hooks.append(self.pipe.toward_class(spec.label, spec.strength, spec.style, layer=spec.layer))
                elif spec.type == "include":
                    hooks.append(self.pipe.include(spec.indices, spec.strength, spec.style, layer=spec.layer))
                elif spec.type == "exclude":
                    hooks.append(self.pipe.exclude(spec.indices, spec.strength, spec.style, layer=spec.layer))
                else:
                    hooks.append(self.pipe.interpolate(spec.a, spec.b, spec.alpha, spec.strength, layer=spec.layer))
            except PipelineError as err:
                raise HookRequestError(f"hooks[{i}] ({spec.type}): {str(err).replace('--', '')}") from err
        return compose(*hooks) if hooks else None

    def generate(self, request: GenerateRequest) -> dict:
        with self._lock:  # hooks too: the first hook at a finer layer derives (and caches) its reference features
            hook = self.build_hook(request.hooks)
            try:
                attribute_by = self.pipe.steering.resolve_attribute_by(request.attribute_by)
            except PipelineError as err:
                raise HookRequestError(f"attribute_by {request.attribute_by}: {str(err).replace('--', '')}") from err
            start = time.perf_counter()
            out = self.pipe.generate(request.n, request.seed, hook, top_k=request.top_k,
                                     attribute_by=attribute_by)
        images = out.images.cpu()
        items = []
        for i in range(request.n):
            top = [] if request.top_k == 0 else [
                {"index": int(idx), "label": int(lab), "score": float(score), "percentile": float(pct)}
                for idx, lab, score, pct in zip(out.top_k_indices[i], out.top_k_labels[i], out.top_k_scores[i],
                                                out.top_k_percentiles[i])]
            items.append({"index": i, "png": _b64(image_grid_png(images[i:i + 1], nrow=1, padding=0)), "top_k": top})
        answer = {"n": request.n, "seed": request.seed, "attribute_by": attribute_by,
                  "grid_png": _b64(image_grid_png(images)), "images": items}
        if request.raw:
            answer["raw_f32"] = _b64(images.float().contiguous().numpy().astype("<f4").tobytes())
        answer["elapsed_s"] = round(time.perf_counter() - start, 4)
        return answer

    def training_image_png(self, index: int) -> tuple[bytes, int]:
        """Row ``index`` of the reference set: its image as a PNG, and its label."""
        if not 0 <= index < len(self.labels):
            raise IndexError(f"training image {index} does not exist: the reference set has indices "
                             f"0..{len(self.labels) - 1}")
        image = self.dataset.images[int(self.rows[index])]
        return image_grid_png(image[None], nrow=1, padding=0), int(self.labels[index])

    def training_images(self, label: Optional[int], offset: int, limit: int) -> dict:
        rows = torch.arange(len(self.labels)) if label is None else torch.nonzero(self.labels == label).flatten()
        chosen = rows[offset:offset + limit]
        return {"total": len(rows), "offset": offset,
                "items": [{"index": int(i), "label": int(self.labels[i])} for i in chosen]}
