"""Training the image encoder (models/nets/image_encoder.py): image -> the student's bottleneck for it, the
reference-feature extractor learned from the student itself.

DDIM inversion looks for an image's latent through the teacher, but the teacher's map from latent to image is
close to many-to-one: even on its own images, 10-step inversion recovers the latent with a cosine of only 0.58
(BENCHMARKS.md), so features read at an inverted latent drift away from the ones the student computed.
The image encoder is trained on exactly the question reference features must answer: for every image the student
generates from z, return the student's bottleneck at z (z is drawn fresh every step, and the student labels it),
and extraction is then one encoder pass per image. The student's images are blurred, though, and real digits are
sharp: trained on student images alone, the encoder maps real digits to features of 2.6x the norm of any
bottleneck the student produces (BENCHMARKS.md), which the decoder cannot use. So part of each batch is the
teacher's sharp image for a training pair's noise z, with the same target: the student's bottleneck at z.

Generating the student's (image, bottleneck) costs more than the encoder's training step on it (a full UNet pass
against half of one, forward and backward), so by default the student's side comes from a pool of ``pool_size``
generations made once, in large batches, and drawn in shuffled passes: each generation is seen several times
instead of once (``pool_size`` 0: fresh latents every step, the earlier behaviour).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..diffusion.noise import per_sample_noise
from ..io.checkpoints import load_checkpoint
from ..io.errors import PipelineError
from ..io.files import atomic_save
from ..io.progress import progress_bar
from ..nets.image_encoder import ImageEncoder
from ..nets.teacher import TeacherConfig
from ..nets.unet import Unet, recalibrate_batchnorm
from .optim import warmup_cosine

NOISE_STREAM = 11  # the encoder's training latents: apart from the pairs' (0) and the consistency check's (2024)


@dataclass
class EncoderTrainOptions:
    # 700 steps at peak lr 5e-3 beat the consistency 1,500 steps at 1e-3 reached, in under half the time
    # (BENCHMARKS.md, The encoder's learning rate: at 500-900 steps consistency rises with the peak lr up to 5e-3)
    steps: int = 700
    batch_size: int = 64
    lr: float = 5e-3
    seed: int = 0
    save_every: int = 100
    bn_samples: int = 1024
    teacher_pairs_fraction: float = 0.5  # share of each batch from the training pairs' teacher images (0: none)
    pool_size: int = 8192                # student generations made once and reused (0: fresh latents every step)
    frozen_blocks: int = 0               # leading encoder blocks (with the input conv) kept at the teacher's weights

    def validate(self) -> None:
        for name in ("steps", "batch_size", "save_every"):
            if getattr(self, name) <= 0:
                raise PipelineError(f"--encoder_{name} must be positive, got {getattr(self, name)}")
        if self.frozen_blocks < 0:
            raise PipelineError(f"--encoder_frozen_blocks must be >= 0, got {self.frozen_blocks}")
        if self.pool_size < 0 or 0 < self.pool_size < self.batch_size - self.pair_count(self.batch_size):
            raise PipelineError(f"--encoder_pool_size must be 0 or at least the student's share of a batch, got "
                                f"{self.pool_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PipelineError(f"--encoder_lr must be a positive number, got {self.lr}")
        if not 0 <= self.teacher_pairs_fraction <= 1:
            raise PipelineError(f"--encoder_teacher_pairs_fraction must be in [0, 1], got {self.teacher_pairs_fraction}")

    def pair_count(self, batch_size: int) -> int:
        return int(round(batch_size * self.teacher_pairs_fraction))

    def effective_pool_size(self) -> int:
        """The pool, at most as large as the student generations the training draws (a short run makes each once)."""
        return min(self.pool_size, self.steps * (self.batch_size - self.pair_count(self.batch_size)))


def _student_batch(decoder, seed: int, indices, device):
    z = per_sample_noise(seed, indices, stream=NOISE_STREAM, device=device)
    with torch.inference_mode():
        images, h, _ = decoder.generate(z)
    return images.float().clamp(-1, 1).clone(), h.float().clone()


def _pairs_batch(decoder, pairs: dict, seed: int, step: int, count: int, device):
    """``count`` training pairs drawn by (seed, step) alone: the teacher's images, the student's bottleneck at their
    noise."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(len(pairs["images"]), (count,), generator=generator)
    with torch.inference_mode():  # the target only: the student's bottleneck, not its image
        h = decoder.bottleneck(pairs["noise"][idx].to(device))
    return pairs["images"][idx].to(device).float().clamp(-1, 1), h.float().clone()


POOL_BATCH = 128  # generations per pass while the pool is built (fixed: the pool must not depend on a batch flag)


class StudentPool:
    """``size`` student generations from latents (seed, 0 .. size-1), made once; step s draws the next slice of a
    sequence of permutations fixed by (seed, pass), so a batch depends on (seed, s) alone (resume stays exact)."""

    def __init__(self, decoder, seed: int, size: int, device, stem: Callable | None = None):
        self.seed, self.size = seed, size
        inputs, h = [], []
        bar = progress_bar(total=size, desc="image encoder pool", unit="img", dynamic_ncols=True)
        for lo in range(0, size, POOL_BATCH):
            batch_images, batch_h = _student_batch(decoder, seed, range(lo, min(lo + POOL_BATCH, size)), device)
            inputs.append(_through(stem, batch_images))
            h.append(batch_h)
            bar.update(batch_images.shape[0])
        bar.close()
        self.inputs, self.h = torch.cat(inputs), torch.cat(h)  # inputs: the images, or their frozen stem's output

    def _order(self, pass_index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * pass_index + 1)
        return torch.randperm(self.size, generator=generator)

    def batch(self, step: int, count: int):
        """Positions step*count .. (step+1)*count-1 of the endless sequence of shuffled passes over the pool."""
        start, stop = step * count, (step + 1) * count
        parts = [torch.zeros(0, dtype=torch.long)]
        for pass_index in range(start // self.size, (stop - 1) // self.size + 1 if count else 0):
            offset = pass_index * self.size
            parts.append(self._order(pass_index)[max(start, offset) - offset: min(stop, offset + self.size) - offset])
        idx = torch.cat(parts).to(self.inputs.device)
        return self.inputs[idx], self.h[idx]


@torch.no_grad()
def _through(stem: Callable | None, images: torch.Tensor) -> torch.Tensor:
    return images if stem is None else stem(images)


def _mixed_batch(decoder, pairs, opts: EncoderTrainOptions, first: int, size: int, draw: int, device,
                 pool: StudentPool | None = None, stem: Callable | None = None):
    """``size`` encoder inputs (images, or with ``stem`` their frozen stem's output) with their targets: student
    generations (from the pool's step ``draw``, or from latents (seed, first + i)), then the share
    ``opts.teacher_pairs_fraction`` of teacher images from the training pairs, drawn by (seed, draw)."""
    n_pairs = opts.pair_count(size)
    if pool is not None:
        inputs, h = pool.batch(draw, size - n_pairs)
    else:
        images, h = _student_batch(decoder, opts.seed, range(first, first + size - n_pairs), device)
        inputs = _through(stem, images)
    if n_pairs:
        pair_images, pair_h = _pairs_batch(decoder, pairs, opts.seed, draw, n_pairs, device)
        inputs, h = torch.cat([inputs, _through(stem, pair_images)]), torch.cat([h, pair_h])
    return inputs, h


def _training_batch(decoder, pairs, opts: EncoderTrainOptions, step: int, device, pool: StudentPool | None = None,
                    stem: Callable | None = None):
    return _mixed_batch(decoder, pairs, opts, step * opts.batch_size, opts.batch_size, step, device, pool, stem)


def train_image_encoder(decoder, teacher_unet: Unet, config: TeacherConfig, opts: EncoderTrainOptions,
                        state_dir: Path, device, pairs: dict | None = None) -> tuple[ImageEncoder, list[float]]:
    """Fits the encoder to the student's (image, bottleneck) pairs, and with ``pairs`` (a training_data.pt) also
    to (teacher image, student bottleneck at the pair's noise). Resumable bit-exactly from ``state_dir`` (step s
    always draws latents (seed, s * batch_size + i) and pairs by (seed, s)); a finished encoder is kept there and
    reused. Returns the encoder (eval mode, BatchNorm statistics recomputed) and the training losses of every step."""
    opts.validate()
    if pairs is None and opts.teacher_pairs_fraction > 0:
        raise PipelineError("teacher_pairs_fraction > 0 needs the student's training pairs")
    state_path, final_path = Path(state_dir) / "image_encoder_state.pt", Path(state_dir) / "image_encoder_final.pt"
    torch.manual_seed(opts.seed)
    encoder = ImageEncoder.from_teacher(teacher_unet, config).to(device)
    if final_path.exists():
        final = load_checkpoint(final_path, device, what="trained image encoder")
        if final.get("options") == asdict(opts):
            encoder.load_state_dict(final["model"])
            return encoder.eval().requires_grad_(False), final["losses"]
    encoder.freeze_stem(opts.frozen_blocks)
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=opts.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(opts.steps))
    step, losses = 0, []
    if state_path.exists():
        state = load_checkpoint(state_path, device, what="image-encoder training state")
        if state.get("options") != asdict(opts):
            raise PipelineError(f"{state_path} was written with other encoder options; delete it to start over")
        encoder.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses = int(state["step"]), list(state["losses"])
    n_frozen = opts.frozen_blocks
    stem = partial(encoder.stem, n_blocks=n_frozen) if n_frozen else None
    predict = partial(encoder.head, n_blocks=n_frozen) if n_frozen else encoder
    encoder.train()
    pool_size = opts.effective_pool_size()
    pool = StudentPool(decoder, opts.seed, pool_size, device, stem) if pool_size else None
    bar = progress_bar(total=opts.steps, initial=step, desc="image encoder", unit="step", dynamic_ncols=True)
    while step < opts.steps:
        inputs, h = _training_batch(decoder, pairs, opts, step, device, pool, stem)
        loss = F.mse_loss(predict(inputs), h)
        value = loss.item()
        if not math.isfinite(value):
            raise PipelineError(f"image-encoder loss became {value} at step {step}; lower --encoder_lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if step % opts.save_every == 0 and step < opts.steps:
            atomic_save({"step": step, "options": asdict(opts), "losses": losses, "model": encoder.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, state_path)
    bar.close()
    # BatchNorm statistics of the final weights, over the training mixture (student images the training never drew)
    offset = pool_size or opts.steps * opts.batch_size
    calibration, _ = _mixed_batch(decoder, pairs, opts, offset, opts.bn_samples, opts.steps, device, stem=stem)
    if n_frozen:  # the stem keeps the teacher's statistics
        recalibrate_batchnorm(encoder.head_modules(n_frozen), calibration, opts.batch_size, forward=predict)
    else:
        recalibrate_batchnorm(encoder, calibration, opts.batch_size)
    atomic_save({"options": asdict(opts), "losses": losses, "model": encoder.state_dict()}, final_path)
    return encoder.eval().requires_grad_(False), losses


def encoder_record(encoder: ImageEncoder, opts: EncoderTrainOptions) -> dict:
    """What reference_features.pt keeps of the encoder, so notebooks can attribute images of their own."""
    return {"model_args": encoder.config.to_dict(), "state_dict": encoder.state_dict(), "options": asdict(opts)}
