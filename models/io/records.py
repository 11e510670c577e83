"""Benchmark records: the machine, the software versions and the command line beside each result."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from .files import append_jsonl


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
