"""Verify the shipped files against checkpoints/MANIFEST.json: each checkpoint (size, sha256, loads) and each of its
records (size, sha256). Exit 0 if all are intact, 2 if one is missing or does not match, 1 if one does not load.

With --add, record a checkpoint and the files beside it named after it (NAME.json, NAME_*) instead, replacing what
the manifest said about an earlier file of that name:
    python verify_models.py --add checkpoints/student_mnist5k.pt --produced_by "python train_direct_decoder.py ..."
"""
from pathlib import Path

from models.io.cli import ArgumentParser
from models.io.errors import run_cli
from models.io.manifest import MANIFEST, RECORD, add_entry, verify


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="*", help="check only these manifest entries (default: all)")
    p.add_argument("--manifest", default=str(MANIFEST), help="manifest file (paths in it are relative to the "
                                                             "working directory: run from the repository root)")
    p.add_argument("--add", metavar="PATH", help="record checkpoint PATH and its records instead of verifying")
    p.add_argument("--produced_by", default="", help="with --add: the command that produced PATH")
    p.add_argument("--note", default="", help="with --add: what PATH is, if its name does not say (empty: none)")
    a = p.parse_args()
    if a.add:
        entry = add_entry(a.add, a.produced_by, Path(a.manifest), {"note": a.note} if a.note else None)
        print(f"verify_models: recorded {a.add} ({entry['kind']}, sha256 {entry['sha256'][:16]}) in {a.manifest}")
        return
    rows = verify(Path(a.manifest), a.paths or None)
    records = sum(r["kind"] == RECORD for r in rows)
    print(f"verify_models: {len(rows) - records} checkpoint(s) intact" +
          (f", with {records} record file(s)" if records else ""))


if __name__ == "__main__":
    run_cli(main)
