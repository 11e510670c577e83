"""One way to write a file (atomically: torch, text, JSON; appended JSON lines), hash it, and refuse an input or
output path that cannot work, with a one-line message."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import MissingInputError, PipelineError

_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_output_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PipelineError(f"output directory {path} exists and is a file; choose another --output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"cannot create output directory {path}: {err.strerror}") from err
    return path


def check_output_file(path: str | os.PathLike, flag: str = "") -> Path:
    """Refuses, before any work, an output file that could never be written: a directory, or a path under a file."""
    path = Path(path)
    name = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise PipelineError(f"{name} is a directory; give a file name such as {path / 'output.pt'}")
    blocking = next((p for p in path.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise PipelineError(f"cannot write {name}: {blocking} is a file, not a directory")
    return path


def _check_parent(path: Path) -> None:
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temp path beside ``path``; renamed onto it only if the block finishes, removed otherwise."""
    path = Path(path)
    _check_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs unreadable to collaborators
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise PipelineError(f"could not write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so a failed write (a full disk) surfaces as its OSError; torch's own file
    writer reports only "iostream error"."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            cause = err.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from err


def atomic_save(obj: Any, path: str | os.PathLike,
                before_rename: Callable[[Path, Path], None] | None = None) -> None:
    """torch.save through ``atomic_path``. ``before_rename(temp, final)`` sees the written temp file before it takes
    the final name: it verifies it (``guards.verified``: when it raises, nothing takes the final name) or records
    its checksum (shards)."""
    with atomic_path(path) as tmp:
        _torch_save(obj, tmp)
        if before_rename is not None:
            before_rename(tmp, Path(path))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def append_jsonl(record: dict, path: str | os.PathLike) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise PipelineError(f"could not write {path}: {err.strerror or err}") from err


def truncate_jsonl(path: str | os.PathLike, key: str, last) -> None:
    """On --resume: drops log records after the checkpoint resumed from, so the log reads like an unbroken run."""
    path = Path(path)
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in rows:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # cut short by a kill or a full disk (only ever the last line)
        if record.get(key, last) <= last:
            kept.append(line)
    if len(kept) != len(rows):
        atomic_write_text("".join(line + "\n" for line in kept), path)


def require_file(path: str | os.PathLike, what: str, fix: str = "", suffix: str = "") -> Path:
    """``path`` as a Path if it is a file; otherwise the missing-input error (exit 2) naming the fix."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    if not path.exists():
        raise MissingInputError(f"{what} not found: {path}{hint}")
    if path.is_dir():
        raise MissingInputError(f"{what} path is a directory, expected a {suffix + ' ' if suffix else ''}file: "
                                f"{path}{hint}")
    return path
