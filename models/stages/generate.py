"""(noise, image) pairs from the teacher's deterministic sampler, in resumable shards.

Sample i's noise depends only on (seed, i); shards cover fixed sample ranges, are written atomically and
are only deleted after training_data.pt has been assembled and verified, so a killed run rerun with the same
command produces a byte-identical result to an unbroken run (on the same device).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Optional
from pathlib import Path

import torch

from ..diffusion.noise import per_sample_noise
from ..diffusion.sampling import DEFAULT_DDIM_STEPS, SAMPLERS, SamplerConfig, configure_precision
from ..io.checkpoints import load_checkpoint
from ..io.device import pick_device
from ..io.distributed import Ranks, naming_rank, start as start_ranks
from ..io.errors import PipelineError
from ..io.files import atomic_save, prepare_output_dir
from ..io.guards import holds_output_locks, require_finite_rows, verified
from ..io.paths import DEFAULT_TEACHER
from ..io.progress import progress_bar
from ..io.records import software_versions
from ..io.shards import ShardedJob
from ..io.teacher_checkpoints import load_teacher

DATA_FILE = "training_data.pt"
# The teacher's weights passed the finite check at load, so non-finite images come from the sampling itself.
NONFINITE_IMAGES_CAUSE = ("the teacher's weights are finite, so its sampling overflowed (likely: weights finite but "
                          "huge, --no_clip, --precision bf16, or very few --steps); no pairs file written, and a "
                          "rerun with the same settings cannot help: change them or the checkpoint")


@dataclass
class GenerateOptions:
    ckpt: str = DEFAULT_TEACHER
    n_samples: int = 1000
    batch_size: int = 100
    output_dir: str = "direct_decoder_data"
    sampler: str = "ddim"
    steps: int = DEFAULT_DDIM_STEPS
    spacing: Optional[str] = None  # None: the sampler's default (trailing for ddim, logsnr for dpmpp)
    eta: float = 0.0
    clip_x0: bool = True
    seed: int = 0
    shard_size: int = 0          # 0: 10 batches, as the original's "checkpoint every 10 batches"
    precision: str = "tf32"      # CUDA only: fp32 | tf32 | bf16
    compile: bool = False
    channels_last: bool = False
    cpu: bool = False


def _validate(opts: GenerateOptions) -> None:
    if opts.n_samples <= 0:
        raise PipelineError(f"--n_samples must be positive, got {opts.n_samples}")
    if opts.batch_size <= 0:
        raise PipelineError(f"--batch_size must be positive, got {opts.batch_size}")
    if opts.shard_size < 0:
        raise PipelineError(f"--shard_size must be >= 0, got {opts.shard_size}")
    if opts.sampler not in SAMPLERS:
        raise PipelineError(f"--sampler must be one of {SAMPLERS}, got {opts.sampler!r}")
    if not (0.0 <= opts.eta <= 1.0):
        raise PipelineError(f"--eta must be in [0, 1], got {opts.eta}")
    if opts.precision not in ("fp32", "tf32", "bf16"):
        raise PipelineError(f"--precision must be fp32, tf32 or bf16, got {opts.precision!r}")


def _sampler_config(opts: GenerateOptions, alphas_cumprod: torch.Tensor) -> SamplerConfig:
    """The options' sampler, checked against this teacher's schedule (ddpm runs every timestep; its grid and eta
    are fixed, so --steps, --spacing and --eta do not apply to it)."""
    try:
        if opts.sampler == "ddpm":
            sampler = SamplerConfig("ddpm", len(alphas_cumprod), clip_x0=opts.clip_x0)
        else:
            sampler = SamplerConfig(opts.sampler, opts.steps, opts.spacing, opts.eta, opts.clip_x0)
        sampler.timesteps(alphas_cumprod)
    except ValueError as err:
        raise PipelineError(f"--sampler {opts.sampler} --steps {opts.steps}: {err} for this teacher") from None
    return sampler


@holds_output_locks
def generate_training_data(opts: GenerateOptions, dry_run: bool = False, *, locks) -> dict:
    """Under torchrun each rank samples its share of the shards, and rank 0 assembles them: the same file, bit for
    bit, as one process (shards and their batches cover the same sample ranges whatever the number of ranks)."""
    ranks, device = start_ranks(pick_device(opts.cpu))
    with naming_rank(ranks):
        return _generate(opts, dry_run, locks, ranks, device)


def _generate(opts: GenerateOptions, dry_run: bool, locks, ranks: Ranks, device: torch.device) -> dict:
    say = print if ranks.is_main else _silent
    start = time.perf_counter()

    def load():
        _validate(opts)
        configure_precision(device, opts.precision)
        teacher = load_teacher(opts.ckpt, device)
        return teacher, time.perf_counter() - start, _sampler_config(opts, teacher.diffusion.alphas_cumprod)

    teacher, load_s, sampler = ranks.agree(load)
    steps = sampler.steps
    out = Path(opts.output_dir)
    # What determines the pairs; batch size, shard size and the number of ranks do not.
    identity = {"teacher_sha256": teacher.sha256, "teacher_weights": teacher.weights, "sampler": sampler.name,
                "steps": steps, "spacing": sampler.spacing, "eta": sampler.eta, "clip_x0": sampler.clip_x0,
                "seed": opts.seed, "n_samples": opts.n_samples, "device": device.type,
                "precision": opts.precision if device.type == "cuda" else "fp32"}
    ranks.agree(lambda: ranks.require_same(identity, "teacher or sampler"))
    resolved = {"options": asdict(opts), "identity": identity, "device": str(device),
                "teacher_config": teacher.config.to_dict(), "teacher_load_s": round(load_s, 3)}
    if ranks.active:
        resolved["world_size"] = ranks.world
    if dry_run:
        say(json.dumps(resolved, indent=2))
        return resolved
    final = out / DATA_FILE
    shard_size = opts.shard_size or 10 * opts.batch_size
    main_job: list[ShardedJob] = []

    def claim() -> dict:
        """Rank 0: the lock on the output, the finished-file check and the shards still to make."""
        nonlocal out, final
        out = prepare_output_dir(out)
        locks.hold(out)
        final = out / DATA_FILE
        if final.exists():
            previous = load_checkpoint(final, "cpu", what="existing training data").get("metadata", {})
            if previous.get("identity") == identity:
                print(f"generate_training_data: {final} already holds these {opts.n_samples} pairs; nothing to do")
                return {"done": {"path": str(final), "n_samples": opts.n_samples, "wall_s": 0.0,
                                 "pairs_per_s": 0.0, "size_mib": final.stat().st_size / 2 ** 20}}
            raise PipelineError(f"{final} exists with other settings ({previous.get('identity')}); "
                                "choose another --output_dir or delete it")
        main_job.append(ShardedJob(out / "shards", identity, opts.n_samples, shard_size))
        return {"pending": main_job[0].pending(), "n_done": main_job[0].n_done, "out": str(out)}

    plan = ranks.main_only(claim)
    if "done" in plan:
        return plan["done"]
    out, final = Path(plan["out"]), Path(plan["out"]) / DATA_FILE
    job = ranks.agree(lambda: main_job[0] if ranks.is_main else
                      ShardedJob(out / "shards", identity, opts.n_samples, shard_size, writer=ranks.rank, attach=True))

    net = teacher.diffusion
    if opts.channels_last:
        net = net.to(memory_format=torch.channels_last)
    eps_fn = torch.compile(net.predict_noise) if opts.compile else net.predict_noise
    todo = plan["pending"][ranks.rank::ranks.world]  # whole shards, round-robin: the batches one process would run
    n_todo = opts.n_samples - plan["n_done"]
    say(f"teacher {teacher.path} ({teacher.weights} weights, sha256 {teacher.sha256[:12]}) loaded to {device} "
        f"in {load_s:.2f}s; {opts.sampler} {steps} steps; {opts.n_samples - n_todo} pairs already done"
        + (f"; {ranks.world} ranks share the rest by whole shards" if ranks.active else ""))
    gen_start = time.perf_counter()
    if ranks.active:  # rank 0 shows its own share; every rank makes about as many
        bar = progress_bar(total=sum(hi - lo for lo, hi in todo), desc=f"pairs (rank 0 of {ranks.world})",
                           unit="pair", dynamic_ncols=True, disable=not ranks.is_main)
    else:
        bar = progress_bar(total=opts.n_samples, initial=opts.n_samples - n_todo, desc="pairs", unit="pair",
                           dynamic_ncols=True)
    for lo, hi in todo:
        noise_parts, image_parts = [], []
        for b in range(lo, hi, opts.batch_size):
            idx = list(range(b, min(b + opts.batch_size, hi)))
            noise = per_sample_noise(opts.seed, idx, device=device)
            x_T = noise.contiguous(memory_format=torch.channels_last) if opts.channels_last else noise
            images = sampler.sample(net, x_T, opts.seed, idx, precision=opts.precision, eps_fn=eps_fn)
            require_finite_rows(images, idx, "the teacher's images", NONFINITE_IMAGES_CAUSE)
            noise_parts.append(noise.cpu())
            image_parts.append(images.contiguous().cpu())
            bar.update(len(idx))
        job.save((lo, hi), {"noise": torch.cat(noise_parts), "images": torch.cat(image_parts)})
    bar.close()
    ranks.barrier()  # every rank's shards are written
    gen_s = time.perf_counter() - gen_start

    def assemble() -> dict:
        if ranks.active:
            job.refresh()  # the other ranks' checksums; a shard changed since is dropped here and named below
            missing = job.pending()
            if missing:
                raise PipelineError(f"{len(missing)} shard(s) missing or damaged after every rank finished (first: "
                                    f"samples {missing[0][0]}-{missing[0][1]}); rerun the same command to "
                                    "regenerate them")
        metadata = {"teacher_path": str(teacher.path), "teacher_sha256": teacher.sha256,
                    "teacher_weights": teacher.weights, "teacher_config": teacher.config.to_dict(),
                    "teacher_data_source": teacher.checkpoint.get("data_source", "unknown (upstream checkpoint)"),
                    "sampler": opts.sampler, "steps": steps, "eta": identity["eta"], "clip_x0": opts.clip_x0,
                    "spacing": identity["spacing"], "sampler_config": sampler.to_dict(),
                    "seed": opts.seed, "noise": "per-sample: models.diffusion.noise.per_sample_noise(seed, index)",
                    "image_range": [-1.0, 1.0], "device": str(device), "precision": identity["precision"],
                    "versions": software_versions(), "generation_wall_s": round(gen_s, 3),
                    "pairs_generated_this_run": n_todo, "identity": identity}
        if ranks.active:
            metadata["world_size"] = ranks.world
        data = job.assemble(["noise", "images"]) | {"n_samples": opts.n_samples, "metadata": metadata,
                                                      "kind": "training_pairs"}
        atomic_save(data, final, before_rename=verified(data, ["noise", "images"], kept=f"shards kept in {job.dir}"))
        job.cleanup()
        wall = time.perf_counter() - start
        rate = n_todo / gen_s if gen_s > 0 else float("nan")
        size_mb = final.stat().st_size / 2 ** 20
        print(f"generate_training_data: {opts.n_samples} pairs -> {final} ({size_mb:.1f} MiB) in {wall:.1f}s, "
              f"{rate:.1f} pairs/s ({opts.sampler}, {steps} steps"
              + (f", {ranks.world} ranks)" if ranks.active else ")"))
        return {"path": str(final), "n_samples": opts.n_samples, "wall_s": wall, "pairs_per_s": rate,
                "size_mib": size_mb}

    return ranks.main_only(assemble)


def _silent(*args, **kwargs) -> None:
    """print on ranks other than 0."""
