"""Teacher DDPM training (upstream recipe: AdamW, OneCycle, EMA every 10 steps), resumable bit-exactly."""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from ..data.datasets import load_dataset
from ..diffusion.noise import per_sample_noise, step_generator
from ..diffusion.sampling import teacher_sample
from ..evaluation.plots import plot_metric_curves
from ..io.checkpoints import load_checkpoint
from ..io.device import pick_device
from ..io.distributed import Ranks, naming_rank, start as start_ranks
from ..io.errors import PipelineError
from ..io.files import append_jsonl, atomic_save, atomic_write_json, prepare_output_dir, truncate_jsonl
from ..io.guards import holds_output_locks
from ..io.images import save_image_grid
from ..io.progress import progress_bar
from ..io.records import software_versions
from ..io.teacher_checkpoints import (checkpoint_to_resume, load_teacher, require_finite_checkpoint,
                                      restore_training_state, total_steps)
from ..nets.teacher import MNISTDiffusion, TeacherConfig
from ..nets.unet import batchnorm_layers, sinusoidal_table

TIME_EMBEDDING_INITS = ("random", "sinusoidal")
CHECKPOINT_RE = re.compile(r"steps_(\d{8})\.pt$")


@dataclass
class TeacherTrainOptions:
    dataset: str = "mnist5k"
    download: bool = False
    output_dir: str = "results"
    steps: int = 0                # 0: derived from epochs
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    base_dim: int = 64
    dim_mults: list = field(default_factory=lambda: [2, 4])
    timesteps: int = 1000
    ema_every: int = 10
    ema_decay: float = 0.995
    seed: int = 0
    save_every: int = 500
    keep_last: int = 3
    n_samples: int = 36
    sample_steps: int = 50
    log_every: int = 10
    cpu: bool = False
    threads: int = 0
    init_from: str = ""           # continue training a finished checkpoint under a new schedule
    time_embedding_init: str = "random"  # "random" (upstream) or "sinusoidal"
    freeze_batchnorm: bool = False  # train with BatchNorm's running statistics, as sampling uses it


def upstream_ema_decay(decay: float, batch_size: int, ema_every: int, epochs: float) -> float:
    """Upstream's (torchvision's) adjustment of the per-update EMA decay to batch size and run length."""
    adjust = batch_size * ema_every / max(epochs, 1e-9)
    return 1.0 - min(1.0, (1.0 - decay) * adjust)


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """Upstream's EMA: AveragedModel over parameters and buffers, so its state dict is upstream's format."""
    def ema_avg(avg, new, num_averaged):
        return decay * avg + (1.0 - decay) * new
    return AveragedModel(model, avg_fn=ema_avg, use_buffers=True)


def train_mode(diffusion: torch.nn.Module, freeze_batchnorm: bool) -> None:
    """Training mode; with ``freeze_batchnorm`` BatchNorm stays in eval mode (fixed running statistics).

    Trained with batch statistics, a channel that is an outlier at a few timesteps is normalised by a variance it
    dominates itself; at sampling (eval mode) the running variance does not contain it, and the teacher's epsilon
    error at those timesteps is 100-1000x its neighbours'. Training with the running statistics optimises the
    network that sampling actually runs.
    """
    diffusion.train()
    if freeze_batchnorm:
        for norm in batchnorm_layers(diffusion):
            norm.eval()


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("steps_*.pt") if CHECKPOINT_RE.search(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.search(p.name).group(1)))


def _total_steps(opts: TeacherTrainOptions, n_images: int) -> tuple[int, int]:
    per_epoch = n_images // opts.batch_size
    if per_epoch == 0:
        raise PipelineError(f"batch_size {opts.batch_size} is larger than the dataset ({n_images} images)")
    return (opts.steps or opts.epochs * per_epoch), per_epoch


def _batch_indices(seed: int, step: int, per_epoch: int, batch_size: int, n: int) -> torch.Tensor:
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[within * batch_size:(within + 1) * batch_size]


def training_batch(seed: int, step: int, per_epoch: int, batch_size: int, n: int, timesteps: int,
                   image_shape: tuple = (1, 28, 28)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s rows (indices into the dataset), timesteps and noise: fixed by (seed, step) alone, so a
    resumed run, or a fine-tune that leaves some rows out (models/training/removal.py), draws the same for the rest."""
    gen = step_generator(seed, step)
    idx = _batch_indices(seed, step, per_epoch, batch_size, n)
    t = torch.randint(0, timesteps, (len(idx),), generator=gen)
    noise = torch.randn((len(idx), *image_shape), generator=gen)
    return idx, t, noise


@holds_output_locks
def train_teacher(opts: TeacherTrainOptions, resume: bool = False, dry_run: bool = False, *, locks) -> dict:
    """Under torchrun: DistributedDataParallel, --batch_size the global batch split over the ranks, each rank
    taking its rows of the batch, timesteps and noise one process draws; rank 0 alone samples grids and saves."""
    ranks, device = start_ranks(pick_device(opts.cpu))
    with naming_rank(ranks):
        return _train_teacher(opts, resume, dry_run, locks, ranks, device)


def _train_teacher(opts: TeacherTrainOptions, resume: bool, dry_run: bool, locks, ranks: Ranks, device) -> dict:
    out = Path(opts.output_dir)

    def prepare():
        for name in ("batch_size", "epochs", "ema_every", "save_every", "base_dim", "timesteps"):
            if getattr(opts, name) <= 0:
                raise PipelineError(f"--{name} must be positive, got {getattr(opts, name)}")
        if opts.time_embedding_init not in TIME_EMBEDDING_INITS:
            raise PipelineError(f"--time_embedding_init must be one of {', '.join(TIME_EMBEDDING_INITS)}, "
                                f"got {opts.time_embedding_init!r}")
        if not (opts.lr > 0 and math.isfinite(opts.lr)):
            raise PipelineError(f"--lr must be a positive number, got {opts.lr}")
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if out.exists() and not out.is_dir():
            raise PipelineError(f"output directory {out} exists and is a file; choose another --output_dir")
        data = load_dataset(opts.dataset, "train", download=opts.download)
        total, per_epoch = _total_steps(opts, len(data))
        if total < 8:
            raise PipelineError(f"{total} steps is too short for upstream's OneCycle schedule; use --steps 8 or more")
        if ranks.active and opts.batch_size < ranks.world:
            raise PipelineError(f"--batch_size {opts.batch_size} is smaller than the {ranks.world} ranks sharing it")
        init = None
        if opts.init_from:
            init = load_teacher(opts.init_from, device)  # validates the file; its architecture wins over the flags
            require_finite_checkpoint(init.checkpoint["model"], init.path, "--init_from")  # continued too
        return data, total, per_epoch, init

    data, total, per_epoch, init = ranks.agree(prepare)
    say = print if ranks.is_main else (lambda *args: None)
    epochs = total / per_epoch
    decay = upstream_ema_decay(opts.ema_decay, opts.batch_size, opts.ema_every, epochs)
    model_args = TeacherConfig(base_dim=opts.base_dim, dim_mults=list(opts.dim_mults), timesteps=opts.timesteps)
    steps_before = 0
    if init is not None:
        model_args = init.config
        steps_before = total_steps(init.checkpoint)
    resolved = {"options": asdict(opts), "model_args": model_args.to_dict(), "total_steps": total,
                "steps_before": steps_before,
                "init_from": {"path": init.path, "sha256": init.sha256} if init else None,
                "steps_per_epoch": per_epoch, "effective_ema_decay": decay, "device": str(device),
                "n_images": len(data)}
    if ranks.active:
        resolved["world_size"] = ranks.world
    if dry_run:
        say(json.dumps(resolved, indent=2))
        return resolved

    def claim():
        prepare_output_dir(out)
        locks.hold(out)
        latest = checkpoint_to_resume(list_checkpoints(out), resume, out)
        return None if latest is None else str(latest)

    latest = ranks.main_only(claim)

    torch.manual_seed(opts.seed)
    diffusion = MNISTDiffusion(model_args).to(device)
    if opts.time_embedding_init == "sinusoidal":
        with torch.no_grad():
            diffusion.model.time_embedding.weight.copy_(
                sinusoidal_table(model_args.timesteps, model_args.time_embedding_dim))
    ema = make_ema(diffusion, decay)
    if init is not None:
        diffusion.load_state_dict(init.checkpoint["model"])
        if isinstance(init.checkpoint.get("model_ema"), dict):
            ema.load_state_dict(init.checkpoint["model_ema"])
        else:
            ema.update_parameters(diffusion)
    optimizer = torch.optim.AdamW(diffusion.parameters(), lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, opts.lr, total_steps=total, pct_start=0.25,
                                                    anneal_strategy="cos")
    step = 0

    def restore() -> int:
        ckpt = load_checkpoint(Path(latest), device, what="checkpoint to resume")
        saved = ckpt.get("config", {}).get("options", {})
        for key in ("dataset", "batch_size", "lr", "base_dim", "dim_mults", "timesteps", "seed", "ema_every",
                    "ema_decay", "freeze_batchnorm"):
            if key in saved and saved[key] != getattr(opts, key):
                raise PipelineError(f"--resume with a different {key} ({getattr(opts, key)} vs {saved[key]} "
                                    f"in {Path(latest).name}); use the original options")
        if ckpt.get("config", {}).get("total_steps") != total:
            raise PipelineError(f"--resume with a different length ({total} steps vs "
                                f"{ckpt['config'].get('total_steps')}); use the original --steps/--epochs")
        restore_training_state(ckpt, diffusion, ema, optimizer, scheduler)
        return int(ckpt["step"])

    if latest is not None:
        step = ranks.agree(restore)  # every rank reads rank 0's checkpoint (a shared filesystem)
        say(f"resumed from {latest} at step {step}/{total}")

    def record_start():
        truncate_jsonl(out / "stats.jsonl", "step", step)  # records of steps whose checkpoint was never written
        atomic_write_json(resolved | {"versions": software_versions()}, out / "training_options.json")

    ranks.main_only(record_start)
    model = diffusion
    if ranks.active:  # after any restore: DDP starts every rank from rank 0's weights and buffers
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(diffusion, device_ids=[device] if device.type == "cuda" else None)

    images = data.images.to(device)
    grid_noise = per_sample_noise(opts.seed, range(opts.n_samples), stream=7, device=device)
    stats_path = out / "stats.jsonl"
    start_time, run_loss, run_n = time.perf_counter(), 0.0, 0
    train_mode(diffusion, opts.freeze_batchnorm)
    bar = progress_bar(total=total, initial=step, desc="train_ddpm", unit="step", dynamic_ncols=True,
                       disable=not ranks.is_main)
    while step < total:
        idx, t, noise = training_batch(opts.seed, step, per_epoch, opts.batch_size, len(data),
                                       model_args.timesteps, tuple(images.shape[1:]))
        x0, t, noise = images[idx], t.to(device), noise.to(device)
        if ranks.active:  # this rank's rows of what one process draws, and its share of the batch's mean
            lo, hi = ranks.split(len(idx))
            share = (hi - lo) / len(idx)
            x0, t, noise = x0[lo:hi], t[lo:hi], noise[lo:hi]
        loss = torch.nn.functional.mse_loss(model(x0, noise, t), noise)
        value = loss.item() if not ranks.active else \
            ranks.sum(torch.tensor([loss.item() * share], dtype=torch.float64, device=device)).item()
        if not math.isfinite(value):
            ranks.everywhere(_refuse(f"loss became {value} at step {step}; last good checkpoint kept in {out}"))
        (loss * (share * ranks.world) if ranks.active else loss).backward()  # DDP averages over ranks
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % opts.ema_every == 0:
            ema.update_parameters(diffusion)
        step += 1
        run_loss += value
        run_n += 1
        bar.update(1)
        if ranks.is_main and (step % opts.log_every == 0 or step == total):
            bar.set_postfix(loss=f"{run_loss / run_n:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            append_jsonl({"step": step, "epoch": step / per_epoch, "loss": run_loss / run_n,
                          "lr": scheduler.get_last_lr()[0], "it_per_s": bar.format_dict.get("rate")}, stats_path)
        if step % opts.log_every == 0 or step == total:
            run_loss, run_n = 0.0, 0
        if step % per_epoch == 0 or step == total:
            ranks.main_only(lambda: _sample_grid(ema.module, grid_noise, opts.sample_steps,
                                                 out / f"steps_{step:08d}.png"))
        if step % opts.save_every == 0 or step == total:
            ranks.main_only(lambda: _save_and_prune(out, step, diffusion, ema, optimizer, scheduler, resolved,
                                                    data.source, opts.keep_last, stats_path))
    bar.close()

    def finish():
        final = list_checkpoints(out)[-1]
        summary = {"checkpoint": str(final), "steps": step, "wall_s": time.perf_counter() - start_time}
        print(f"train_ddpm: {step} steps, {summary['wall_s']:.0f} s this run, checkpoint {final}")
        return summary

    return ranks.main_only(finish)


def _refuse(message: str):
    def fail():
        raise PipelineError(message)
    return fail


def _save_and_prune(out: Path, step: int, diffusion, ema, optimizer, scheduler, resolved: dict, source: str,
                    keep_last: int, stats_path: Path) -> None:
    _save(out, step, diffusion, ema, optimizer, scheduler, resolved, source)
    for old in list_checkpoints(out)[:-keep_last]:
        old.unlink(missing_ok=True)
    if stats_path.exists():
        plot_metric_curves(stats_path, out / "loss.png", keys=("loss",), x="step", log_y=True)


@torch.no_grad()
def _sample_grid(diffusion: MNISTDiffusion, noise, steps: int, path: Path) -> None:
    diffusion.eval()
    save_image_grid(teacher_sample(diffusion, noise, "ddim", steps), path)


def _save(out: Path, step: int, diffusion, ema, optimizer, scheduler, resolved: dict, source: str) -> None:
    ckpt = {"model": diffusion.state_dict(), "model_ema": ema.state_dict(), "kind": "teacher",
            "model_args": resolved["model_args"], "config": resolved, "step": step,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "data_source": source, "versions": software_versions()}
    atomic_save(ckpt, out / f"steps_{step:08d}.pt")
