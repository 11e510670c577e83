"""Every stage's progress bar: tqdm on a terminal, plain lines in a log file, and a machine-readable channel when
a job server runs the stage.

- stderr a terminal: tqdm's bar, redrawn in place.
- stderr a file or pipe (`make demo > demo.log 2>&1`, a batch job): one plain line at the start, then at most one
  every ``DIRECT_DECODER_LOG_INTERVAL`` seconds (default 30), and one at the end: step/total, rate, ETA, loss.
  *Why:* a redrawn bar in a file is thousands of carriage-return redraws, unreadable in an overnight log.
- ``DIRECT_DECODER_PROGRESS_FILE`` set (serve.py sets it for the stages it starts): each bar appends JSON lines
  there instead: {"desc", "step", "total", "rate", "eta_s", "elapsed_s", "loss", "done"}, so a client reads
  step/total/rate/ETA/loss without parsing terminal escape codes.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Callable

from tqdm import tqdm

PROGRESS_ENV = "DIRECT_DECODER_PROGRESS_FILE"
LOG_INTERVAL_ENV = "DIRECT_DECODER_LOG_INTERVAL"
EMIT_INTERVAL_S = 0.5
LOG_INTERVAL_S = 30.0
_LOSS = re.compile(r"(?:^|[ ,])loss=([-+0-9.eE]+|nan|inf)")


def progress_record(format_dict: dict, done: bool = False) -> dict:
    """One progress event from tqdm's ``format_dict``: the rate falls back to steps / elapsed, the ETA follows."""
    n, total, elapsed = format_dict["n"], format_dict.get("total"), format_dict.get("elapsed") or 0.0
    rate = format_dict.get("rate") or (n / elapsed if elapsed > 0 else None)
    eta = (total - n) / rate if rate and total else None
    loss = _LOSS.search(format_dict.get("postfix") or "")
    return {"desc": format_dict.get("prefix") or "", "step": n, "total": total,
            "rate": round(rate, 4) if rate else None, "eta_s": round(eta, 2) if eta is not None else None,
            "elapsed_s": round(elapsed, 3), "loss": float(loss.group(1)) if loss else None, "done": done}


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(record: dict, unit: str = "step") -> str:
    """One plain log line: 'desc: 120/300 (40%), 2.31 step/s, 0:51 elapsed, ETA 1:18, loss 0.02173'."""
    step, total = record["step"], record["total"]
    parts = [f"{step}/{total} ({100 * step / total:.0f}%)" if total else f"{step}"]
    if record["rate"] is not None:
        parts.append(f"{record['rate']:.3g} {unit}/s")
    parts.append(f"{_duration(record['elapsed_s'])} elapsed")
    if record["done"]:
        parts.append("done")
    elif total:
        parts.append(f"ETA {_duration(record['eta_s'])}")
    if record["loss"] is not None:
        parts.append(f"loss {record['loss']:.4g}")
    desc = record["desc"].rstrip(": ")
    return f"{desc}: {', '.join(parts)}" if desc else ", ".join(parts)


class _PacedBar(tqdm):
    """A tqdm that draws nothing: it hands a progress record to ``emit`` every ``interval`` seconds and at close."""

    def __init__(self, *args, emit: Callable[[dict, str], None], interval: float, **kwargs):
        self._emit_record, self._interval = emit, interval
        self._closing, self._last_emit = False, -math.inf
        self._devnull = open(os.devnull, "w")
        kwargs.update(file=self._devnull)
        super().__init__(*args, **kwargs)

    def _emit(self, done: bool = False) -> None:
        record = progress_record(self.format_dict, done)
        if record["rate"] is not None and not math.isfinite(record["rate"]):
            record["rate"] = None
        self._emit_record(record, self.unit)

    def display(self, msg=None, pos=None):
        # set_postfix refreshes on every call, so the bar keeps its own pace
        now = self._time()
        if msg is None and not self.disable and not self._closing and now - self._last_emit >= self._interval:
            self._last_emit = now
            self._emit()
        return True

    def close(self):
        if not self.disable and not self._closing:
            self._closing = True
            self._emit(done=True)
        super().close()
        self._devnull.close()


def _append_json_line(channel: str) -> Callable[[dict, str], None]:
    def emit(record: dict, unit: str) -> None:
        with open(channel, "a") as f:
            f.write(json.dumps(record) + "\n")
    return emit


def _print_line(stream) -> Callable[[dict, str], None]:
    def emit(record: dict, unit: str) -> None:
        print(progress_line(record, unit), file=stream, flush=True)
    return emit


def _log_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(LOG_INTERVAL_ENV, LOG_INTERVAL_S)))
    except ValueError:
        return LOG_INTERVAL_S


def progress_bar(*args, **kwargs) -> tqdm:
    """tqdm(...) for a terminal; the JSON channel when ``DIRECT_DECODER_PROGRESS_FILE`` is set; plain lines when
    stderr is a file or a pipe."""
    channel = os.environ.get(PROGRESS_ENV)
    if channel:
        return _PacedBar(*args, emit=_append_json_line(channel), interval=EMIT_INTERVAL_S, **kwargs)
    stream = kwargs.get("file") or sys.stderr
    if not kwargs.get("disable") and not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.pop("file", None)
        return _PacedBar(*args, emit=_print_line(stream), interval=_log_interval(), **kwargs)
    return tqdm(*args, **kwargs)
