"""The adversarial term of distillation: a small discriminator (models/nets/discriminator.py) that tells real 28x28
digits from the student's one-step images, its hinge losses and its optimizer.

Regression alone averages over what the teacher would draw for nearby noises, so one-step students come out soft;
the adversarial term pushes each image back onto the data manifold while the regression keeps the same-noise
correspondence (Diffusion2GAN, DMD2). The recipe is the stable one for small data: hinge loss, spectral norm on
every layer, and the same random translation of real and fake inputs, which keeps a discriminator from memorising
5,000 digits.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..io.guards import require_finite
from ..nets.classifier import random_shift, shift_images
from ..nets.discriminator import Discriminator


Rows = Optional[tuple[int, int, int]]  # (lo, hi, n): this rank's rows of a global batch of n


def discriminator_hinge_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def generator_hinge_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.mean()


def augment(x: torch.Tensor, max_shift: int, generator: torch.Generator, rows: Rows = None) -> torch.Tensor:
    """Per-image integer translation, drawn from ``generator`` so a resumed epoch replays the same draws. ``rows``
    (lo, hi, n): ``x`` is rows lo:hi of a global batch of n split over torchrun ranks; the draws are the whole
    batch's, as one process makes them, and these rows take theirs."""
    if rows is None:
        return random_shift(x, max_shift, generator)
    if max_shift <= 0:
        return x
    lo, hi, n = rows
    return shift_images(x, max_shift, torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)[:, lo:hi])


class AdversarialTerm:
    """Owns the discriminator, its optimizer and its data; one call per student step."""

    def __init__(self, real_images: torch.Tensor, width: int, lr: float, max_shift: int, device):
        self.real = real_images.to(device)
        self.max_shift = max_shift
        self.discriminator = Discriminator(width).to(device)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.0, 0.99))

    def _real_batch(self, n: int, generator: torch.Generator, rows: Rows = None) -> torch.Tensor:
        idx = torch.randint(0, self.real.shape[0], (n if rows is None else rows[2],), generator=generator)
        if rows is not None:
            idx = idx[rows[0]:rows[1]]
        return self.real[idx.to(self.real.device)]

    def discriminator_step(self, fake: torch.Tensor, generator: torch.Generator, rows: Rows = None,
                           combine: Optional[Callable[[list], None]] = None) -> float:
        """One hinge step on a real batch and the student's (detached) images; returns the loss. A non-finite loss
        stops the run before the step could make the discriminator's weights NaN. Under torchrun ``rows`` places
        ``fake`` in the global batch and ``combine`` all-reduces the gradients in place before the step."""
        self.discriminator.train().requires_grad_(True)
        real = augment(self._real_batch(fake.shape[0], generator, rows), self.max_shift, generator, rows)
        fake = augment(fake.detach(), self.max_shift, generator, rows)
        loss = discriminator_hinge_loss(self.discriminator(real), self.discriminator(fake))
        require_finite(loss, "the discriminator's loss", "stopped before its step; lower --disc_lr (or --adv_weight) "
                       "and --resume from the last good checkpoint, or start again")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if combine is not None:
            combine([p.grad for p in self.discriminator.parameters()])
        self.optimizer.step()
        return float(loss.item())

    def generator_loss(self, fake: torch.Tensor, generator: torch.Generator, rows: Rows = None) -> torch.Tensor:
        """The student's adversarial loss; gradients flow into the student only (the discriminator is frozen here)."""
        self.discriminator.requires_grad_(False)
        scores = self.discriminator(augment(fake, self.max_shift, generator, rows))
        return generator_hinge_loss(scores)

    def state_dict(self) -> dict:
        return {"model": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "width": self.discriminator.width}

    def load_state_dict(self, state: dict, lr: float | None = None) -> None:
        """Weights and Adam moments; ``lr`` replaces the saved learning rate (a new leg's --disc_lr)."""
        self.discriminator.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups if lr is not None else []:
            group["lr"] = lr
