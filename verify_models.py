"""List the known checkpoints (path, size, sha256, kind, what produced them) and verify them against
checkpoints/MANIFEST.json. Exit 0 if all are intact, 2 if one is missing or does not match."""

from models.cli import ArgumentParser
from models.io import run_cli
from models.manifest import MANIFEST, add_entry, verify


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="*", help="check only these manifest entries (default: all)")
    p.add_argument("--manifest", default=str(MANIFEST), help="manifest file")
    p.add_argument("--add", metavar="PATH", help="record PATH in the manifest instead of verifying")
    p.add_argument("--produced_by", default="", help="with --add: the command that produced PATH")
    a = p.parse_args()
    from pathlib import Path
    if a.add:
        entry = add_entry(a.add, a.produced_by, Path(a.manifest))
        print(f"verify_models: recorded {a.add} ({entry['kind']}, sha256 {entry['sha256'][:16]})")
        return
    rows = verify(Path(a.manifest), a.paths or None)
    print(f"verify_models: {len(rows)} checkpoint(s) intact")


if __name__ == "__main__":
    run_cli(main)
