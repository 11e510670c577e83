"""The upstream MNISTDiffusion fixture rule: a checkout without ../shared skips the tests that need the fixture, with
the reason; CI (CI=true) fails them instead, so a CI run never passes by skipping."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import UPSTREAM_CKPT, subprocess_env, upstream_fixture_problem

REPO = Path(__file__).resolve().parents[1]
NEEDS_FIXTURE = "tests/test_teacher.py::test_infer_config_from_either_weight_set"


def _reason(path: Path) -> str:
    return f"upstream MNISTDiffusion fixture not found at {path}: clone with shared/ beside the checkout (CI has it)"


def test_complete_fixture_is_no_problem(tmp_path):
    (tmp_path / UPSTREAM_CKPT).write_bytes(b"x")
    (tmp_path / "golden.pt").write_bytes(b"x")
    assert upstream_fixture_problem(tmp_path, {}) is None
    assert upstream_fixture_problem(tmp_path, {"CI": "true"}) is None


@pytest.mark.parametrize("env, action", [({}, "skip"), ({"CI": "false"}, "skip"), ({"CI": ""}, "skip"),
                                         ({"CI": "true"}, "fail"), ({"CI": "1"}, "fail")])
def test_missing_fixture_skips_except_in_ci(tmp_path, env, action):
    (tmp_path / "golden.pt").write_bytes(b"x")  # half a fixture is no fixture
    assert upstream_fixture_problem(tmp_path, env) == (action, _reason(tmp_path))


@pytest.mark.parametrize("ci", [False, True])
def test_a_run_without_shared(tmp_path, ci):
    """A test that needs the fixture, in a fresh pytest run whose fixture folder is absent."""
    missing = tmp_path / "shared" / "fixtures" / "upstream_mnistdiffusion"
    env = {k: v for k, v in subprocess_env().items() if k != "CI"} | {"DIRECT_DECODER_UPSTREAM_FIXTURE": str(missing)}
    if ci:
        env["CI"] = "true"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
                           NEEDS_FIXTURE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = " ".join(proc.stdout.split())  # pytest wraps long reasons
    assert _reason(missing) in out, proc.stdout[-3000:]
    if ci:
        assert proc.returncode == 1 and "1 error" in out and "skipped" not in out, proc.stdout[-3000:]
    else:
        assert proc.returncode == 0 and "1 skipped" in out and "passed" not in out, proc.stdout[-3000:]
