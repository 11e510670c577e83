"""Broken values and clashing runs, caught where it is cheap and decisive, and named in one line.

A diverged run saves weights that load, run and write files full of NaN; a second run started on the same output
interleaves its writes with the first. Both look like success until a later stage. Here: the one check for
non-finite tensors (weights at load, samples after each batch, losses in training, what a server returns), the
check of a file written by ``io.atomic_save`` before it takes its final name, and the lock a stage holds on its
output for the whole run.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .checkpoints import load_checkpoint
from .errors import PipelineError

RERUN_CANNOT_HELP = "a rerun cannot help"


def count_nonfinite(value) -> str | None:
    """"3 NaN and 1 Inf of 144 values", or None when ``value`` is finite (or not a floating-point tensor)."""
    if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
        return None
    finite = torch.isfinite(value)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(value).sum())
    inf = value.numel() - int(finite.sum()) - nan
    found = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
    return f"{' and '.join(found)} of {value.numel()} values"


def _fix(fix: str) -> str:
    return f"; {fix}" if fix else ""


def require_finite(tensor: torch.Tensor, what: str, fix: str = "") -> torch.Tensor:
    """``tensor`` itself if every value is finite; otherwise the one-line error (exit 1) naming ``what``."""
    problem = count_nonfinite(tensor)
    if problem:
        raise PipelineError(f"{what} holds non-finite values ({problem}){_fix(fix)}")
    return tensor


def nonfinite_rows(tensor: torch.Tensor) -> list[int]:
    """Positions along the first dimension whose values are not all finite."""
    if count_nonfinite(tensor) is None:
        return []
    return (~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(1)).nonzero().flatten().tolist()


def format_indices(indices: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def require_finite_rows(tensor: torch.Tensor, indices: Sequence[int], what: str, cause: str) -> None:
    """Refuses a batch whose row i (sample ``indices[i]``) holds NaN/Inf, naming those samples and the likely cause."""
    rows = nonfinite_rows(tensor)
    if rows:
        indices = list(indices)
        raise PipelineError(f"{what} of samples {format_indices([indices[r] for r in rows])} hold non-finite "
                            f"values ({len(rows)} of {len(indices)}); {cause}")


def require_finite_weights(state: dict, source: str, fix: str) -> None:
    """Refuses weights that hold NaN/Inf, naming the first such tensor: a diverged run saves exactly this, and every
    later stage would run to its end on it."""
    bad = [(name, problem) for name, value in state.items() if (problem := count_nonfinite(value))]
    if bad:
        name, problem = bad[0]
        more = f"; {len(bad) - 1} more tensors too" if len(bad) > 1 else ""
        raise PipelineError(f"{source}: tensor {name} holds non-finite values ({problem}{more}); {fix}")


def require_finite_values(values: dict, what: str, fix: str) -> None:
    """For scalars such as a step's losses and gradient norm: names every one that is NaN/Inf."""
    bad = {k: v for k, v in values.items() if not torch.isfinite(torch.as_tensor(float(v)))}
    if bad:
        raise PipelineError(f"{what} became non-finite ({', '.join(f'{k}={v}' for k, v in bad.items())}); {fix}")


# ---------------------------------------------------------------- verifying a written file before its rename

def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (bitwise: NaN payloads included, unlike ``torch.equal``)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def _difference(expected: torch.Tensor, found) -> str | None:
    if not isinstance(found, torch.Tensor):
        return "missing"
    if found.dim() and expected.dim() and found.shape[0] != expected.shape[0]:
        return f"count {found.shape[0]} instead of {expected.shape[0]}"
    if found.shape != expected.shape or found.dtype != expected.dtype:
        return f"shape {tuple(found.shape)} {found.dtype} instead of {tuple(expected.shape)} {expected.dtype}"
    if not torch.equal(found.reshape(-1).view(torch.uint8), expected.detach().cpu().contiguous().reshape(-1)
                       .view(torch.uint8)):
        return f"sha256 {tensor_sha256(found)[:12]} instead of {tensor_sha256(expected)[:12]}"
    return None


def verified(obj: dict, keys: Iterable[str], kept: str = "") -> Callable[[Path, Path], None]:
    """The ``before_rename`` of ``io.atomic_save`` for ``obj``: its tensors ``keys`` must be finite, and read back from the
    temp file bitwise equal, before the file takes its final name. ``kept`` says what is kept for a rerun."""
    keys = list(keys)

    def verify(tmp: Path, final: Path) -> None:
        for key in keys:
            rows = nonfinite_rows(obj[key])
            if rows:
                raise PipelineError(f"{final} not written: {key} of rows {format_indices(rows)} hold non-finite "
                                    f"values; {RERUN_CANNOT_HELP} (the values themselves are broken: check the "
                                    f"inputs that made them){_fix(kept)}")
        try:
            back = load_checkpoint(tmp, "cpu", what="the written file", mmap=True)
        except PipelineError as err:
            back, unreadable = {}, str(err)
        else:
            unreadable = ""
        for key in keys:
            difference = unreadable or _difference(obj[key], back.get(key))
            if difference:
                raise PipelineError(f"{final} did not verify after writing ({key}: {difference}); not kept under "
                                    "its final name. The values were right in memory, so the disk or memory "
                                    f"failed: check the disk, then rerun to retry{_fix(kept)}")
    return verify


# ---------------------------------------------------------------- one run per output

def _open_lock(lock_path: Path, output: Path) -> int:
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise PipelineError(f"cannot write to {output}: {err.strerror}; make it writable or choose another "
                            "output location") from err


def _lock_for(output: Path) -> Path:
    """A directory's lock is inside it; a file's lock sits beside it, hidden."""
    return output / ".lock" if output.is_dir() else output.with_name(f".{output.name}.lock")


class OutputLocks:
    """The outputs one stage holds for its whole run (see ``holds_output_locks``)."""

    def __init__(self):
        self._fds: list[int] = []

    def hold(self, output: str | os.PathLike) -> None:
        """Takes the lock of ``output`` (a directory, or a file whose directory exists) or refuses in one line, then
        removes temp files a killed run of the same output left (``.NAME.XXXX.tmp``: never a final name).

        flock dies with its process, SIGKILL included, so a killed run never blocks the rerun."""
        output = Path(output)
        fd = _open_lock(_lock_for(output), output)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PipelineError(f"another run (pid {holder}) is writing {output}; wait for it to finish, or choose "
                                "another output location") from None
        self._fds.append(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        stale = output.glob(".*.tmp") if output.is_dir() else output.parent.glob(f".{output.name}.*.tmp")
        for path in stale:
            path.unlink(missing_ok=True)

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


def holds_output_locks(stage: Callable) -> Callable:
    """Passes ``stage`` a ``locks`` keyword (OutputLocks) and releases what it locked when it returns or fails, so a
    stage called twice in one process (the pipeline, tests) never finds its own earlier lock."""
    @functools.wraps(stage)
    def run(*args, **kwargs):
        locks = OutputLocks()
        try:
            return stage(*args, locks=locks, **kwargs)
        finally:
            locks.release()
    return run
