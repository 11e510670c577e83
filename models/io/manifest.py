"""The one writer of checkpoint manifests, and their check.

Two kinds of file, sharing one identity (path, sha256, size):
- CKPT.json beside a checkpoint (write_checkpoint_record): how it was made and how good it is, written by
  train_classifier.py and bench/teacher_manifest.py;
- checkpoints/MANIFEST.json (add_entry, verify): every shipped file, each checkpoint with its records (the files
  beside it whose names start with its own), so verify_models.py can tell that none is missing or corrupted.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoints import load_checkpoint
from .errors import MissingInputError, PipelineError
from .files import atomic_write_json, sha256_file
from .teacher_checkpoints import total_steps

MANIFEST = Path("checkpoints/MANIFEST.json")
RECORD = "record"  # the kind of a MANIFEST entry that is a checkpoint's record (checked by hash, not loaded)


def file_identity(path: Path) -> dict:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def write_checkpoint_record(ckpt_path: str | Path, fields: dict, out: str | Path | None = None) -> Path:
    """Writes CKPT.json (or `out`): the checkpoint's path, sha256 and size_bytes, then `fields`."""
    ckpt = Path(ckpt_path)
    identity = file_identity(ckpt)
    out = Path(out) if out else ckpt.with_suffix(".json")
    atomic_write_json({**fields, "path": str(ckpt), "sha256": identity["sha256"], "size_bytes": identity["size"]},
                      out)
    return out


def describe(path: Path) -> dict:
    ckpt = load_checkpoint(path, "cpu")
    kind = ckpt.get("kind") or ("teacher (upstream format)" if "model_ema" in ckpt else "unknown")
    entry = {"kind": kind, "model_args": ckpt.get("model_args"), "step": ckpt.get("step"), "epoch": ckpt.get("epoch"),
             "data_source": ckpt.get("data_source") or ckpt.get("dataset")}
    if (ckpt.get("config") or {}).get("steps_before") and ckpt.get("step") is not None:  # an --init_from leg
        entry["steps_total"] = total_steps(ckpt)
    return entry


def records_of(ckpt: Path) -> list[Path]:
    """The files beside a checkpoint named after it (NAME.json, NAME_*), other checkpoints and the records of a
    checkpoint with a longer name excluded (classifier_mnist5k_audit.json belongs to classifier_mnist5k_audit.pt)."""
    siblings = [p for p in ckpt.parent.iterdir() if p.is_file() and not p.name.startswith(".")]
    longer = [p.stem for p in siblings if p.suffix == ".pt" and p.stem.startswith(ckpt.stem + "_")]

    def named_after(p: Path, stem: str) -> bool:
        return p.stem == stem or p.name.startswith(stem + "_")

    return sorted(p for p in siblings if p.suffix != ".pt" and named_after(p, ckpt.stem)
                  and not any(named_after(p, stem) for stem in longer))


def add_entry(path: str, produced_by: str, manifest: Path = MANIFEST, extra: dict | None = None) -> dict:
    """Records a checkpoint and its records in the manifest, replacing what it recorded for an earlier file of that
    name (a record no longer beside it is dropped); the date added is kept while the checkpoint is unchanged."""
    p = Path(path)
    entries = json.loads(manifest.read_text()) if manifest.exists() else {}
    entries = {name: e for name, e in entries.items() if e.get("record_of") != str(p)}
    identity = file_identity(p)
    earlier = entries.get(str(p), {})
    added = earlier["added"] if earlier.get("sha256") == identity["sha256"] else time.strftime("%Y-%m-%d")
    entries[str(p)] = {**identity, "produced_by": produced_by, "added": added, **describe(p), **(extra or {})}
    for record in records_of(p):
        entries[str(record)] = {**file_identity(record), "kind": RECORD, "record_of": str(p)}
    atomic_write_json(entries, manifest)
    return entries[str(p)]


def verify(manifest: Path = MANIFEST, only: list[str] | None = None) -> list[dict]:
    """Checks size and sha256 of every entry, and that each checkpoint loads; raises with the first problem's fix.
    Files in the manifest's folder that it does not list are shown as `unlisted` (not checked, not an error)."""
    if not manifest.exists():
        raise MissingInputError(f"{manifest} not found; run from the repository root")
    entries = json.loads(manifest.read_text())
    rows, problems = [], []
    for name, entry in entries.items():
        if only and name not in only:
            continue
        p = Path(name)
        made_by = f"record of {entry['record_of']}" if entry.get("kind") == RECORD else entry.get("produced_by")
        row = {"path": name, "kind": entry.get("kind"), "size": entry["size"], "sha256": entry["sha256"][:16],
               "produced_by": made_by, "status": "ok"}
        if not p.exists():
            row["status"] = "MISSING"
            problems.append((2, f"{name} is missing; restore it with `git checkout -- {name}` "
                                f"(or rerun: {made_by})"))
        elif p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            row["status"] = "MISMATCH"
            problems.append((2, f"{name} does not match its manifest sha256 (corrupted or replaced); restore it "
                                f"with `git checkout -- {name}`"))
        elif entry.get("kind") != RECORD:
            try:
                load_checkpoint(p, "cpu")
            except PipelineError as err:
                row["status"] = "UNLOADABLE"
                problems.append((1, str(err)))
        rows.append(row)
    for r in rows:
        print(f"{r['status']:<10} {r['path']:<50} {str(r['kind']):<16} {r['size']:>10} B  sha256 {r['sha256']}  "
              f"{r['produced_by'] or ''}")
    if not only:
        for p in unlisted(manifest, entries):
            print(f"{'unlisted':<10} {str(p):<50} not in {manifest}: not checked (record it with "
                  f"`python verify_models.py --add {p}`)")
    if problems:
        code, message = max(problems, key=lambda pr: pr[0])
        raise PipelineError(message, exit_code=code)
    return rows


def unlisted(manifest: Path, entries: dict) -> list[Path]:
    listed = {Path(name) for name in entries} | {manifest}
    return sorted(p for p in manifest.parent.iterdir()
                  if p.is_file() and p not in listed and not p.name.startswith("."))
