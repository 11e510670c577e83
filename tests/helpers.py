"""Plain helpers shared by the test modules (fixtures live in conftest.py).

pytest's default ("prepend") import mode puts tests/ on sys.path, so test modules and conftest.py import these with
``from helpers import ...``.
"""
from __future__ import annotations

import ctypes
import fcntl
import fnmatch
import hashlib
import json
import os
import runpy
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Union

import torch


def subprocess_env() -> dict:
    """The environment of every script the tests run in a fresh interpreter: one thread, unbuffered output, and
    no FASHION_MNIST_DIR from the caller's shell."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("FASHION_MNIST_DIR", None)
    return env


def built_once(root: Path, name: str, build: Callable[[Path], dict]) -> dict:
    """``build(directory)`` run once for the whole test run, whichever xdist worker asks first; the others wait for
    it and get what it returned (a JSON-able dict). ``root`` is shared by every worker of one run.

    A build that failed leaves no record: the next worker to ask starts again from an empty directory (and fails
    the same way, so each worker's tests report it)."""
    root.mkdir(parents=True, exist_ok=True)
    directory, record = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not record.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            result = build(directory)
            tmp = record.with_name(f".{record.name}.tmp")
            tmp.write_text(json.dumps(result))
            tmp.rename(record)
        return json.loads(record.read_text())


UPSTREAM_CKPT = "steps_00000060.pt"  # the upstream fixture's checkpoint, beside its golden.pt


def upstream_fixture_problem(fixture_dir: Path, env) -> tuple[str, str] | None:
    """None when the upstream fixture is complete; otherwise ("skip" | "fail", reason): a developer's checkout
    without shared/ skips the tests that need it, CI (CI=true) fails them."""
    if (fixture_dir / UPSTREAM_CKPT).is_file() and (fixture_dir / "golden.pt").is_file():
        return None
    reason = (f"upstream MNISTDiffusion fixture not found at {fixture_dir}: clone with shared/ beside the checkout "
              "(CI has it)")
    in_ci = str(env.get("CI", "")).strip().lower() in ("true", "1", "yes")
    return ("fail" if in_ci else "skip"), reason


def load_pt(path) -> dict:
    """A .pt file as the pipeline reads it: weights_only, onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def sha256(path) -> str:
    """The file's sha256, computed here (not with the code under test)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_identical(a, b, where: str) -> None:
    """Bitwise equality of two nested structures of tensors, dicts, lists/tuples and plain values (dtype and shape
    included); ``where`` names the position in the failure message."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_main_in_process(script_path, args, monkeypatch, capsys) -> tuple[int, str, str]:
    """Runs a top-level script's ``__main__`` in this interpreter, as the command line would (sys.argv, argparse,
    run_cli): returns (exit code, stdout, stderr). SystemExit maps to its code: None -> 0, an int as is, anything
    else (a message) -> 1."""
    script_path = Path(script_path)
    monkeypatch.setattr(sys, "argv", [script_path.name, *map(str, args)])
    capsys.readouterr()
    try:
        runpy.run_path(str(script_path), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def use_cached_mnist5k(monkeypatch, module, mnist5k) -> list:
    """Makes ``module.load_dataset`` return the session's cached mnist5k for ("mnist5k", "train") (parsing the CSV
    costs seconds of CPU); any other source goes to the real loader. Returns the list of sources asked for."""
    calls = []
    real = module.load_dataset

    def cached(source, split="train", download=False):
        calls.append(source)
        return mnist5k if (source, split) == ("mnist5k", "train") else real(source, split, download)
    monkeypatch.setattr(module, "load_dataset", cached)
    return calls


def every_nth_image(data, step: int):
    """A smaller copy of a dataset: every ``step``-th image, with its label and source index. mnist5k is sorted by
    label, so every class keeps its share (a prefix would be all zeros). For end-to-end runs whose assertions do
    not depend on how many images the stages read."""
    from models.data.datasets import LabeledImages
    keep = torch.arange(0, len(data), step)
    return LabeledImages(data.images[keep], data.labels[keep], data.indices[keep], data.source, data.split)


def one_error_line(err: str, *, allow_progress: bool = False) -> str:
    """The one "error: " line of a refused run's stderr (blank lines aside), asserting there is exactly one.

    Strict (default): that line is all of stderr. ``allow_progress=True``: earlier lines are tolerated (a progress
    bar drawn before the failure), but the error must be the last line and the only one containing "error: "."""
    lines = [line for line in err.splitlines() if line.strip()]
    if allow_progress:
        assert lines and lines[-1].startswith("error: "), f"expected an 'error: ' line last, got:\n{err[-2000:]}"
        assert sum("error: " in line for line in lines) == 1, f"expected one 'error: ' line, got:\n{err[-2000:]}"
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error: ' line, got:\n{err[-2000:]}"
    return lines[-1]


def start_logged(cmd, log: Path, cwd, niceness: int = 0) -> subprocess.Popen:
    """Starts ``cmd`` in the tests' subprocess environment, its stdout and stderr going to the file ``log``;
    ``niceness`` > 0 lowers its priority, so a watcher that must act within its next few milliseconds gets the CPU
    first on a loaded machine."""
    with open(log, "w") as sink:
        return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=subprocess_env(), stdout=sink,
                                stderr=subprocess.STDOUT, preexec_fn=(lambda: os.nice(niceness)) if niceness else None)


def kill_when(proc: subprocess.Popen, until: Union[Path, Callable[[], bool]], timeout: float, *, what: str,
              log: Path | None = None, allow_exit: bool = False, interval: float = 0.005) -> int:
    """Polls until ``until`` holds (a Path: it exists; otherwise a callable returning a bool), SIGKILLs ``proc``
    and returns its exit status (-SIGKILL when the kill landed).

    Fails the test when ``timeout`` seconds pass first, and when the run exits on its own first unless
    ``allow_exit`` (then its exit status is returned). ``proc`` is never left running."""
    ready = until.exists if isinstance(until, Path) else until
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                if allow_exit:
                    break
                tail = log.read_text()[-2000:] if log is not None else ""
                raise AssertionError(f"run exited ({proc.returncode}) before {what}:\n{tail}")
            assert time.monotonic() < deadline, f"{what} did not appear within {timeout:g} s"
            time.sleep(interval)
        else:
            proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:  # a failure above: do not leave our child running
            proc.kill()
        returncode = proc.wait(timeout=60)
    return returncode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS's choice of an ephemeral one)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log: Path, cwd, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Starts serve.py on an ephemeral port of 127.0.0.1 and waits until it answers; returns (process, base URL).
    The caller stops it (``stop_server``)."""
    import httpx
    port = free_port()
    proc = start_logged([sys.executable, Path(cwd) / "serve.py", "--port", port, *args], log, cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited ({proc.returncode}) before answering:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/info", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve.py did not answer within {timeout:g} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_IN_CREATE = 0x100
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


def _created_names(fd: int) -> list[str]:
    data, names, offset = os.read(fd, 1 << 16), [], 0
    while offset < len(data):
        _, _, _, length = _INOTIFY_EVENT.unpack_from(data, offset)
        offset += _INOTIFY_EVENT.size
        names.append(data[offset:offset + length].rstrip(b"\0").decode())
        offset += length
    return names


def kill_on_create(proc: subprocess.Popen, directory: Path, pattern: str, timeout: float, *, what: str,
                   log: Path | None = None) -> int:
    """SIGKILLs ``proc`` the moment a file matching ``pattern`` is created in ``directory`` (which must exist before
    ``proc`` writes there) and returns its exit status.

    inotify, not polling: a temp file that lives a few milliseconds (a small write, then its rename) is still
    caught while it is being written. Fails the test when ``proc`` exits first or ``timeout`` seconds pass; ``proc``
    is never left running."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, f"inotify_init1 failed: {os.strerror(ctypes.get_errno())}"
    deadline = time.monotonic() + timeout
    try:
        assert libc.inotify_add_watch(fd, os.fsencode(directory), _IN_CREATE) >= 0, os.strerror(ctypes.get_errno())
        while True:
            if select.select([fd], [], [], 0.05)[0] and \
                    any(fnmatch.fnmatch(name, pattern) for name in _created_names(fd)):
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                tail = log.read_text()[-2000:] if log is not None else ""
                raise AssertionError(f"run exited ({proc.returncode}) before {what}:\n{tail}")
            assert time.monotonic() < deadline, f"{what} did not appear within {timeout:g} s"
    finally:
        os.close(fd)
        if proc.poll() is None:
            proc.kill()
        returncode = proc.wait(timeout=60)
    return returncode


@contextmanager
def served_test_client(tiny_pipeline, workdir: Path):
    """The server's app on the tiny pair, in process (FastAPI's TestClient): yields (client, pipeline)."""
    from fastapi.testclient import TestClient

    from models.server.app import create_app
    from models.server.generation import GenerationService
    from models.server.jobs import JobManager
    from models.server.serving import ServeOptions, load_served_pipeline
    opts = ServeOptions(teacher=str(tiny_pipeline.teacher), student=str(tiny_pipeline.student),
                        features=str(tiny_pipeline.features), workdir=str(workdir), cpu=True)
    pipe, info = load_served_pipeline(opts)
    jobs = JobManager(workdir, {"teacher": str(tiny_pipeline.teacher), "student": str(tiny_pipeline.student),
                                "features": str(tiny_pipeline.features)})
    with TestClient(create_app(GenerationService(pipe), jobs, info)) as client:
        yield client, pipe


def run_gallery(tiny_pipeline, repo_root, out: Path, extra: list, monkeypatch, capsys) -> tuple[int, str]:
    """test_direct_decoder.py on the tiny pair (3 samples, class 0) with ``extra`` options, in this interpreter:
    the exit code and stderr."""
    common = ["--ddpm_ckpt", tiny_pipeline.teacher, "--decoder_ckpt", tiny_pipeline.student, "--n_samples", 3,
              "--target_class", 0, "--cpu"]
    code, _, err = run_main_in_process(repo_root / "test_direct_decoder.py", [*common, *extra, "--output_dir", out],
                                       monkeypatch, capsys)
    return code, err


def gallery_panel(out: Path, name: str):
    """One of the gallery's PNG panels as a grey-level array."""
    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(Path(out) / f"{name}.png").convert("L"))
