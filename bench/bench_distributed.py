"""torchrun scaling on this machine: 1 against 2 processes of one torch thread each, for pair generation and for
student training (the scripts as users run them: `python X.py` against `torchrun --standalone --nproc_per_node 2
X.py`, same flags), with throughput, the 2-to-1 ratio and the peak resident memory of the largest process; the two
pairs files are checked bitwise equal. Then a projection, on paper, of 60,000 and 1,000,000 pairs on 8 GPUs from
the measured per-process rate and the teacher UNet's cost (FLOPs per evaluation, counted).

    python bench/bench_distributed.py --n 128 --batch_size 16 --steps 10
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.io.checkpoints import load_checkpoint
from models.io.cli import ArgumentParser
from models.io.errors import PipelineError, run_cli
from models.io.paths import DEFAULT_TEACHER
from models.io.records import append_run_record
from models.io.teacher_checkpoints import load_teacher

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
         "sys.stderr.write(p.stderr[-3000:] if p.returncode else ''); "
         "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run(script: str, args: list, nproc: int) -> float:
    """Runs ``script`` in one process or under torchrun with ``nproc``, one thread each; returns the peak RSS (MiB) of
    its largest process (ru_maxrss of the children: the launcher and every worker it waited for)."""
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE, *launch, str(REPO / script), *map(str, args)], cwd=REPO,
                         env=env, capture_output=True, text=True)
    code, rss_kib = out.stdout.split()[-2:]
    if int(code) != 0:
        raise PipelineError(f"{script} with {nproc} process(es) failed: {out.stderr.strip().splitlines()[-1:]}")
    return int(rss_kib) / 1024


def unet_flops(teacher) -> int:
    """FLOPs of one teacher UNet evaluation on one 28x28 image (multiply-add = 2)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        teacher.diffusion.predict_noise(torch.zeros(1, 1, 28, 28), torch.tensor([500]))
    return counter.get_total_flops()


def pairs(a, tmp: Path, nproc: int) -> dict:
    out = tmp / f"pairs_{nproc}"
    rss = run("generate_training_data.py", ["--ckpt", a.ckpt, "--n_samples", a.n, "--batch_size", a.batch_size,
                                            "--shard_size", a.batch_size, "--steps", a.steps, "--cpu",
                                            "--output_dir", out], nproc)
    data = load_checkpoint(out / "training_data.pt", "cpu", what="pairs")
    wall = data["metadata"]["generation_wall_s"]
    return {"pairs_per_s": a.n / wall, "generation_wall_s": wall, "peak_rss_mib": rss, "data": data,
            "path": out / "training_data.pt"}


def training(a, data_path: Path, tmp: Path, nproc: int) -> dict:
    out = tmp / f"student_{nproc}"
    rss = run("train_direct_decoder.py", ["--ddpm_ckpt", a.ckpt, "--data_path", data_path, "--epochs", 2,
                                          "--batch_size", a.train_batch, "--bn_samples", a.train_batch,
                                          "--n_preview", 2, "--no_evaluate", "--cpu", "--output_dir", out], nproc)
    steps = json.loads((out / "training_options.json").read_text())["steps_per_epoch"]
    last = json.loads((out / "stats.jsonl").read_text().splitlines()[-1])  # epoch 2: warm
    return {"steps_per_s": steps / last["seconds"], "epoch_s": last["seconds"], "steps_per_epoch": steps,
            "peak_rss_mib": rss, "train_loss": last["train_loss"]}


def projection(rate_per_process: float, bench_steps: int, efficiency: float, flops: int, gpu_tflops: list) -> list:
    """Minutes for 60,000 and 1,000,000 pairs at DDIM K = 50 on 8 processes: 8 such CPU processes (measured rate,
    cost proportional to K), and 8 GPUs each sustaining an assumed TFLOP/s on this UNet; both scaled by the measured
    2-process efficiency (capped at 1: pairs need no communication)."""
    rows, k, e = [], 50, min(efficiency, 1.0)
    cpu_rate = 8 * e * rate_per_process * bench_steps / k
    rows.append({"what": "8 CPU processes, 1 thread each (this CPU's measured rate)", "pairs_per_s": cpu_rate})
    for tflops in gpu_tflops:
        rows.append({"what": f"8 GPUs at {tflops:g} TFLOP/s sustained each (assumed)",
                     "pairs_per_s": 8 * e * tflops * 1e12 / (k * flops)})
    for row in rows:
        row["minutes_60k"] = 60_000 / row["pairs_per_s"] / 60
        row["minutes_1m"] = 1_000_000 / row["pairs_per_s"] / 60
    return rows


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default=DEFAULT_TEACHER, help="teacher checkpoint")
    p.add_argument("--n", type=int, default=128, help="pairs per generation run")
    p.add_argument("--batch_size", type=int, default=16, help="generation batch (and shard: every rank gets whole ones)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the timed generation (the projection uses 50)")
    p.add_argument("--train_batch", type=int, default=32, help="global training batch")
    p.add_argument("--gpu_tflops", type=float, nargs="+", default=[1.0, 5.0],
                   help="assumed sustained TFLOP/s of one GPU on this UNet, for the projection on paper")
    p.add_argument("--out", default="bench/results/distributed.jsonl", help="appends one JSON line")
    a = p.parse_args()
    teacher = load_teacher(a.ckpt, torch.device("cpu"))
    flops = unet_flops(teacher)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = {n: pairs(a, tmp, n) for n in (1, 2)}
        bitwise = all(torch.equal(gen[1]["data"][k], gen[2]["data"][k]) for k in ("noise", "images"))
        train = {n: training(a, gen[1]["path"], tmp, n) for n in (1, 2)}
    gen_ratio = gen[2]["pairs_per_s"] / gen[1]["pairs_per_s"]
    record = {
        "teacher": a.ckpt, "teacher_sha256": teacher.sha256, "n": a.n, "batch_size": a.batch_size,
        "ddim_steps": a.steps, "train_batch": a.train_batch, "unet_gflops_per_eval": flops / 1e9,
        "pairs": {n: {k: v for k, v in r.items() if k not in ("data", "path")} for n, r in gen.items()},
        "pairs_ratio_2_over_1": gen_ratio, "pairs_bitwise_equal": bitwise,
        "training": train, "training_ratio_2_over_1": train[2]["steps_per_s"] / train[1]["steps_per_s"],
        "cpu_gflops_per_process": gen[1]["pairs_per_s"] * a.steps * flops / 1e9,
        "on_paper": projection(gen[1]["pairs_per_s"], a.steps, gen_ratio / 2, flops, a.gpu_tflops),
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(append_run_record(record, a.out), indent=2))


if __name__ == "__main__":
    run_cli(main, resumable=False)
