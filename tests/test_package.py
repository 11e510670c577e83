"""The package as a newcomer meets it: every module of models/ imports on its own, and no two modules import each
other, directly or through others (a cycle makes import order matter and hides which module depends on which)."""
from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "models"


def module_names(package_dir: Path = PACKAGE_DIR) -> list[str]:
    root = package_dir.parent
    names = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def _source_path(name: str, package_dir: Path) -> Path:
    base = package_dir.parent.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imported_modules(name: str, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """The package's own modules that module `name` imports anywhere in its file (function-level imports count:
    they close a cycle as soon as the function runs)."""
    path = _source_path(name, package_dir)
    known = set(module_names(package_dir))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from .x import y` may name a module y of package x, or an attribute of module x
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


@pytest.mark.parametrize("name", module_names())
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycle_in_models():
    graph = {name: imported_modules(name) for name in module_names()}
    assert sum(map(len, graph.values())) > 20, "the import graph is implausibly small: the parser missed imports"
    cycle = import_cycle(graph)
    assert cycle is None, "import cycle in models/: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The check above can fail: a two-module package importing each other (one lazily) is reported."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from .. import a\n    from pkg.c import x\n")
    (pkg / "c.py").write_text("import os\nx = 1\n")
    graph = {name: imported_modules(name, pkg) for name in module_names(pkg)}
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg", "pkg.a", "pkg.c"}
    assert import_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    graph["pkg.sub.b"].discard("pkg.a")
    assert import_cycle(graph) is None


# ---------------------------------------------------------------- the installed package, as bench/ uses it

REPO = PACKAGE_DIR.parent


def test_bench_scripts_import_the_installed_package(tmp_path):
    """bench/ scripts find `models` through the editable install (`make` runs `pip install -e .`), not through
    sys.path edits of their own: a bench run from another directory still starts."""
    offenders = [p.name for p in sorted((REPO / "bench").glob("*.py")) if "sys.path" in p.read_text()]
    assert offenders == [], f"sys.path edits in bench/: {offenders}"
    from helpers import subprocess_env
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_class_hook.py"), "--help"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (f"{proc.stderr[-1500:]}\n(is the package installed? `make test` runs "
                                  f"`pip install -e . --no-deps`)")
    assert "--ref_features_path" in proc.stdout


def test_run_record_carries_machine_versions_and_command(tmp_path, monkeypatch):
    from models.io.records import append_run_record, software_versions
    monkeypatch.setattr(sys, "argv", ["bench/bench_x.py", "--n", "4"])
    path = tmp_path / "results" / "x.jsonl"
    first = append_run_record({"n": 4, "fd": 1.5}, path)
    append_run_record({"n": 8}, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == first and [r["n"] for r in rows] == [4, 8] and rows[0]["fd"] == 1.5
    assert rows[0]["command"] == "python bench/bench_x.py --n 4"
    assert rows[0]["versions"] == software_versions() and "-core" in rows[0]["machine"]


def test_benches_write_records_through_the_one_helper():
    """No bench assembles machine/command by hand (one helper keeps every record's provenance the same)."""
    for path in sorted((REPO / "bench").glob("*.py")):
        text = path.read_text()
        assert "append_jsonl(" not in text and '" ".join(sys.argv)' not in text, path.name


def test_records_name_reference_features_by_hash_and_rebuild_command(tmp_path):
    """A bench record names its features by sha256 and the command that rebuilds them, not by a local path."""
    import hashlib
    from models.evaluation.bench_common import features_provenance
    path = tmp_path / "features.pt"
    path.write_bytes(b"features")
    meta = {"teacher_path": "checkpoints/teacher_mnist5k.pt", "student_path": "checkpoints/student_mnist5k.pt",
            "method": "image_encoder", "attribution_rule": "shape",
            "image_encoder": {"steps": 1500, "teacher_pairs_fraction": 0.0, "seed": 0, "lr": 0.001},
            "consistency": {"generated_bottleneck_cosine_mean": 0.93}}
    record = features_provenance(path, {"metadata": meta})
    assert record["sha256"] == hashlib.sha256(b"features").hexdigest() and str(tmp_path) not in json.dumps(record)
    assert record["rebuild"] == ("python extract_reference_features.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt "
                                 "--decoder_ckpt checkpoints/student_mnist5k.pt --method image_encoder "
                                 "--encoder_steps 1500 --encoder_lr 0.001 --encoder_teacher_pairs_fraction 0.0 --seed 0 "
                                 "--attribution_rule shape --output_path FEATURES.pt")
    assert (record["encoder_steps"], record["consistency"], record["attribution_rule"]) == (1500, 0.93, "shape")
