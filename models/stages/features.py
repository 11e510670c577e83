"""Reference features: for each training image, the bottleneck the student computes when it generates that image.

The original encoded training images by running the frozen encoder on the *image*, while generations' features
came from running it on *noise*: two different distributions. Here both sides live in the student's bottleneck
as it generates. Two ways to get there, each measured on the student's own generations (consistency (a)):

- ``image_encoder`` (default for zero-skip students): an encoder trained to return, for every image the student
  generates from z, the student's bottleneck at z (models/nets/image_encoder.py, trained in
  models/training/image_encoder.py); one pass per image.
- ``ddim_inversion``: the image's latent by DDIM inversion with the teacher, ending at the timestep where the
  student's noise lives, and the student's bottleneck read there.

Only the bottleneck is stored; ``metadata["hook_layers"]`` names the layers the file serves hooks at, the finer ones
derived from it at first use (models/steering/layer_features.py), and ``check_feature_layer`` refuses the others.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..data.datasets import SOURCES, load_dataset
from ..data.pairs import load_training_pairs
from ..diffusion.noise import per_sample_noise
from ..diffusion.samplers import ddim_invert, inversion_timesteps
from ..diffusion.sampling import SamplerConfig
from ..diffusion.schedule import schedule_buffers
from ..io.checkpoints import load_checkpoint
from ..io.device import pick_device
from ..io.errors import PipelineError
from ..io.files import atomic_save, check_output_file, prepare_output_dir, sha256_file
from ..io.guards import holds_output_locks, require_finite, require_finite_rows, verified
from ..io.paths import DEFAULT_TEACHER
from ..io.progress import progress_bar
from ..io.records import software_versions
from ..io.shards import ShardedJob
from ..nets.student import load_teacher_and_student
from ..steering.layer_features import require_layer, served_layers
from ..steering.shape_match import SHAPE, cosine_calibration, shape_record
from ..training.image_encoder import EncoderTrainOptions, encoder_record, train_image_encoder

DEFAULT_INVERSION_STEPS = 10
METHODS = ("auto", "image_encoder", "ddim_inversion")
ATTRIBUTION_RULES = (SHAPE, "bottleneck")  # the default rule the features file is extracted for
FEATURES_FIX = "create them with `python extract_reference_features.py --ddpm_ckpt T --decoder_ckpt S`"
# The student's weights passed the finite check at load, so non-finite features come from these images' pass.
NONFINITE_FEATURES_CAUSE = ("the student's weights are finite, so the extraction overflowed on these images (likely: "
                            "--fp16, or a student whose weights are finite but huge); nothing written, and a rerun "
                            "with the same settings cannot help")


@dataclass
class FeatureOptions:
    ddpm_ckpt: str = DEFAULT_TEACHER
    decoder_ckpt: str = "direct_decoder_results/best_model.pt"
    batch_size: int = 256
    output_path: str = "reference_features.pt"
    dataset: Optional[str] = None   # None: the teacher's own data source (mnist for upstream checkpoints)
    split: str = "train"
    limit: int = 0                  # 0: every image
    method: str = "auto"            # image_encoder for zero-skip students, else ddim_inversion
    inversion_steps: int = DEFAULT_INVERSION_STEPS
    encoder_steps: int = EncoderTrainOptions.steps
    encoder_batch_size: int = EncoderTrainOptions.batch_size
    encoder_lr: float = EncoderTrainOptions.lr
    encoder_teacher_pairs_fraction: float = EncoderTrainOptions.teacher_pairs_fraction
    encoder_pool_size: int = EncoderTrainOptions.pool_size
    encoder_frozen_blocks: int = EncoderTrainOptions.frozen_blocks
    seed: int = 0
    fp16: bool = False
    store_latents: bool = True
    attribution_rule: str = SHAPE   # shape: also store the shape rule (the reference images, its calibration)
    consistency_samples: int = 256
    shard_size: int = 0             # 0: 10 batches
    download: bool = False
    cpu: bool = False


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # clamped: rounding can put the cosine of (nearly) parallel vectors a hair above 1
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1).clamp(-1.0, 1.0)


def _validate(opts: FeatureOptions) -> None:
    if opts.batch_size <= 0:
        raise PipelineError(f"--batch_size must be positive, got {opts.batch_size}")
    if opts.inversion_steps <= 0:
        raise PipelineError(f"--inversion_steps must be positive, got {opts.inversion_steps}")
    if opts.limit < 0 or opts.consistency_samples < 0:
        raise PipelineError("--limit and --consistency_samples must be >= 0")
    if opts.method not in METHODS:
        raise PipelineError(f"--method must be one of {METHODS}, got {opts.method!r}")
    if opts.attribution_rule not in ATTRIBUTION_RULES:
        raise PipelineError(f"--attribution_rule must be one of {ATTRIBUTION_RULES}, got {opts.attribution_rule!r}")
    EncoderTrainOptions(opts.encoder_steps, opts.encoder_batch_size, opts.encoder_lr,
                        teacher_pairs_fraction=opts.encoder_teacher_pairs_fraction,
                        pool_size=opts.encoder_pool_size, frozen_blocks=opts.encoder_frozen_blocks).validate()
    if opts.dataset is not None and opts.dataset not in SOURCES:
        raise PipelineError(f"--dataset must be one of {SOURCES}, got {opts.dataset!r}")
    check_output_file(opts.output_path, "--output_path")


def latent_timestep(student_checkpoint: dict, timesteps: int) -> int:
    """Where the student's input noise lives: the first timestep of the teacher grid its training pairs came from.

    DDIM with leading K = 25 starts at t = 960, so its noise is x_960 (DPM-Solver++ at t = 995, where its lambda
    clipping starts); an inversion that stopped at another timestep would hand the student latents with the wrong
    share of image signal.
    """
    return SamplerConfig.from_student(student_checkpoint).timesteps(schedule_buffers(timesteps)["alphas_cumprod"])[0]


class DdimInversionExtractor:
    """Latent by DDIM inversion with the teacher (up to where the student's noise lives), feature read there."""

    def __init__(self, teacher, decoder, grid: list[int]):
        self.eps_fn, self.acp, self.decoder, self.grid = teacher.diffusion.predict_noise, \
            teacher.diffusion.alphas_cumprod, decoder, grid

    def describe(self) -> str:
        return f"DDIM inversion in {len(self.grid)} steps up to t = {self.grid[-1]}, where the student's noise lives"

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor):
        z = ddim_invert(self.eps_fn, x, self.acp, len(self.grid), timesteps=self.grid)
        recon, h, _ = self.decoder.generate(z)
        return h, recon, z


class ImageEncoderExtractor:
    """The learned image encoder (models/nets/image_encoder.py): the student's bottleneck for an image in one pass."""

    def __init__(self, encoder, decoder, teacher_pairs_fraction: float = 0.0):
        self.encoder, self.decoder, self.teacher_pairs_fraction = encoder, decoder, teacher_pairs_fraction

    def describe(self) -> str:
        mix = (f", {self.teacher_pairs_fraction:.0%} of each batch the teacher's images of the training pairs"
               if self.teacher_pairs_fraction else "")
        return f"the image encoder trained to return the student's bottleneck (the student's own images{mix})"

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor):
        h = self.encoder(x)
        return h, self.decoder.decode(h), None


def resolve_method(method: str, skips: str) -> str:
    if method == "auto":
        return "image_encoder" if skips == "zero" else "ddim_inversion"
    if method == "image_encoder" and skips != "zero":
        raise PipelineError("--method image_encoder needs a student trained with --skips zero (its images must "
                            "depend on the bottleneck alone); use --method ddim_inversion for this student")
    return method


@holds_output_locks
def extract_reference_features(opts: FeatureOptions, dry_run: bool = False, *, locks) -> dict:
    _validate(opts)
    device = pick_device(opts.cpu)
    start = time.perf_counter()
    teacher, student = load_teacher_and_student(opts.ddpm_ckpt, opts.decoder_ckpt, device)
    load_s = time.perf_counter() - start
    decoder = student.decoder
    method = resolve_method(opts.method, decoder.skips)
    source = opts.dataset or teacher.checkpoint.get("data_source") or "mnist"
    grid = inversion_timesteps(latent_timestep(student.checkpoint, teacher.config.timesteps), opts.inversion_steps)
    pairs_record = student_training_pairs(student.checkpoint) \
        if method == "image_encoder" and opts.encoder_teacher_pairs_fraction > 0 else None
    encoder_opts = EncoderTrainOptions(opts.encoder_steps, opts.encoder_batch_size, opts.encoder_lr, opts.seed,
                                       teacher_pairs_fraction=opts.encoder_teacher_pairs_fraction if pairs_record else 0.0,
                                       pool_size=opts.encoder_pool_size, frozen_blocks=opts.encoder_frozen_blocks)
    out_path = Path(opts.output_path)
    data = load_dataset(source, opts.split, download=opts.download)
    n = min(len(data), opts.limit) if opts.limit else len(data)
    method_identity = {"inversion_steps": opts.inversion_steps, "inversion_timesteps": grid} \
        if method == "ddim_inversion" else {"image_encoder": asdict(encoder_opts), "encoder_teacher_pairs": pairs_record}
    identity = {"teacher_sha256": teacher.sha256, "student_sha256": student.sha256, "dataset": source,
                "split": opts.split, "n": n, "method": method, **method_identity, "fp16": opts.fp16,
                "store_latents": opts.store_latents and method == "ddim_inversion", "device": device.type}
    resolved = {"options": asdict(opts), "identity": identity, "device": str(device), "load_s": round(load_s, 3),
                "bottleneck_shape": list(decoder.bottleneck_shape)}
    if dry_run:
        print(json.dumps(resolved, indent=2))
        return resolved
    prepare_output_dir(out_path.parent)
    locks.hold(out_path)
    print(f"teacher + student loaded to {device} in {load_s:.2f}s; {n} {source}/{opts.split} images")
    job = ShardedJob(out_path.with_name(out_path.name + ".shards"), identity, n,
                     opts.shard_size or 10 * opts.batch_size)
    encoder_s, encoder_losses = 0.0, []
    if method == "image_encoder":
        encoder_start = time.perf_counter()
        pairs = load_training_pairs(pairs_record["path"]) if pairs_record else None
        encoder, encoder_losses = train_image_encoder(decoder, teacher.diffusion.model, teacher.config,
                                                      encoder_opts, job.dir, device, pairs)
        print(f"image encoder: training MSE to the student's bottleneck {encoder_losses[0]:.4f} -> "
              f"{encoder_losses[-1]:.4f} over {len(encoder_losses)} steps")
        encoder_s = time.perf_counter() - encoder_start
        extractor = ImageEncoderExtractor(encoder, decoder, encoder_opts.teacher_pairs_fraction)
    else:
        extractor = DdimInversionExtractor(teacher, decoder, grid)
    print(f"features: {extractor.describe()}")
    work_start = time.perf_counter()
    bar = progress_bar(total=n, initial=job.n_done, desc="features", unit="img", dynamic_ncols=True)
    for lo, hi in job.pending():
        parts: dict[str, list] = {"features": [], "latents": [], "psnr": []}
        for b in range(lo, hi, opts.batch_size):
            x = data.images[b:min(b + opts.batch_size, hi)].to(device)
            h, recon, z = extractor(x)
            parts["features"].append((h.half() if opts.fp16 else h.float()).cpu())
            require_finite_rows(parts["features"][-1], range(b, b + x.shape[0]), "the bottleneck features",
                                NONFINITE_FEATURES_CAUSE)
            if z is not None:
                parts["latents"].append(z.float().cpu())
            parts["psnr"].append(psnr(recon.float().clamp(-1, 1), x).cpu())
            bar.update(x.shape[0])
        job.save((lo, hi), {k: torch.cat(v) for k, v in parts.items() if v})
    bar.close()
    work_s = time.perf_counter() - work_start
    keys = ["features", "psnr"] + (["latents"] if identity["store_latents"] else [])
    assembled = job.assemble(keys)
    consistency = measure_consistency(decoder, extractor, opts.consistency_samples, opts.batch_size, device)
    recon_psnr = assembled.pop("psnr")
    attribution_start = time.perf_counter()
    attribution = attribution_record(opts.attribution_rule, data.images[:n], assembled["features"])
    attribution_s = time.perf_counter() - attribution_start
    layers = served_layers({}, decoder)  # finer layers are derived from the bottleneck at first use, not stored
    metadata = {"dataset": source, "split": opts.split, "n": n, "method": method,
                "method_description": extractor.describe(), **method_identity,
                "latent_timestep": grid[-1], "teacher_path": teacher.path, "teacher_sha256": teacher.sha256,
                "student_path": student.path, "student_sha256": student.sha256,
                "bottleneck_shape": list(decoder.bottleneck_shape), "dtype": "float16" if opts.fp16 else "float32",
                "hook_layers": list(layers), "layer_shapes": {name: list(decoder.layer_shape(name)) for name in layers},
                "consistency": consistency | {"reconstruction_psnr_db_mean": recon_psnr.mean().item(),
                                              "reconstruction_psnr_db_median": recon_psnr.median().item()},
                "attribution_rule": attribution["rule"], "attribution_rule_wall_s": round(attribution_s, 2),
                "encoder_training_wall_s": round(encoder_s, 2),
                "encoder_training_loss_first_last": encoder_losses[:1] + encoder_losses[-1:], "extraction_wall_s": round(work_s, 2),
                "identity": identity, "versions": software_versions()}
    result = {"kind": "reference_features", "features": assembled["features"], "labels": data.labels[:n].clone(),
              "indices": data.indices[:n].clone(), "reconstruction_psnr_db": recon_psnr, "metadata": metadata,
              "attribution": attribution}
    if "latents" in assembled:
        result["latents"] = assembled["latents"]
    if method == "image_encoder":
        result["image_encoder"] = encoder_record(extractor.encoder, encoder_opts)
    atomic_save(result, out_path, before_rename=verified(result, ["features", "labels", "indices"] + (
        ["latents"] if "latents" in result else []), kept=f"shards kept in {job.dir}"))
    job.cleanup()
    wall = time.perf_counter() - start
    print(f"extract_reference_features: {n} features {tuple(result['features'].shape[1:])} by {method} -> "
          f"{out_path} ({out_path.stat().st_size / 2**20:.1f} MiB) in {wall:.1f}s ({n / max(work_s, 1e-9):.0f} img/s"
          f"{f', encoder training {encoder_s:.0f}s' if encoder_s else ''}); consistency cosine "
          f"{consistency['generated_bottleneck_cosine_mean']:.3f}, reconstruction PSNR {recon_psnr.mean().item():.1f} dB")
    return {"path": str(out_path), "n": n, "wall_s": wall, "extraction_s": work_s, "metadata": metadata}


def attribution_record(rule: str, images: torch.Tensor, features: torch.Tensor) -> dict:
    """The default attribution rule stored with the features, and the calibration of its scores' percentiles.
    Images and features only: no label reaches a rule (tests/test_attribution_rule.py)."""
    calibration = {"bottleneck": cosine_calibration(features)}
    if rule == SHAPE:
        record = shape_record(images)
        return record | {"calibration": calibration | {SHAPE: record.pop("calibration")}}
    return {"rule": "bottleneck", "calibration": calibration}


def student_training_pairs(student_checkpoint: dict) -> dict | None:
    """The pairs the student was trained on (path, sha256), if that file is still there unchanged; else None, with
    a line saying the image encoder trains on the student's own images only."""
    record = student_checkpoint.get("training_data") or {}
    path = record.get("path")
    if path and Path(path).is_file() and sha256_file(path) == record.get("sha256"):
        return {"path": str(path), "sha256": record["sha256"]}
    print(f"image encoder: the student's training pairs ({path or 'not recorded'}) are missing or changed; training "
          "on the student's own images only (real digits may then map outside the student's bottleneck range)")
    return None


@torch.inference_mode()
def measure_consistency(decoder, extractor, n: int, batch_size: int, device) -> dict:
    """(a) For images the student generates from z, does extraction recover the student's bottleneck at z?
    Drawn from a latent stream (seed 2024) that neither the pairs nor the encoder's training used."""
    if n == 0:
        return {"generated_bottleneck_cosine_mean": math.nan, "n_generated": 0}
    cos, latent_cos = [], []
    for b in range(0, n, batch_size):
        z = per_sample_noise(2024, range(b, min(b + batch_size, n)), device=device)
        images, h, _ = decoder.generate(z)
        h_back, _, z_back = extractor(images.float().clamp(-1, 1))
        cos.append(flat_cosine(h, h_back).cpu())
        if z_back is not None:
            latent_cos.append(flat_cosine(z, z_back).cpu())
    cos = torch.cat(cos)
    report = {"generated_bottleneck_cosine_mean": cos.mean().item(),
              "generated_bottleneck_cosine_min": cos.min().item(), "n_generated": n}
    if latent_cos:
        report["generated_latent_cosine_mean"] = torch.cat(latent_cos).mean().item()
    return report


def load_reference_features(path: str | Path, device="cpu") -> dict:
    ref = load_checkpoint(path, device, what="reference features", fix=FEATURES_FIX)
    if ref.get("kind") != "reference_features":
        raise PipelineError(f"{path} is not a reference_features.pt written by extract_reference_features.py")
    require_finite(ref.get("features"), f"reference features {path}", f"re-extract them; {FEATURES_FIX}")
    return ref


def check_feature_pairing(ref: dict, teacher_sha256: str, student_sha256: str, path: str) -> None:
    meta = ref["metadata"]
    if meta["student_sha256"] != student_sha256 or meta["teacher_sha256"] != teacher_sha256:
        raise PipelineError(f"{path} was extracted with student {meta['student_sha256'][:12]} / teacher "
                            f"{meta['teacher_sha256'][:12]}, not the given pair ({student_sha256[:12]} / "
                            f"{teacher_sha256[:12]}); re-extract with these checkpoints")


def check_feature_layer(ref: dict, decoder, layer: str, path: str) -> None:
    """One line, naming the file, when hooks at ``layer`` cannot be served by these features with this student."""
    try:
        require_layer(ref, decoder, layer)
    except PipelineError as err:
        raise type(err)(f"{path}: {err}") from err
