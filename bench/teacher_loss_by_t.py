"""Held-out epsilon-prediction MSE of teacher checkpoints, per band of timesteps: where a teacher is still weak.

    python bench/teacher_loss_by_t.py runs/a/steps_00001200.pt runs/b/steps_00001200.pt

The same 512 mnist5k images, noise and timesteps for every checkpoint (EMA weights, eval mode), so rows compare.
With --per_t LO HI, every timestep in [LO, HI) instead: the error in eval mode (BatchNorm's running statistics,
as sampling runs) beside the error with batch statistics, the probe images at that t mixed into training-like
batches of uniform t (as training sees them). Timesteps where eval mode is far worse are BatchNorm outliers.

Also recorded: how far the per-timestep embedding table has moved from a table of unrelated random rows (mean
cosine between the rows of neighbouring timesteps, and the mean row norm; random N(0, 1) rows give ~0 and ~16).
"""
import torch

from models.data.datasets import load_dataset
from models.io.cli import ArgumentParser
from models.io.errors import run_cli
from models.io.records import append_run_record
from models.io.teacher_checkpoints import load_teacher
from models.nets.unet import batchnorm_layers, recalibrate_batchnorm


BANDS = [(0, 100), (100, 300), (300, 500), (500, 700), (700, 850), (850, 950), (950, 1000)]


@torch.inference_mode()
def loss_by_band(diffusion, images: torch.Tensor, seed: int = 123) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for lo, hi in BANDS:
        t = torch.randint(lo, min(hi, diffusion.timesteps), (images.shape[0],), generator=gen)
        noise = torch.randn(images.shape, generator=gen)
        out.append(torch.nn.functional.mse_loss(diffusion(images, noise, t), noise).item())
    return out


@torch.inference_mode()
def loss_per_t(diffusion, images: torch.Tensor, t_range: range, per_batch: int = 8, batch: int = 64,
               seed: int = 123) -> list[dict]:
    norms = batchnorm_layers(diffusion)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # batch statistics in train mode, running statistics left untouched
    rows = []
    try:
        for t0 in t_range:
            gen = torch.Generator().manual_seed(seed)
            sq_eval, sq_batch, count = 0.0, 0.0, 0
            for start in range(0, images.shape[0] - batch + 1, batch):
                x = images[start:start + batch]
                noise = torch.randn(x.shape, generator=gen)
                t = torch.randint(0, diffusion.timesteps, (batch,), generator=gen)
                t[:per_batch] = t0
                diffusion.eval()
                sq_eval += (diffusion(x, noise, t) - noise)[:per_batch].pow(2).sum().item()
                diffusion.train()
                sq_batch += (diffusion(x, noise, t) - noise)[:per_batch].pow(2).sum().item()
                count += noise[:per_batch].numel()
            rows.append({"t": t0, "eval_mse": sq_eval / count, "batch_stats_mse": sq_batch / count})
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        diffusion.eval()
    return rows


def embedding_smoothness(diffusion) -> dict:
    rows = diffusion.model.time_embedding.weight.detach().float()
    cosine = torch.nn.functional.cosine_similarity(rows[1:], rows[:-1], dim=1)
    return {"neighbour_cosine_mean": cosine.mean().item(), "row_norm_mean": rows.norm(dim=1).mean().item()}


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", help="teacher checkpoints")
    p.add_argument("--n", type=int, default=512, help="held-out images (a fixed random subset of mnist5k)")
    p.add_argument("--per_t", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                   help="every timestep in [LO, HI): eval-mode vs batch-statistics error (default: off, bands)")
    p.add_argument("--recalibrate_batches", type=int, default=0,
                   help="with --per_t: also measure after exact BatchNorm statistics over N batches of 64 (0: off)")
    p.add_argument("--record", default="bench/results/teacher_loss_by_t.jsonl", help="append results here")
    a = p.parse_args()
    data = load_dataset("mnist5k", "train")
    images = data.images[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:a.n]]
    if a.per_t:
        return per_t_main(a, images, data.images)
    print("checkpoint".ljust(48) + "".join(f"{lo}-{hi}".rjust(10) for lo, hi in BANDS) + "  emb cos  emb norm")
    for path in a.checkpoints:
        teacher = load_teacher(path, "cpu")
        losses = loss_by_band(teacher.diffusion.eval(), images)
        embedding = embedding_smoothness(teacher.diffusion)
        append_run_record({"checkpoint": path, "sha256": teacher.sha256, "step": teacher.checkpoint.get("step"),
                           "bands": BANDS, "eps_mse": losses, "time_embedding": embedding, "n": a.n}, a.record)
        print(path[-48:].ljust(48) + "".join(f"{v:10.4f}" for v in losses)
              + f"{embedding['neighbour_cosine_mean']:9.3f}{embedding['row_norm_mean']:10.2f}")


def embedding_rows(diffusion, ts: list[int]) -> dict:
    rows = diffusion.model.time_embedding.weight.detach().float()
    cosine = torch.nn.functional.cosine_similarity(rows[1:], rows[:-1], dim=1)
    return {t: {"norm": rows[t].norm().item(), "cosine_to_previous": cosine[t - 1].item()} for t in ts if t > 0}


def recalibrated(diffusion, train_images: torch.Tensor, n_batches: int, batch: int = 64, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    n = n_batches * batch
    idx = torch.randint(0, train_images.shape[0], (n,), generator=gen)
    t = torch.randint(0, diffusion.timesteps, (n,), generator=gen)
    noise = torch.randn((n, *train_images.shape[1:]), generator=gen)
    with torch.inference_mode():
        recalibrate_batchnorm(diffusion, torch.arange(n), batch,
                              forward=lambda i: diffusion(train_images[idx[i]], noise[i], t[i]))
    return diffusion.eval()


def per_t_main(a, images: torch.Tensor, train_images: torch.Tensor) -> None:
    for path in a.checkpoints:
        teacher = load_teacher(path, "cpu")
        t_range = range(*a.per_t)
        rows = loss_per_t(teacher.diffusion, images, t_range)
        outliers = [r["t"] for r in rows if r["eval_mse"] > 10 * max(r["batch_stats_mse"], 1e-3)]
        embedding = embedding_rows(teacher.diffusion, list(t_range))
        record = {"checkpoint": path, "sha256": teacher.sha256, "step": teacher.checkpoint.get("step"),
                  "per_t": rows, "outlier_t": outliers, "n": a.n,
                  "embedding_rows_outliers": {t: embedding[t] for t in outliers if t in embedding},
                  "embedding_rows_range": {key: [min(e[key] for e in embedding.values()),
                                                 max(e[key] for e in embedding.values())]
                                           for key in ("norm", "cosine_to_previous")}}
        worst = max(rows, key=lambda r: r["eval_mse"])
        print(f"{path}: t in [{a.per_t[0]}, {a.per_t[1]}): eval-mode epsilon MSE > 10x batch-statistics at "
              f"{len(outliers)} timesteps {outliers}; worst t={worst['t']}: eval "
              f"{worst['eval_mse']:.4f} vs batch statistics {worst['batch_stats_mse']:.4f}; embedding rows over "
              f"the range: norm {record['embedding_rows_range']['norm']}, cosine to t-1 "
              f"{record['embedding_rows_range']['cosine_to_previous']}")
        if a.recalibrate_batches:
            after = loss_per_t(recalibrated(teacher.diffusion, train_images, a.recalibrate_batches), images,
                               [worst["t"]])[0]
            record["after_recalibration"] = {"batches": a.recalibrate_batches, "t": worst["t"],
                                             "eval_mse": after["eval_mse"]}
            print(f"  after exact BatchNorm statistics over {a.recalibrate_batches} batches: t={worst['t']} eval "
                  f"{after['eval_mse']:.4f}")
        append_run_record(record, a.record)


if __name__ == "__main__":
    run_cli(main, resumable=False)
