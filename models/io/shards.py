"""Resumable work over N items in fixed ranges ("shards"), each written atomically.

A run's identity (whatever determines the result) is fingerprinted into progress.json; a rerun with the same
identity skips finished shards, one with another identity is refused rather than silently mixed. Each shard's
sha256 is recorded there before the shard takes its name, and checked when a rerun starts: a shard changed on disk
since (or left by an older version, without a checksum) is regenerated, never trusted. Shards are removed only after the
caller has written and verified the assembled result.

Under torchrun every rank saves its own shards into the one directory; a rank other than 0 records its checksums in
its own checksums.rankR.json (never two writers on one file), which the next start (or rank 0, before it assembles)
merges into progress.json.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch

from .checkpoints import load_checkpoint
from .errors import PipelineError
from .files import atomic_save, atomic_write_json, sha256_file


class ShardedJob:
    def __init__(self, shard_dir: Path, identity: dict, n_items: int, shard_size: int, writer: int = 0,
                 attach: bool = False):
        """``writer``: the torchrun rank saving shards through this object (0 when single). ``attach``: join the job
        rank 0 has just set up in ``shard_dir`` (no clean-up, no merge: that is rank 0's)."""
        self.dir = Path(shard_dir)
        self.n = n_items
        self.writer = writer
        self._own: dict[str, str] = {}
        fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.progress = self.dir / "progress.json"
        if attach:
            self._attach(fingerprint)
            return
        if self.progress.exists() and not any(self.dir.glob("shard_*.pt")):
            self.progress.unlink()  # a run stopped before its first shard: nothing to mix up, start afresh
            for records in self._rank_records():
                records.unlink()
        if self.progress.exists():
            self.state = json.loads(self.progress.read_text())
            if self.state["fingerprint"] != fingerprint:
                raise PipelineError(f"{self.dir} holds an unfinished run with other settings "
                                    f"({self.state['identity']}); rerun that command, or delete {self.dir}")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.state = {"fingerprint": fingerprint, "identity": identity, "shard_size": shard_size}
            atomic_write_json(self.state, self.progress)
        self.state.setdefault("sha256", {})
        self.shard_size = self.state["shard_size"]
        self.ranges = [(s, min(s + self.shard_size, n_items)) for s in range(0, n_items, self.shard_size)]
        self.refresh()

    def _attach(self, fingerprint: str) -> None:
        state = json.loads(self.progress.read_text()) if self.progress.exists() else {}
        if state.get("fingerprint") != fingerprint:
            raise PipelineError(f"{self.progress}, just written by rank 0, is not visible here: the output directory "
                                "must be on a filesystem every node shares")
        self.state = state
        self.state.setdefault("sha256", {})
        self.shard_size = self.state["shard_size"]
        self.ranges = [(s, min(s + self.shard_size, self.n)) for s in range(0, self.n, self.shard_size)]

    def _rank_records(self) -> list[Path]:
        return sorted(self.dir.glob("checksums.rank*.json"))

    def refresh(self) -> None:
        """Takes in the checksums other ranks recorded, then drops what does not match them (see _drop_untrusted).
        Only while no other rank is saving: at the start, or once every rank has finished."""
        found = self._rank_records()
        for records in found:
            self.state["sha256"].update(json.loads(records.read_text()))
        if found:
            atomic_write_json(self.state, self.progress)
            for records in found:
                records.unlink()
        self._drop_untrusted()

    def _drop_untrusted(self) -> None:
        """Deletes the shards whose bytes are not the ones recorded when they were saved, and temp files of a
        killed save; both are then regenerated like missing shards."""
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for r in self.ranges:
            path = self._path(r)
            if not path.exists():
                continue
            recorded, found = self.state["sha256"].get(path.name), sha256_file(path)
            if found != recorded:
                why = (f"sha256 {found[:12]} instead of the recorded {recorded[:12]}" if recorded
                       else "no checksum recorded")
                print(f"{path.name}: {why}; regenerating it")
                path.unlink()

    def _path(self, r: tuple[int, int]) -> Path:
        return self.dir / f"shard_{r[0]:09d}_{r[1]:09d}.pt"

    def pending(self) -> list[tuple[int, int]]:
        return [r for r in self.ranges if not self._path(r).exists()]

    @property
    def n_done(self) -> int:
        return self.n - sum(b - a for a, b in self.pending())

    def save(self, r: tuple[int, int], tensors: dict[str, torch.Tensor]) -> None:
        atomic_save({"start": r[0], "end": r[1], **tensors}, self._path(r), before_rename=self._record_checksum)

    def _record_checksum(self, tmp: Path, final: Path) -> None:
        """Before the shard takes its name, so every shard under its name has its checksum recorded."""
        self.state["sha256"][final.name] = sha256_file(tmp)
        if self.writer == 0:
            atomic_write_json(self.state, self.progress)
        else:
            self._own[final.name] = self.state["sha256"][final.name]
            atomic_write_json(self._own, self.dir / f"checksums.rank{self.writer}.json")

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
