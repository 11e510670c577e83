"""Pair-generation speed and memory: this project's generate_training_data versus a faithful re-implementation of
the original loop (1000-step ancestral sampling, torch.cat of the whole trajectory every step, the growing file
re-saved every 10 batches), on the same machine, teacher and batch size; plus the UNet-evaluation ceiling and
the peak memory of 200 versus 2,000 pairs. With --channels_last_too, the same run again in channels-last memory
format, timed between two default runs (A/B/A: a shared machine drifts), with the largest image difference.

    python bench/bench_generate.py --ckpt checkpoints/teacher_mnist5k.pt --n 200 --batch_size 100
    python bench/bench_generate.py --ckpt checkpoints/teacher_mnist5k.pt --n 500 --batch_size 250 --skip_original \
        --memory_sizes --channels_last_too --cpu
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.diffusion.samplers import ddpm_reverse_step
from models.diffusion.sampling import DEFAULT_DDIM_STEPS
from models.io.checkpoints import load_checkpoint
from models.io.cli import ArgumentParser, add_cpu_flag
from models.io.device import pick_device
from models.io.errors import run_cli
from models.io.records import append_run_record
from models.io.teacher_checkpoints import load_teacher
from models.stages.generate import GenerateOptions, generate_training_data

REPO = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def original_loop(diffusion, n: int, batch_size: int, device, save_path: Path) -> float:
    """What the original script did: every step appended to the trajectory with torch.cat, all kept."""
    start = time.perf_counter()
    all_noise, all_traj = [], []
    for b in range(0, n, batch_size):
        x = torch.randn(min(batch_size, n - b), 1, 28, 28, device=device)
        all_noise.append(x.cpu())
        trajectory = x.unsqueeze(1)
        for i in range(diffusion.timesteps - 1, -1, -1):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            x = ddpm_reverse_step(diffusion.predict_noise, x, t, torch.randn_like(x), diffusion.betas,
                                  diffusion.alphas, diffusion.alphas_cumprod, clip_x0=True)
            trajectory = torch.cat([trajectory, x.unsqueeze(1)], dim=1)
        all_traj.append(trajectory.cpu())
        if (b // batch_size + 1) % 10 == 0 or b + batch_size >= n:
            torch.save({"noise": torch.cat(all_noise), "images": torch.cat([t[:, -1] for t in all_traj])}, save_path)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


@torch.inference_mode()
def unet_ceiling(diffusion, batch_size: int, device, repeats: int = 10) -> float:
    x = torch.randn(batch_size, 1, 28, 28, device=device)
    t = torch.full((batch_size,), 500, device=device, dtype=torch.long)
    diffusion.predict_noise(x, t)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter()
        diffusion.predict_noise(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - s)
    # The median, not the minimum: a sustained run meets typical forward times, not the luckiest one.
    return batch_size / sorted(times)[len(times) // 2]


def peak_rss_mib(args: list[str]) -> float:
    """Peak resident memory of one generate_training_data.py run, in a fresh process."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, str(REPO / "generate_training_data.py"), *args],
                         check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) / 1024


def generate(a, tmp: str, name: str, channels_last: bool = False) -> dict:
    """One generate_training_data run with the bench's options, written under ``tmp/name``."""
    return generate_training_data(GenerateOptions(ckpt=a.ckpt, n_samples=a.n, batch_size=a.batch_size,
                                                  output_dir=f"{tmp}/{name}", steps=a.steps, cpu=a.cpu,
                                                  channels_last=channels_last))


def channels_last_comparison(a, first: dict, tmp: str) -> dict:
    """pairs/s in channels-last format against the mean of the default run before it and one after it."""
    cl, second = generate(a, tmp, "channels_last", True), generate(a, tmp, "default_again")
    images = [load_checkpoint(r["path"], what="pairs file")["images"] for r in (first, cl)]
    default_rate = (first["pairs_per_s"] + second["pairs_per_s"]) / 2
    return {"default_pairs_per_s": [first["pairs_per_s"], second["pairs_per_s"]],
            "channels_last_pairs_per_s": cl["pairs_per_s"], "speedup": cl["pairs_per_s"] / default_rate,
            "max_abs_image_difference": (images[0] - images[1]).abs().max().item()}


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="teacher checkpoint")
    p.add_argument("--n", type=int, default=200, help="pairs for the speed comparison")
    p.add_argument("--n_original", type=int, default=0, help="pairs for the original loop (0: same as --n)")
    p.add_argument("--batch_size", type=int, default=100, help="same batch size for both")
    p.add_argument("--steps", type=int, default=DEFAULT_DDIM_STEPS, help="DDIM steps for this project's run")
    p.add_argument("--skip_original", action="store_true", help="do not time the original loop")
    p.add_argument("--memory_sizes", type=int, nargs="*", default=[200, 2000], help="pair counts for peak memory")
    p.add_argument("--channels_last_too", action="store_true",
                   help="also time --channels_last (A/B/A against the default memory format)")
    p.add_argument("--out", default="bench/results/generate.jsonl", help="appends one JSON line")
    add_cpu_flag(p)
    a = p.parse_args()
    device = pick_device(a.cpu)
    teacher = load_teacher(a.ckpt, device)
    # The ceiling is measured before and after our run and the higher value kept: on a shared machine a single
    # measurement can land in a slow moment and flatter the fraction of it that we reach.
    ceilings = [unet_ceiling(teacher.diffusion, a.batch_size, device)]
    with tempfile.TemporaryDirectory() as tmp:
        ours = generate(a, tmp, "ours")
        ceilings.append(unet_ceiling(teacher.diffusion, a.batch_size, device))
        layout = channels_last_comparison(a, ours, tmp) if a.channels_last_too else None
        original = None if a.skip_original else original_loop(teacher.diffusion, a.n_original or a.n, a.batch_size,
                                                               device, Path(tmp) / "orig.pt")
        memory = {}
        for n in a.memory_sizes:
            args = ["--ckpt", a.ckpt, "--n_samples", str(n), "--batch_size", str(a.batch_size), "--steps", "1",
                    "--output_dir", f"{tmp}/mem{n}"] + (["--cpu"] if a.cpu else [])
            memory[n] = peak_rss_mib(args)
    ceiling = max(ceilings)
    record = {"teacher": a.ckpt, "teacher_sha256": teacher.sha256,
              "batch_size": a.batch_size, "ddim_steps": a.steps, "n": a.n, "n_original": a.n_original or a.n,
              "pairs_per_s": ours["pairs_per_s"], "original_pairs_per_s": original,
              "speedup_vs_original": ours["pairs_per_s"] / original if original else None,
              "unet_evals_per_s": ceiling, "unet_evals_per_s_before_after": ceilings,
              "ceiling_pairs_per_s": ceiling / a.steps, "fraction_of_ceiling": ours["pairs_per_s"] * a.steps / ceiling,
              "peak_rss_mib": memory, "channels_last": layout}
    if len(memory) == 2:
        small, large = sorted(memory)
        record["peak_rss_ratio_large_over_small"] = memory[large] / memory[small]
    print(json.dumps(append_run_record(record, a.out), indent=2))


if __name__ == "__main__":
    run_cli(main, resumable=False)
