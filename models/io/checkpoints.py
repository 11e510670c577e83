"""Loading a checkpoint file: weights only, and every failure one actionable line."""
from __future__ import annotations

import os
import pickle
import time
import zipfile

import torch

from .errors import PipelineError
from .files import require_file


RESUME_ONLY = ("optimizer", "scheduler")  # what only --resume reads; a file others load can leave it out


def without_resume_state(ckpt: dict) -> dict:
    """``ckpt`` without the optimizer and scheduler state: the weights and records a later stage loads (the
    optimizer's per-parameter state is over half the tensors, which weights_only unpickles one by one)."""
    return {k: v for k, v in ckpt.items() if k not in RESUME_ONLY}


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu", what: str = "checkpoint",
                    fix: str = "", mmap: bool = False) -> dict:
    """Loads with ``weights_only=True`` straight onto ``device``; every failure becomes one actionable line.
    ``mmap=True`` (CPU only) reads tensors lazily: for callers that only want a large file's metadata."""
    path = require_file(path, what, fix, suffix=".pt")
    hint = f"; {fix}" if fix else ""
    start = time.perf_counter()
    try:
        obj = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "Weights only load failed" in str(err):
            raise PipelineError(f"refusing to load {path}: it contains pickled code or objects that "
                                f"weights_only=True does not allow; re-save it as plain tensors{hint}") from err
        raise PipelineError(f"{what} {path} is corrupted ({first}){hint}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"{what} {path} is corrupted or truncated ({first[:160]}){hint}") from err
    if not isinstance(obj, dict):
        raise PipelineError(f"{what} {path} holds a {type(obj).__name__}, expected a dict of tensors")
    obj.setdefault("_load_seconds", time.perf_counter() - start)
    return obj
