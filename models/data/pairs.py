"""Reading generate_training_data.py's pairs and the train/validation split of them, shared by student training,
evaluation and feature extraction (a module of its own so that evaluation does not import training)."""
from __future__ import annotations

from pathlib import Path

from ..io.checkpoints import load_checkpoint
from ..io.errors import PipelineError
from ..io.guards import require_finite_rows
from .datasets import split_indices


def load_training_pairs(path: str | Path, device="cpu") -> dict:
    data = load_checkpoint(path, device, what="training data",
                           fix="create it with `python generate_training_data.py --ckpt TEACHER --output_dir DIR`")
    if data.get("kind") != "training_pairs" or "noise" not in data or "images" not in data:
        raise PipelineError(f"{path} is not a training_data.pt written by generate_training_data.py")
    for key in ("noise", "images"):
        require_finite_rows(data[key], range(data[key].shape[0]), f"training data {path}: {key}",
                            "regenerate it with generate_training_data.py from a teacher with finite weights")
    return data


def student_split(n: int, val_fraction: float, seed: int):
    """The 90/10 split fixed by seed; at least one validation pair even for tiny runs."""
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    if len(val_idx) == 0:
        val_idx, train_idx = train_idx[:1], train_idx[1:]
    return train_idx, val_idx
