"""One way to write a file, hash it, load a checkpoint, pick a device, and fail with a one-line message."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import platform
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Shipped assets, found from any working directory.
DEFAULT_TEACHER = str(REPO_ROOT / "checkpoints" / "teacher_mnist5k.pt")
DEFAULT_STUDENT = str(REPO_ROOT / "checkpoints" / "student_mnist5k.pt")  # distilled from DEFAULT_TEACHER
DEFAULT_CLASSIFIER = str(REPO_ROOT / "checkpoints" / "classifier_mnist5k.pt")
# Another architecture, seed and split, used only to score: no loss ever sees it, so a student trained with the
# perceptual term (in DEFAULT_CLASSIFIER's feature space) cannot have learnt to please it.
AUDIT_CLASSIFIER = str(REPO_ROOT / "checkpoints" / "classifier_mnist5k_audit.pt")

EXIT_ERROR = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
EXIT_MISSING = 2


class PipelineError(Exception):
    """A failure the user can act on: printed as one line, exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class MissingInputError(PipelineError):
    """A model or dataset that is not there (exit 2); the message names the fix."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_MISSING)


def run_cli(main: Callable[[], Any], resumable: bool = True) -> None:
    """Runs a script's main: a refused input is one "error:" line and its exit code, not a traceback.
    ``resumable=False`` (the benches) drops the hint that rerunning resumes."""
    try:
        main()
    except PipelineError as err:
        _close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted: rerun the same command to resume" if resumable else "interrupted", file=sys.stderr)
        sys.exit(130)


def _close_progress_bars() -> None:
    """A bar the failure left open would be redrawn after the error line, splitting it; closed first."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def pick_device(force_cpu: bool = False) -> torch.device:
    if not force_cpu and torch.cuda.is_available():
        return torch.device("cuda")
    if not force_cpu and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


def machine_description(threads: int | None = None) -> str:
    """For benchmark records: CPU model and cores (with ``threads``, or this process's torch threads), or the GPU."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model}), torch threads {threads or torch.get_num_threads()}"


def software_versions() -> dict:
    import numpy
    return {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(numpy.__version__),
            "platform": platform.platform()}


def run_context() -> dict:
    """What makes a benchmark figure reproducible: the machine, the software versions and the command line."""
    return {"machine": machine_description(), "versions": software_versions(),
            "command": "python " + " ".join(sys.argv)}


def append_run_record(row: dict, path: str | os.PathLike) -> dict:
    """Appends one benchmark result with its run_context() to its record (bench/results/*.jsonl); returns it."""
    record = row | run_context()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(record, path)
    return record


def image_grid_png(images: torch.Tensor, nrow: int | None = None, value_range=(-1, 1), padding: int = 2) -> bytes:
    """Images in [-1, 1] as the bytes of one PNG grid (``padding=0`` and one image: that image alone)."""
    from torchvision.utils import save_image
    import math
    lo, hi = value_range
    images = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    buffer = io.BytesIO()
    save_image(images, buffer, nrow=nrow, format="png", pad_value=0.5, padding=padding)
    return buffer.getvalue()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, value_range=(-1, 1)):
    """Images in [-1, 1] to a PNG grid, atomically."""
    png = image_grid_png(images, nrow, value_range)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
