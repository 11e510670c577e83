"""Resumable work over N items in fixed ranges ("shards"), each written atomically.

A run's identity (whatever determines the result) is fingerprinted into progress.json; a rerun with the same
identity skips finished shards, one with another identity is refused rather than silently mixed. Shards are
removed only after the caller has written and verified the assembled result.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch

from .io import PipelineError, atomic_save, atomic_write_json, load_checkpoint


class ShardedJob:
    def __init__(self, shard_dir: Path, identity: dict, n_items: int, shard_size: int):
        self.dir = Path(shard_dir)
        self.n = n_items
        fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        progress = self.dir / "progress.json"
        if progress.exists():
            state = json.loads(progress.read_text())
            if state["fingerprint"] != fingerprint:
                raise PipelineError(f"{self.dir} holds an unfinished run with other settings "
                                    f"({state['identity']}); rerun that command, or delete {self.dir}")
            shard_size = state["shard_size"]
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json({"fingerprint": fingerprint, "identity": identity, "shard_size": shard_size}, progress)
        self.shard_size = shard_size
        self.ranges = [(s, min(s + shard_size, n_items)) for s in range(0, n_items, shard_size)]

    def _path(self, r: tuple[int, int]) -> Path:
        return self.dir / f"shard_{r[0]:09d}_{r[1]:09d}.pt"

    def pending(self) -> list[tuple[int, int]]:
        return [r for r in self.ranges if not self._path(r).exists()]

    @property
    def n_done(self) -> int:
        return self.n - sum(b - a for a, b in self.pending())

    def save(self, r: tuple[int, int], tensors: dict[str, torch.Tensor]) -> None:
        atomic_save({"start": r[0], "end": r[1], **tensors}, self._path(r))

    def iter_shards(self) -> Iterator[dict]:
        for r in self.ranges:
            shard = load_checkpoint(self._path(r), "cpu", what="shard")
            if (shard["start"], shard["end"]) != r:
                raise PipelineError(f"{self._path(r).name} is inconsistent; delete it and rerun to regenerate it")
            yield shard

    def assemble(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Concatenates the shards' tensors into preallocated outputs (one shard in memory at a time)."""
        out: dict[str, torch.Tensor] = {}
        for shard in self.iter_shards():
            lo, hi = shard["start"], shard["end"]
            for key in keys:
                value = shard[key]
                if value.shape[0] != hi - lo:
                    raise PipelineError(f"shard {lo}-{hi} has {value.shape[0]} rows of {key}; delete it and rerun")
                if key not in out:
                    out[key] = torch.empty((self.n, *value.shape[1:]), dtype=value.dtype)
                out[key][lo:hi] = value
        return out

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
