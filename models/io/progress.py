"""Every stage's progress bar: tqdm on the terminal, and a machine-readable channel when a job server runs the stage.

With ``DIRECT_DECODER_PROGRESS_FILE`` set (serve.py sets it for the stages it starts), each bar appends JSON lines
there instead of drawing on the terminal: {"desc", "step", "total", "rate", "eta_s", "elapsed_s", "loss", "done"},
so a client reads step/total/rate/ETA/loss without parsing terminal escape codes.
"""
from __future__ import annotations

import json
import math
import os
import re

from tqdm import tqdm

PROGRESS_ENV = "DIRECT_DECODER_PROGRESS_FILE"
EMIT_INTERVAL_S = 0.5
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


class _ChannelBar(tqdm):
    """A tqdm whose refreshes are appended to the progress file instead of drawn."""

    def __init__(self, *args, channel: str, **kwargs):
        self._channel, self._closing, self._last_emit = channel, False, -math.inf
        self._devnull = open(os.devnull, "w")
        kwargs.update(file=self._devnull)
        super().__init__(*args, **kwargs)

    def _emit(self, done: bool = False) -> None:
        record = progress_record(self.format_dict, done)
        if record["rate"] is not None and not math.isfinite(record["rate"]):
            record["rate"] = None
        with open(self._channel, "a") as f:
            f.write(json.dumps(record) + "\n")

    def display(self, msg=None, pos=None):
        # set_postfix refreshes on every call, so the channel keeps its own pace: at most two records a second
        now = self._time()
        if msg is None and not self.disable and not self._closing and now - self._last_emit >= EMIT_INTERVAL_S:
            self._last_emit = now
            self._emit()
        return True

    def close(self):
        if not self.disable and not self._closing:
            self._closing = True
            self._emit(done=True)
        super().close()
        self._devnull.close()


def progress_bar(*args, **kwargs) -> tqdm:
    """tqdm(...) for the terminal; the JSON channel instead when ``DIRECT_DECODER_PROGRESS_FILE`` is set."""
    channel = os.environ.get(PROGRESS_ENV)
    if channel:
        return _ChannelBar(*args, channel=channel, **kwargs)
    return tqdm(*args, **kwargs)
