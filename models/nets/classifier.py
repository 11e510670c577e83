"""A small MNIST CNN whose penultimate layer is the feature space for image-quality metrics and perceptual losses.

No BatchNorm or Dropout: eval mode is a pure function of the input, and features stay deterministic and
differentiable. About 156k parameters (0.6 MB), cheap enough to score thousands of samples a second on a CPU.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import load_dataset, split_indices
from ..io.checkpoints import load_checkpoint
from ..io.device import pick_device
from ..io.errors import PipelineError
from ..io.files import atomic_save
from ..io.paths import DEFAULT_CLASSIFIER
from ..io.records import software_versions
from ..io.teacher_checkpoints import require_finite_checkpoint

DEFAULT_PATH = DEFAULT_CLASSIFIER
CLASSIFIER_FIX = "train it with `python train_classifier.py`"


class MnistClassifier(nn.Module):
    """Three conv+pool stages (28 -> 14 -> 7 -> 4), then a ``feature_dim`` hidden layer and a linear head."""

    def __init__(self, channels: tuple = (16, 32, 64), feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        widths = [1, *channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths, widths[1:]))
        side = 28
        for _ in channels:
            side = (side + 1) // 2  # ceil-mode pooling keeps the last row/column of odd sizes
        self.hidden = nn.Linear(channels[-1] * side * side, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], [N, 1, 28, 28] -> penultimate activations [N, feature_dim] (what the head sees)."""
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2, ceil_mode=True)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class ClassifierArgs:
    channels: tuple = (16, 32, 64)
    feature_dim: int = 128
    num_classes: int = 10


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shifts each image by its own integer offset in [-max_shift, max_shift], filling with background (-1)."""
    if max_shift <= 0:
        return x
    return shift_images(x, max_shift, torch.randint(0, 2 * max_shift + 1, (2, x.shape[0]), generator=generator))


def shift_images(x: torch.Tensor, max_shift: int, shifts: torch.Tensor) -> torch.Tensor:
    """Image i moved by (shifts[0, i] - max_shift, shifts[1, i] - max_shift) pixels, background (-1) filled in."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = shifts.to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    device = next(model.parameters()).device
    correct = sum(int((model(images[i:i + batch_size].to(device)).argmax(1).cpu() == labels[i:i + batch_size]).sum())
                  for i in range(0, len(labels), batch_size))
    return correct / max(len(labels), 1)


def train_classifier(dataset: str = "mnist5k", output_path: str = DEFAULT_PATH, epochs: int = 12,
                     batch_size: int = 64, seed: int = 0, val_fraction: float = 0.1, device=None,
                     lr: float = 2e-3, max_shift: int = 2, threads: int = 0, channels: tuple = (16, 32, 64),
                     feature_dim: int = 128, dry_run: bool = False) -> dict:
    """Trains on a shuffled split (mnist5k is sorted by label) and saves a self-describing checkpoint."""
    if epochs <= 0 or batch_size <= 0:
        raise PipelineError(f"--epochs and --batch_size must be positive, got {epochs} and {batch_size}")
    if not channels or min(channels) <= 0 or feature_dim <= 0:
        raise PipelineError(f"--channels and --feature_dim must be positive, got {list(channels)} and {feature_dim}")
    if not 0.0 < val_fraction < 1.0:
        raise PipelineError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if threads:
        torch.set_num_threads(threads)  # a tiny model on a shared CPU: extra threads mostly spin
    device = torch.device(device) if device is not None else pick_device()
    data = load_dataset(dataset, "train")
    train_idx, val_idx = split_indices(len(data), val_fraction, seed)
    args = ClassifierArgs(channels=tuple(channels), feature_dim=feature_dim, num_classes=data.num_classes)
    config = {"dataset": dataset, "epochs": epochs, "batch_size": batch_size, "seed": seed, "lr": lr,
              "val_fraction": val_fraction, "max_shift": max_shift, "optimizer": "AdamW, OneCycle",
              "n_train": len(train_idx), "n_val": len(val_idx), "device": str(device)}
    if dry_run:
        print(json.dumps({"output_path": str(output_path), "model_args": asdict(args), "config": config}, indent=2))
        return {"dry_run": True, "config": config}

    torch.manual_seed(seed)
    model = MnistClassifier(**asdict(args)).to(device)
    images, labels = data.images[train_idx].to(device), data.labels[train_idx].to(device)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_idx), generator=gen).to(device)
        total_loss = 0.0
        for i in range(0, len(order), batch_size):
            batch = order[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(images[batch], max_shift, gen)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch)
        model.eval()
        val_acc = accuracy(model, data.images[val_idx], data.labels[val_idx])
        print(f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(order):.4f}, held-out accuracy {val_acc:.4f}")
    wall = time.perf_counter() - start
    atomic_save({"kind": "classifier", "model": {k: v.cpu() for k, v in model.state_dict().items()},
                 "model_args": asdict(args) | {"channels": list(args.channels)}, "config": config,
                 "val_accuracy": val_acc, "dataset": dataset, "versions": software_versions()}, output_path)
    return {"val_accuracy": val_acc, "wall_s": wall, "path": str(output_path), "config": config}


def load_classifier(path: str = DEFAULT_PATH, device="cpu") -> MnistClassifier:
    """A frozen classifier in eval mode: safe to use inside a student's loss without training it."""
    ckpt = load_checkpoint(path, device, what="classifier checkpoint", fix=CLASSIFIER_FIX)
    if ckpt.get("kind") != "classifier":
        raise PipelineError(f"{path} is a {ckpt.get('kind', 'untyped')!r} checkpoint, not a classifier; "
                            f"pass the file written by `python train_classifier.py`")
    require_finite_checkpoint(ckpt.get("model", {}), path, "classifier checkpoint")
    model = MnistClassifier(**ckpt.get("model_args", {}))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError) as err:
        raise PipelineError(f"{path}: weights do not match MnistClassifier "
                            f"({str(err).splitlines()[0][:200]})") from err
    return model.to(device).eval().requires_grad_(False)
