"""Attribution by digit shape: a generation's nearest training images by pixel cosine, made tolerant of what does not
change a digit (a one-pixel shift, a slight rotation, a thinner or thicker stroke) and of the student's softness.

Both sides are blurred (Gaussian, sigma 1 px: the student draws soft strokes, training digits are sharp); the
generation is compared at its 3 x 3 one-pixel shifts, each training image in five views (as drawn, rotated by -10
and +10 degrees, stroke thinned and thickened by a half blend with a 3 x 3 erosion or dilation); a pair's score is
the best cosine over all 45 combinations. The 50 best by that score are then ordered by the image distortion
model's distance (each pixel may find its match up to 2 px away, by its neighbourhood of gradients), which lets
each part of a stroke move on its own. No label, classifier or training enters: the rule depends on the images
alone, so label agreement stays an honest check of it. Measured against learned label-free alternatives (a
contrastive head, PCA of augmented views, the teacher's encoder features) in BENCHMARKS.md, Attribution.

Scores are also given as a percentile: where a score falls among the scores of reference images to their nearest
*other* reference image under the same rule (a fixed, label-blind subset of rows). A near-copy of a training image
lands near 100; a generation that only resembles some digit of its class lands far lower.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

SHAPE = "shape"


@dataclass(frozen=True)
class ShapeMatch:
    blur_sigma: float = 1.0
    shift: int = 1                           # the generation's shifts: -shift..shift pixels on each axis
    rotations: tuple = (-10.0, 10.0)         # degrees; each training image also as drawn
    stroke: float = 0.5                      # thin and thick views: this share of a 3 x 3 erosion / dilation
    calibration_rows: int = 256              # reference rows whose nearest-other score calibrates percentiles
    rerank: int = 50                         # this many best by cosine, re-ordered by distortion distance (0: off)
    distortion_window: int = 2               # how far (pixels) a generation's pixel may look for its match

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeMatch":
        return cls(**{**d, "rotations": tuple(d["rotations"])})


def _to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    return (images.float() + 1) / 2


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-k ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype,
                         device=x.device).expand(x.shape[0], 2, 3)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def _stroke(x: torch.Tensor, share: float, thicker: bool) -> torch.Tensor:
    moved = F.max_pool2d(x, 3, 1, 1) if thicker else -F.max_pool2d(-x, 3, 1, 1)
    return (1 - share) * x + share * moved


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(1), dim=1)


@torch.inference_mode()
def reference_views(images: torch.Tensor, cfg: ShapeMatch, chunk: int = 1000) -> torch.Tensor:
    """[V, N, 784] unit rows: every reference image in each of its views, blurred."""
    views = []
    for lo in range(0, images.shape[0], chunk):
        x = _to_unit_interval(images[lo:lo + chunk])
        variants = [x, *(_rotate(x, a) for a in cfg.rotations)]
        if cfg.stroke:
            variants += [_stroke(x, cfg.stroke, False), _stroke(x, cfg.stroke, True)]
        views.append(torch.stack([_unit_rows(gaussian_blur(v, cfg.blur_sigma)) for v in variants]))
    return torch.cat(views, 1)


def query_views(images: torch.Tensor, cfg: ShapeMatch) -> torch.Tensor:
    """[n, S, 784] unit rows: each generation blurred, at every shift."""
    x = gaussian_blur(_to_unit_interval(images), cfg.blur_sigma)
    r, size = cfg.shift, x.shape[-1]
    padded = F.pad(x, (r, r, r, r))
    shifts = [padded[..., r + dy:r + dy + size, r + dx:r + dx + size]
              for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    return F.normalize(torch.stack(shifts, 1).flatten(2), dim=2)


@torch.inference_mode()
def shape_similarity(images: torch.Tensor, views: torch.Tensor, cfg: ShapeMatch) -> torch.Tensor:
    """[n, N]: each image's best cosine to each reference image over shifts and views."""
    q = query_views(images.to(views.device), cfg)
    n, s, d = q.shape
    v, m, _ = views.shape
    return (q.reshape(n * s, d) @ views.reshape(v * m, d).T).view(n, s, v, m).amax((1, 2))


@torch.inference_mode()
def shape_top_k(images: torch.Tensor, views: torch.Tensor, cfg: ShapeMatch, k: int,
                reference_images: torch.Tensor | None = None, chunk: int = 16):
    """(scores, indices) of the k best reference images for each image, in chunks of ``chunk`` images. With the
    ``reference_images`` (as stored, in [-1, 1]) and ``cfg.rerank``, the rerank best by cosine are re-ordered by
    distortion distance, best first; the scores stay their cosines (what the percentiles calibrate), so they need
    not fall along the list."""
    rerank = bool(cfg.rerank) and reference_images is not None
    pool = min(max(k, cfg.rerank) if rerank else k, views.shape[1])
    if rerank:
        reference_images = reference_images.to(views.device)
    scores, indices = [], []
    for lo in range(0, images.shape[0], chunk):
        batch = images[lo:lo + chunk].to(views.device)
        s, i = shape_similarity(batch, views, cfg).topk(pool, dim=1)
        if rerank:
            order = distortion_distance(batch, reference_images[i], cfg).argsort(1)[:, :k]
            s, i = s.gather(1, order), i.gather(1, order)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _gradient_context(images: torch.Tensor, cfg: ShapeMatch) -> torch.Tensor:
    """[n, 18, H, W]: at each pixel, the 3 x 3 neighbourhood of the horizontal and vertical Sobel gradients of the
    blurred image scaled to unit norm (gradients: where strokes run, not how dark they are)."""
    x = gaussian_blur(_to_unit_interval(images), cfg.blur_sigma)
    x = x / x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    kernels = torch.stack([_SOBEL, _SOBEL.t()]).unsqueeze(1).to(x)
    grads = F.conv2d(x, kernels, padding=1)
    return F.unfold(grads, 3, padding=1).view(x.shape[0], -1, *x.shape[-2:])


@torch.inference_mode()
def distortion_distance(images: torch.Tensor, candidates: torch.Tensor, cfg: ShapeMatch) -> torch.Tensor:
    """[n, K]: the image distortion model's distance (Keysers et al., "Deformation models for image recognition",
    2007) from each image [n, 1, H, W] to its candidates [n, K, 1, H, W]: every pixel of the image is matched to the
    reference pixel within ``cfg.distortion_window`` whose gradient neighbourhood is closest, and the squared
    differences are summed. Each part of a stroke may move on its own, which no global shift or rotation allows."""
    w, (h, wd) = cfg.distortion_window, images.shape[-2:]
    queries = _gradient_context(images, cfg)                                   # n D H W
    out = []
    for query, refs in zip(queries, candidates):  # one image at a time: its K x D x H x W stays in cache
        ref = F.pad(_gradient_context(refs, cfg), (w, w, w, w))                # K D H+2w W+2w
        best = None
        for dy in range(2 * w + 1):
            for dx in range(2 * w + 1):
                d = (ref[..., dy:dy + h, dx:dx + wd] - query).square().sum(1)  # K H W
                best = d if best is None else torch.minimum(best, d)
        out.append(best.sum((1, 2)))
    return torch.stack(out)


def calibration_rows(n: int, count: int) -> torch.Tensor:
    """Evenly spaced reference rows (label-blind: they depend on the set's size alone)."""
    return torch.linspace(0, n - 1, min(count, n)).round().long().unique()


def nearest_other_scores(similarity_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Sorted scores of each calibration row's best match among the *other* reference rows ([len(rows), N] in)."""
    s = similarity_rows.clone()
    s[torch.arange(len(rows)), rows] = -math.inf
    return s.amax(1).sort().values


@torch.inference_mode()
def shape_record(images: torch.Tensor, cfg: ShapeMatch = ShapeMatch()) -> dict:
    """What reference_features.pt keeps for the shape rule: its settings, the reference images (float16) and the
    calibration of its percentiles. Takes the images only: no label can reach the rule."""
    images = images.half().float()  # the stored precision, so that scoring at load sees exactly these images
    views = reference_views(images, cfg)
    rows = calibration_rows(images.shape[0], cfg.calibration_rows)
    calibration = nearest_other_scores(
        torch.cat([shape_similarity(images[rows[i:i + 32]], views, cfg) for i in range(0, len(rows), 32)]), rows)
    return {"rule": SHAPE, "settings": asdict(cfg) | {"rotations": list(cfg.rotations)},
            "images": images.half().cpu(), "calibration": calibration.cpu()}


@torch.inference_mode()
def cosine_calibration(features: torch.Tensor, count: int = ShapeMatch.calibration_rows) -> torch.Tensor:
    """The same calibration for cosine similarity of bottleneck features (attribute_by bottleneck or image)."""
    rows = calibration_rows(features.shape[0], count)
    ref = _unit_rows(features.float())
    return nearest_other_scores(ref[rows.to(ref.device)] @ ref.T, rows.to(ref.device)).cpu()


def percentile(scores: torch.Tensor, calibration: torch.Tensor) -> torch.Tensor:
    """Share (0-100) of calibration rows whose nearest-other score is at most each score."""
    calibration = calibration.to(scores.device, torch.float32)
    return 100.0 * torch.searchsorted(calibration, scores.float().contiguous(), right=True) / len(calibration)
