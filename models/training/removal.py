"""Fine-tuning the teacher with some training images left out, and what that does to a generation: the removal
test of attribution (bench/bench_counterfactual_attribution.py).

Retraining from scratch without the attributed images is the field's reference (Journey TRAK, D-TRAK) and far
beyond this CPU; here a trained teacher is fine-tuned for one epoch, once per removed set, the removed rows dropped
from their batches. Every run uses the teacher trainer's timesteps and noise of (seed, step)
(models/training/teacher.training_batch) and one batch order, so every kept row sees the same timestep and noise
in every run; BatchNorm is frozen, so a row's loss does not depend on its batch-mates; the loss is summed over the
kept rows and divided by the full batch size, so a kept row weighs the same in every run. Runs then differ only by
the removed images' gradients.

To afford dozens of runs, the batch order is the trainer's first epoch with every *candidate* image (the union of
the sets that will be removed) moved to its end, in the same random relative order: every run shares the control's
steps up to the first candidate, computed once. Attributed and random sets are both candidates, so both are
visited equally late.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch

from ..diffusion.noise import per_sample_noise
from ..io.errors import PipelineError
from ..nets.teacher import MNISTDiffusion
from .teacher import train_mode, training_batch


@dataclass(frozen=True)
class RemovalFinetune:
    """One epoch of AdamW (fresh state, constant ``lr``) at the teacher's last leg's batch size."""
    batch_size: int = 64
    lr: float = 1e-4
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def epoch_order(seed: int, n: int, batch_size: int, candidates: Iterable[int] = ()) -> torch.Tensor:
    """The images one epoch visits, in order: the teacher trainer's first epoch (``n // batch_size`` batches; the
    rest of its permutation is not visited) with ``candidates`` moved, in the same relative order, to the end of
    what is visited, so they are all visited."""
    if batch_size < 1 or n // batch_size == 0:
        raise PipelineError(f"batch_size must lie in 1..{n} (the training set), got {batch_size}")
    per_epoch = n // batch_size
    trainer = torch.cat([training_batch(seed, step, per_epoch, batch_size, n, 1)[0] for step in range(per_epoch)])
    unvisited = torch.ones(n, dtype=torch.bool)
    unvisited[trainer] = False
    permutation = torch.cat([trainer, torch.nonzero(unvisited).flatten()])
    is_candidate = torch.zeros(n, dtype=torch.bool)
    is_candidate[_checked(candidates, n)] = True
    last = permutation[is_candidate[permutation]]
    if len(last) > per_epoch * batch_size:
        raise PipelineError(f"{len(last)} candidate images do not fit in one epoch of {per_epoch * batch_size}")
    rest = permutation[~is_candidate[permutation]]
    return torch.cat([rest[:per_epoch * batch_size - len(last)], last])


def _checked(indices: Iterable[int], n: int) -> torch.Tensor:
    indices = torch.as_tensor(list(indices), dtype=torch.long)
    if len(indices) and not (0 <= int(indices.min()) and int(indices.max()) < n):
        raise PipelineError(f"removed and candidate indices must lie in 0..{n - 1}")
    return indices


def shared_prefix_steps(n: int, batch_size: int, n_candidates: int) -> int:
    """Steps before the first batch that holds a candidate (``epoch_order``): the same in every run."""
    return (n // batch_size * batch_size - n_candidates) // batch_size


class RemovalFinetuner:
    """One epoch of fine-tuning ``diffusion`` on ``images`` (the whole training set), trained once up to the first
    batch that holds a candidate, then continued from there by ``run(removed)`` for any subset of the candidates.
    ``share_prefix=False`` trains every run from the start instead (the same weights, slower: for checking)."""

    def __init__(self, diffusion: MNISTDiffusion, images: torch.Tensor, opts: RemovalFinetune,
                 candidates: Iterable[int] = (), progress: Optional[Callable[[int], None]] = None,
                 share_prefix: bool = True):
        if not opts.lr > 0:
            raise PipelineError(f"the fine-tune's lr must be positive, got {opts.lr}")
        self.images, self.opts, self.progress = images, opts, progress
        self.n, self.per_epoch = len(images), len(images) // max(opts.batch_size, 1)
        candidates = _checked(candidates, self.n).unique()
        self.order = epoch_order(opts.seed, self.n, opts.batch_size, candidates.tolist())
        self.candidates = set(candidates.tolist())
        self.shared_steps = shared_prefix_steps(self.n, opts.batch_size, len(candidates)) if share_prefix else 0
        self._model = copy.deepcopy(diffusion).requires_grad_(True)
        train_mode(self._model, freeze_batchnorm=True)
        optimizer = torch.optim.AdamW(self._model.parameters(), lr=opts.lr)
        self._train(self._model, optimizer, 0, self.shared_steps, torch.zeros(self.n, dtype=torch.bool))
        self._optimizer_state = copy.deepcopy(optimizer.state_dict())

    def run(self, removed: Iterable[int] = ()) -> MNISTDiffusion:
        """The fine-tuned teacher without ``removed`` (indices into the images, among the candidates), in eval mode."""
        removed = _checked(removed, self.n)
        strangers = set(removed.tolist()) - self.candidates
        if strangers:
            raise PipelineError(f"removed images {sorted(strangers)[:5]} are not among the candidates")
        dropped = torch.zeros(self.n, dtype=torch.bool)
        dropped[removed] = True
        model = copy.deepcopy(self._model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.opts.lr)
        optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))  # loading may alias the stored tensors
        self._train(model, optimizer, self.shared_steps, self.per_epoch, dropped)
        return model.eval().requires_grad_(False)

    @property
    def steps_per_run(self) -> int:
        return self.per_epoch - self.shared_steps

    def _train(self, model, optimizer, first: int, stop: int, dropped: torch.Tensor) -> None:
        bs, device = self.opts.batch_size, self.images.device
        for step in range(first, stop):
            _, t, noise = training_batch(self.opts.seed, step, self.per_epoch, bs, self.n, model.timesteps,
                                         tuple(self.images.shape[1:]))
            idx = self.order[step * bs:(step + 1) * bs]
            keep = ~dropped[idx]
            if keep.any():
                t, noise = t[keep].to(device), noise[keep].to(device)
                error = model(self.images[idx[keep]], noise, t) - noise
                loss = error.square().sum() / (bs * error[0].numel())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if self.progress is not None:
                self.progress(1)


@torch.no_grad()
def denoising_loss(diffusion: MNISTDiffusion, images: torch.Tensor, n_timesteps: int = 20,
                   seed: int = 0) -> torch.Tensor:
    """Each image's epsilon-prediction error (the training loss) averaged over ``n_timesteps`` evenly spaced
    timesteps, with noise keyed by (seed, image index, timestep): the model-output function D-TRAK and Journey TRAK
    attribute, a smoother measure of what a model learnt about an image than regenerating it."""
    diffusion.eval()
    steps = torch.linspace(0, diffusion.timesteps - 1, n_timesteps).round().long()
    total = torch.zeros(len(images), device=images.device)
    for j, t in enumerate(steps.tolist()):
        noise = per_sample_noise(seed, range(len(images)), tuple(images.shape[1:]), stream=1 + j,
                                 device=images.device)
        ts = torch.full((len(images),), t, dtype=torch.long, device=images.device)
        total += (diffusion(images, noise, ts) - noise).square().flatten(1).mean(1)
    return total / n_timesteps
