"""checkpoints/MANIFEST.json: what each shipped or produced checkpoint is, and how to check it is intact."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import total_steps
from .io import MissingInputError, PipelineError, atomic_write_json, load_checkpoint, sha256_file

MANIFEST = Path("checkpoints/MANIFEST.json")


def describe(path: Path) -> dict:
    ckpt = load_checkpoint(path, "cpu")
    kind = ckpt.get("kind") or ("teacher (upstream format)" if "model_ema" in ckpt else "unknown")
    entry = {"kind": kind, "model_args": ckpt.get("model_args"), "step": ckpt.get("step"), "epoch": ckpt.get("epoch"),
             "data_source": ckpt.get("data_source") or ckpt.get("dataset")}
    if (ckpt.get("config") or {}).get("steps_before") and ckpt.get("step") is not None:  # an --init_from leg
        entry["steps_total"] = total_steps(ckpt)
    return entry


def add_entry(path: str, produced_by: str, manifest: Path = MANIFEST, extra: dict | None = None) -> dict:
    p = Path(path)
    entries = json.loads(manifest.read_text()) if manifest.exists() else {}
    entries[str(p)] = {"sha256": sha256_file(p), "size": p.stat().st_size, "produced_by": produced_by,
                       "added": time.strftime("%Y-%m-%d"), **describe(p), **(extra or {})}
    atomic_write_json(entries, manifest)
    return entries[str(p)]


def verify(manifest: Path = MANIFEST, only: list[str] | None = None) -> list[dict]:
    """Checks size, sha256 and loadability of every entry; raises with the first problem's fix."""
    if not manifest.exists():
        raise MissingInputError(f"{manifest} not found; run from the repository root")
    entries = json.loads(manifest.read_text())
    rows, problems = [], []
    for name, entry in entries.items():
        if only and name not in only:
            continue
        p = Path(name)
        row = {"path": name, "kind": entry.get("kind"), "size": entry["size"], "sha256": entry["sha256"][:16],
               "produced_by": entry.get("produced_by"), "status": "ok"}
        if not p.exists():
            row["status"] = "MISSING"
            problems.append((2, f"{name} is missing; restore it with `git checkout -- {name}` "
                                f"(or rerun: {entry.get('produced_by')})"))
        elif p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            row["status"] = "MISMATCH"
            problems.append((2, f"{name} does not match its manifest sha256 (corrupted or replaced); restore it "
                                f"with `git checkout -- {name}`"))
        else:
            try:
                load_checkpoint(p, "cpu")
            except PipelineError as err:
                row["status"] = "UNLOADABLE"
                problems.append((1, str(err)))
        rows.append(row)
    for r in rows:
        print(f"{r['status']:<10} {r['path']:<42} {str(r['kind']):<16} {r['size']:>10} B  sha256 {r['sha256']}  "
              f"{r['produced_by'] or ''}")
    if problems:
        code, message = max(problems, key=lambda pr: pr[0])
        raise PipelineError(message, exit_code=code)
    return rows
