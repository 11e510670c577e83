"""Which label-free attribution rule? The candidates measured before the shape rule was chosen, on the same
generations: top-1 / top-5 label agreement (the audit classifier's label of a generation vs its nearest training
images' labels). None of them sees a label or a classifier:

- pixel cosine (the baseline), blurred pixels (sigma 1), and pixels deskewed (centre of mass to the centre, slant
  sheared away by the image's second moments) and blurred;
- the teacher's UNet encoder at t = 0 (trained without labels): its 7 x 7 mid-block features;
- a contrastive head learned from scratch (SimCLR: a 3-layer conv net, 300 steps of 256 pairs of augmented training
  images: shifts, rotations, scale, shear, elastic warps, stroke width, blur; the extraction's time budget);
- the shape rule (models/steering/shape_match.py) and two of its parts alone (shifts only; views only).

Defaults to a development noise seed (3), apart from the seed bench_attribution_neighbours.py reports (1).

    python bench/bench_attribution_label_free.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \\
        --decoder_ckpt checkpoints/student_mnist5k.pt --ref_features_path FEATURES/reference_features.pt --cpu
"""
import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from models.data.datasets import load_dataset
from models.evaluation.bench_common import load_pipeline, pipeline_parser
from models.io.errors import run_cli
from models.io.paths import AUDIT_CLASSIFIER
from models.io.progress import progress_bar
from models.io.records import append_run_record
from models.nets.classifier import load_classifier
from models.steering.search import top_k_similar
from models.steering.shape_match import ShapeMatch, gaussian_blur, reference_views, shape_top_k

TOP_K = 5


def deskew(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1]: centre of mass moved to the centre, slant sheared away (x-y moment over y variance)."""
    x = (images.float() + 1) / 2
    w, c = x[:, 0], torch.arange(28, dtype=torch.float32)
    m = w.sum((1, 2)).clamp_min(1e-6)
    my, mx = (w.sum(2) * c).sum(1) / m, (w.sum(1) * c).sum(1) / m
    vy = (w.sum(2) * (c - my[:, None]) ** 2).sum(1) / m
    cxy = (w * (c[None, :, None] - my[:, None, None]) * (c[None, None, :] - mx[:, None, None])).sum((1, 2)) / m
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = 1, cxy / vy.clamp_min(1e-6), (mx - 13.5) / 14
    theta[:, 1, 1], theta[:, 1, 2] = 1, (my - 13.5) / 14
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random label-preserving distortions of images in [-1, 1]."""
    n = x.shape[0]

    def uniform(scale, *shape):
        return (torch.rand(n, *shape, generator=g) * 2 - 1) * scale
    angle, scale, shear, shift = uniform(math.radians(12)), 1 + uniform(0.1), uniform(0.15), uniform(2.5 / 14, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    warp = F.interpolate(torch.randn(n, 2, 7, 7, generator=g) * 0.03, size=(28, 28), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1)
    out = F.grid_sample((x + 1) / 2, F.affine_grid(theta, list(x.shape), align_corners=False) + warp,
                        align_corners=False)
    pick, share = torch.rand(n, 1, 1, 1, generator=g), torch.rand(n, 1, 1, 1, generator=g) * 0.6
    out = torch.where(pick < 0.25, (1 - share) * out + share * F.max_pool2d(out, 3, 1, 1), out)
    out = torch.where(pick > 0.8, (1 - share) * out + share * -F.max_pool2d(-out, 3, 1, 1), out)
    out = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.5, gaussian_blur(out, 1.0), out)
    return out * 2 - 1


def contrastive_features(reference: torch.Tensor, queries: torch.Tensor, steps: int, seed: int = 0):
    """A SimCLR net trained on augmented reference images only; returns (reference, query) embeddings, seconds."""
    torch.manual_seed(seed)
    w = 16
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, w, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(w, 2 * w, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(2 * w, 4 * w, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    head = torch.nn.Sequential(torch.nn.Linear(4 * w, 4 * w), torch.nn.ReLU(), torch.nn.Linear(4 * w, 64))
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in progress_bar(range(steps), desc="contrastive head", unit="step"):
        x = reference[torch.randint(len(reference), (256,), generator=g)]
        z = F.normalize(head(net(torch.cat([augment(x, g), augment(x, g)]))), dim=1)
        sim = (z @ z.T / 0.2).fill_diagonal_(-1e9)
        loss = F.cross_entropy(sim, torch.cat([torch.arange(256, 512), torch.arange(256)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        return net(reference), net(queries), seconds


@torch.inference_mode()
def teacher_mid_features(unet, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([unet.encode(x[i:i + 500], torch.zeros(len(x[i:i + 500]), dtype=torch.long))[0]
                      for i in range(0, len(x), 500)])


def main():
    p = pipeline_parser(__doc__, "bench/results/attribution_label_free.jsonl", n=1000)
    p.add_argument("--seed", type=int, default=3, help="noise seed of the generations (a development seed)")
    p.add_argument("--contrastive_steps", type=int, default=300, help="SimCLR steps (0: skip the contrastive head)")
    p.add_argument("--audit_classifier", default=AUDIT_CLASSIFIER, help="labels the generations (no loss has seen it)")
    p.add_argument("--distortion_windows", type=int, nargs="*", default=[],
                   help="also the shape rule re-ranked with each of these distortion windows (pixels) ...")
    p.add_argument("--rerank_pools", type=int, nargs="*", default=[],
                   help="... and each of these pool sizes (the default rule's are 2 and 50; how they were chosen)")
    a = p.parse_args()
    pipe, _ = load_pipeline(a)
    meta = pipe.reference["metadata"]
    real = load_dataset(meta["dataset"], meta.get("split", "train")).images[pipe.reference["indices"]].cpu()
    labels = pipe.steering.labels
    out = pipe.generate(a.n, seed=a.seed, top_k=0)
    queries = out.images.cpu()
    with torch.inference_mode():
        label = load_classifier(a.audit_classifier, "cpu")(queries).argmax(1)
    cfg = ShapeMatch()
    views = reference_views(real, cfg)
    rules = {"pixel cosine (baseline)": lambda: top_k_similar(queries, real, TOP_K)[1],
             "blurred pixels": lambda: top_k_similar(gaussian_blur(queries, 1.0), gaussian_blur(real, 1.0), TOP_K)[1],
             "deskewed, blurred pixels": lambda: top_k_similar(gaussian_blur(deskew(queries), 1.0), gaussian_blur(deskew(real), 1.0),
                                                               TOP_K)[1],
             "teacher encoder, t = 0": lambda: top_k_similar(teacher_mid_features(pipe.teacher.diffusion.model, queries),
                                                             teacher_mid_features(pipe.teacher.diffusion.model, real),
                                                             TOP_K)[1],
             "shape: shifts only": lambda: shape_top_k(queries, reference_views(real, replace(cfg, rotations=(), stroke=0)),
                                                       replace(cfg, rotations=(), stroke=0), TOP_K)[1],
             "shape: views only": lambda: shape_top_k(queries, reference_views(real, replace(cfg, shift=0)),
                                                      replace(cfg, shift=0), TOP_K)[1],
             "shape, cosine order (no distortion re-ranking)": lambda: shape_top_k(queries, views, cfg, TOP_K)[1],
             "shape (the default rule)": lambda: shape_top_k(queries, views, cfg, TOP_K, real)[1]}
    for window in a.distortion_windows:
        for pool in a.rerank_pools:
            variant = replace(cfg, distortion_window=window, rerank=pool)
            rules[f"shape re-ranked, window {window}, pool {pool}"] = \
                lambda variant=variant: shape_top_k(queries, views, variant, TOP_K, real)[1]
    result = {"n": a.n, "seed": a.seed, "labels_by": "audit classifier", "agreement": {}}
    if a.contrastive_steps:
        ref_emb, query_emb, seconds = contrastive_features(real, queries, a.contrastive_steps)
        result["contrastive_training_s"] = round(seconds, 1)
        rules[f"contrastive head, {a.contrastive_steps} steps"] = lambda: top_k_similar(query_emb, ref_emb, TOP_K)[1]
    print(f"{'rule':34s} {'top-1':>6s} {'top-5':>6s}")
    for name, rule in rules.items():
        idx = rule().cpu()
        top1 = (labels[idx[:, 0]] == label).float().mean().item()
        top5 = (labels[idx] == label[:, None]).float().mean().item()
        result["agreement"][name] = {"top1": top1, "top5_share": top5}
        print(f"{name:34s} {top1:6.1%} {top5:6.1%}")
    result.update({"decoder": a.decoder_ckpt, "features": a.ref_features_path})
    append_run_record(result, a.record)


if __name__ == "__main__":
    run_cli(main, resumable=False)
