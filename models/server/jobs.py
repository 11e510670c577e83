"""Long stages as subprocesses running the existing scripts: start, watch, cancel, resume, and stream their events.

Each job has a directory WORKDIR/jobs/ID with the script's output (log.txt) and its progress channel
(progress.jsonl, see models/io/progress.py). Events are read back from those files, so any number of clients can follow
a job, from its start, and a restarted server still has every past job's log.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Optional

from ..io.errors import PipelineError
from ..io.progress import PROGRESS_ENV
from .db import FINISHED, RUNNING, JobStore
from .stages import build_command, has_resume_flag

CANCEL_GRACE_S = 5.0
POLL_S = 0.2
RESUMABLE = ("interrupted", "failed", "cancelled")


class JobNotFound(PipelineError):
    pass


class JobStateError(PipelineError):
    """An action that does not fit the job's state (cancel a finished job, resume a running one): 409."""


class JobManager:
    def __init__(self, workdir: Path, served: dict[str, str]):
        self.workdir = Path(workdir).resolve()  # the stages run with it as their cwd: every path must be absolute
        self.served = served
        (self.workdir / "jobs").mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.workdir / "jobs.sqlite")
        self._procs: dict[str, subprocess.Popen] = {}
        self._cancelled: set[str] = set()
        self._stopping = False  # set by shutdown: jobs ending then were interrupted, not failed
        self._lock = threading.Lock()
        self._mark_interrupted()

    def job_dir(self, job_id: str) -> Path:
        return self.workdir / "jobs" / job_id

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def _mark_interrupted(self) -> None:
        """Jobs recorded as running belong to a server that is gone: stop what is left of them, mark them
        interrupted (resumable)."""
        for job in self.store.running():
            _kill_leftover(job)
            message = f"the server stopped while this job ran; POST /v1/jobs/{job['id']}/resume continues it"
            self.store.update(job["id"], status="interrupted", finished=time.time(), error=message)
            self._log(job["id"], f"[serve] {message}")

    def start(self, stage: str, options: dict) -> dict:
        command = build_command(stage, options, self.workdir, self.served)
        job_id = uuid.uuid4().hex[:12]
        self.job_dir(job_id).mkdir(parents=True)
        self.store.insert(job_id, stage, options, command)
        self._launch(job_id, command)
        return self.get(job_id)

    def resume(self, job_id: str) -> dict:
        job = self.get(job_id)
        if job["status"] not in RESUMABLE:
            raise JobStateError(f"job {job_id} is {job['status']}; only {', '.join(RESUMABLE)} jobs can be resumed")
        command = list(job["command"])
        if has_resume_flag(job["stage"]) and "--resume" not in command:
            command.append("--resume")  # train resumes with --resume; the other stages resume by rerunning
        attempts = job["attempts"] + 1
        self.store.update(job_id, command=command, attempts=attempts, status=RUNNING, finished=None, exit_code=None,
                          error=None, summary=None)
        self._log(job_id, f"[serve] resuming (attempt {attempts})")
        self._launch(job_id, command)
        return self.get(job_id)

    def _launch(self, job_id: str, command: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{PROGRESS_ENV: str(self.job_dir(job_id) / "progress.jsonl")})
        with open(self.job_dir(job_id) / "log.txt", "ab") as log:
            try:
                proc = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, process_group=0)
            except OSError as err:
                self.store.update(job_id, status="failed", finished=time.time(), error=f"could not start: {err}")
                return
        with self._lock:
            self._procs[job_id] = proc
        self.store.update(job_id, pid=proc.pid, started=time.time())
        threading.Thread(target=self._watch, args=(job_id, proc), daemon=True, name=f"job-{job_id}").start()

    def _watch(self, job_id: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self._lock:
            self._procs.pop(job_id, None)
            cancelled = job_id in self._cancelled
            self._cancelled.discard(job_id)
        if self._stopping:
            return  # shutdown records it as interrupted
        lines = [line for line in self.log_text(job_id).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        status = "succeeded" if code == 0 else "cancelled" if cancelled else "failed"
        error = None
        if status != "succeeded":
            error = "cancelled" if cancelled else errors[-1][len("error: "):] if errors else \
                f"exited with code {code}" + (f": {lines[-1]}" if lines else "")
        summary = next((line for line in reversed(lines) if not line.startswith("[serve]")), None) \
            if status == "succeeded" else None
        self.store.update(job_id, status=status, exit_code=code, finished=time.time(), summary=summary, error=error)

    def cancel(self, job_id: str) -> dict:
        job = self.get(job_id)
        with self._lock:
            proc = self._procs.get(job_id)
            if proc is not None:
                self._cancelled.add(job_id)
        if job["status"] != RUNNING or proc is None:
            raise JobStateError(f"job {job_id} is {job['status']}, not running")
        _signal_group(proc.pid, signal.SIGINT)  # the stages stop on Ctrl-C between atomic writes
        try:
            proc.wait(timeout=CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        self._wait_recorded(job_id)
        return self.get(job_id)

    def _wait_recorded(self, job_id: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.store.get(job_id)["status"] == RUNNING and time.monotonic() < deadline:
            time.sleep(0.02)

    def shutdown(self) -> None:
        """Server stopping: its jobs stop with it (recorded as interrupted, resumable)."""
        with self._lock:
            self._stopping = True
            procs = dict(self._procs)
        for job_id, proc in procs.items():
            _signal_group(proc.pid, signal.SIGKILL)
        for job_id, proc in procs.items():
            proc.wait()
            self.store.update(job_id, status="interrupted", finished=time.time(),
                              error=f"the server stopped while this job ran; POST /v1/jobs/{job_id}/resume continues it")
        self.store.close()

    # -- reading --------------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict:
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        return self._public(job)

    def list(self) -> list[dict]:
        return [self._public(job) for job in self.store.list()]

    def _public(self, job: dict) -> dict:
        progress = _last_line(self.job_dir(job["id"]) / "progress.jsonl")
        return {**{k: job[k] for k in ("id", "stage", "options", "command", "status", "created", "started",
                                      "finished", "exit_code", "attempts", "summary", "error")},
                "progress": json.loads(progress) if progress else None,
                "events_url": f"/v1/jobs/{job['id']}/events"}

    def log_text(self, job_id: str) -> str:
        path = self.job_dir(job_id) / "log.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def _log(self, job_id: str, line: str) -> None:
        self.job_dir(job_id).mkdir(parents=True, exist_ok=True)
        with open(self.job_dir(job_id) / "log.txt", "a") as f:
            f.write(line + "\n")

    async def events(self, job_id: str) -> AsyncIterator[dict]:
        """Server-sent events of one job from its start: status, then log and progress as they come, then one
        final result or error event once the job has ended and its files are drained."""
        job = self.get(job_id)
        yield {"event": "status", "data": json.dumps(job)}
        tails = {"log": _Tail(self.job_dir(job_id) / "log.txt"),
                 "progress": _Tail(self.job_dir(job_id) / "progress.jsonl")}
        while True:
            finished = self.store.get(job_id)["status"] in FINISHED
            for line in tails["log"].read_lines(final=finished):
                yield {"event": "log", "data": json.dumps({"line": line})}
            for line in tails["progress"].read_lines(final=finished):
                yield {"event": "progress", "data": line}
            if finished:
                job = self.get(job_id)
                kind = "result" if job["status"] == "succeeded" else "error"
                yield {"event": kind, "data": json.dumps(job)}
                return
            await asyncio.sleep(POLL_S)


class _Tail:
    """New complete lines of a growing file (with ``final``, the unterminated last one too)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def read_lines(self, final: bool = False) -> list[str]:
        if self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            self.offset += len(chunk)
            self.partial += chunk
        *lines, self.partial = self.partial.split(b"\n")
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        return [line.decode(errors="replace").rstrip("\r") for line in lines if line.strip()]


def _last_line(path: Path) -> Optional[str]:
    if not path.exists():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    return lines[-1].decode() if lines else None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # started with process_group=0: its process group id is its pid
    except ProcessLookupError:
        pass


def _kill_leftover(job: dict) -> None:
    """A job process that outlived its server (killed with SIGKILL) is stopped, if that pid still runs its
    command: it would otherwise race the resumed run for the same files."""
    pid = job.get("pid")
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if [part.decode(errors="replace") for part in cmdline if part] == job["command"]:
        _signal_group(pid, signal.SIGKILL)
        for _ in range(100):  # until it is gone or a zombie (whose cmdline is empty)
            try:
                if not Path(f"/proc/{pid}/cmdline").read_bytes():
                    break
            except OSError:
                break
            time.sleep(0.05)

