"""generate_training_data.py: file contents, determinism, per-sample noise, kill/resume identity, CLI contract.

Cheap runs go through the script's ``__main__`` in this interpreter (argparse + run_cli, exit codes and stderr
as a user sees them); the run that is SIGKILLed is a real subprocess.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from helpers import kill_when, load_pt, one_error_line, run_main_in_process, sha256, start_logged
from models.diffusion.noise import per_sample_noise

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "generate_training_data.py"
ALL_OPTIONS = ("--ckpt", "--n_samples", "--batch_size", "--output_dir", "--sampler", "--steps", "--spacing", "--eta",
               "--no_clip", "--seed", "--shard_size", "--precision", "--compile", "--channels_last", "--cpu",
               "--dry-run")
SHARD_NAME = re.compile(r"^shard_\d{9}_\d{9}\.pt$")
ALREADY_DONE = re.compile(r"(\d+) pairs already done")


@pytest.fixture
def gen(monkeypatch, capsys):
    """Runs generate_training_data.py in-process: gen(*args) -> (exit code, stdout, stderr)."""
    return lambda *args: run_main_in_process(SCRIPT, args, monkeypatch, capsys)


def _small(teacher, out, *extra):
    return ["--ckpt", teacher, "--output_dir", out, "--cpu", "--steps", "3", *map(str, extra)]


# ---------------------------------------------------------------- the file

def test_training_data_contents(tiny_pairs, tiny_teacher_ckpt):
    data = load_pt(tiny_pairs)
    assert {"noise", "images", "n_samples", "kind", "metadata"} <= set(data)
    assert data["kind"] == "training_pairs"
    n = data["n_samples"]
    assert n == 40
    for key in ("noise", "images"):
        assert data[key].shape == (n, 1, 28, 28) and data[key].dtype == torch.float32, key
        assert torch.isfinite(data[key]).all(), key
    images = data["images"]
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.std() > 0 and not torch.equal(images[0], images[1])  # real samples, not a constant
    # Sample i's noise is the documented per-sample noise of (seed, i).
    assert torch.equal(data["noise"], per_sample_noise(0, range(n)))

    meta = data["metadata"]
    assert meta["teacher_sha256"] == sha256(tiny_teacher_ckpt)
    assert meta["sampler"] == "ddim" and meta["steps"] == 5 and meta["eta"] == 0.0 and meta["seed"] == 0
    assert meta["spacing"] in ("leading", "trailing")
    assert meta["sampler_config"] == {"name": "ddim", "steps": 5, "spacing": meta["spacing"], "eta": 0.0,
                                      "clip_x0": True}
    assert list(meta["image_range"]) == [-1.0, 1.0]
    assert {"torch", "python"} <= set(meta["versions"])
    assert meta["teacher_data_source"] == "mnist5k"


def test_images_are_the_teachers_ddim_samples(tiny_pairs, tiny_teacher_ckpt):
    """The stored image of noise z is what the teacher's DDIM sampler makes of z (not, e.g., shifted rows)."""
    from models.io.teacher_checkpoints import load_teacher
    from models.diffusion.sampling import teacher_sample
    data = load_pt(tiny_pairs)
    meta = data["metadata"]
    teacher = load_teacher(tiny_teacher_ckpt)
    rows = [0, 1, 17, 39]
    images = teacher_sample(teacher.diffusion, data["noise"][rows], "ddim", meta["steps"], 0.0, True, 0, rows,
                            spacing=meta["spacing"])
    torch.testing.assert_close(images, data["images"][rows], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- determinism and per-sample noise

def test_same_command_twice_is_bitwise_identical(tiny_pairs, tiny_teacher_ckpt, tmp_path, gen):
    """Rerunning tiny_pairs' command (another process, another batch size) gives the same bytes of tensors."""
    meta = load_pt(tiny_pairs)["metadata"]
    args = ["--ckpt", tiny_teacher_ckpt, "--output_dir", tmp_path / "again", "--cpu", "--n_samples", 40,
            "--steps", meta["steps"], "--spacing", meta["spacing"], "--seed", meta["seed"], "--batch_size", 8]
    code, _, err = gen(*args)
    assert code == 0, err
    a, b = load_pt(tiny_pairs), load_pt(tmp_path / "again" / "training_data.pt")
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["images"], b["images"])
    assert a["metadata"]["identity"] == b["metadata"]["identity"]


@pytest.fixture(scope="module")
def small_runs(tiny_teacher_ckpt, tmp_path_factory):
    """n=20 with batch 4 and batch 7, n=10, and n=10 with another seed; steps 3."""
    root = tmp_path_factory.mktemp("gen_small")
    runs = {"b4": (20, 4, 0), "b7": (20, 7, 0), "n10": (10, 4, 0), "seed1": (10, 4, 1)}
    out = {}
    # In-process through the API the script calls (the runpy fixture is function-scoped).
    from models.stages.generate import GenerateOptions, generate_training_data
    for name, (n, batch, seed) in runs.items():
        opts = GenerateOptions(ckpt=str(tiny_teacher_ckpt), n_samples=n, batch_size=batch, seed=seed, steps=3,
                               output_dir=str(root / name), cpu=True)
        generate_training_data(opts)
        out[name] = load_pt(root / name / "training_data.pt")
    return out


def test_batch_size_does_not_change_results(small_runs):
    """Noise is bitwise per-sample; images agree to float rounding only: CPU conv/GEMM kernels block a batch of 7
    differently from a batch of 4 (seen: 7.5e-6 on the shipped teacher, 0 on some CPUs), so bitwise equality across
    batch sizes is not something PyTorch promises. Same batch size is bitwise (the resume tests)."""
    a, b = small_runs["b4"], small_runs["b7"]
    assert torch.equal(a["noise"], b["noise"])
    torch.testing.assert_close(b["images"], a["images"], rtol=0, atol=1e-4)
    # The tolerance is far below any real change: another seed moves images by O(1).
    assert (small_runs["seed1"]["images"] - a["images"][:10]).abs().max() > 0.1


def test_noise_of_sample_i_depends_only_on_seed_and_i(small_runs):
    big, small, other = small_runs["b4"], small_runs["n10"], small_runs["seed1"]
    assert torch.equal(big["noise"][:10], small["noise"])
    assert torch.equal(big["images"][:10], small["images"])
    assert not torch.equal(other["noise"], small["noise"])
    assert not torch.equal(other["images"], small["images"])
    # Different samples get different noise.
    assert not torch.equal(big["noise"][0], big["noise"][1])


# ---------------------------------------------------------------- SIGKILL and resume

KILL_ARGS = ["--n_samples", "32", "--batch_size", "4", "--shard_size", "4", "--steps", "10", "--seed", "3"]


@pytest.fixture(scope="module")
def killed_gen(tiny_teacher_ckpt, tmp_path_factory) -> dict:
    """KILL_ARGS in a subprocess, SIGKILLed as soon as its first shard is on disk."""
    root = tmp_path_factory.mktemp("gen_killed")
    out = root / "run"
    args = ["--ckpt", str(tiny_teacher_ckpt), "--output_dir", str(out), "--cpu", *KILL_ARGS]
    log = root / "killed.log"
    proc = start_logged([sys.executable, SCRIPT, *args], log, cwd=REPO)
    returncode = kill_when(proc, lambda: any((out / "shards").glob("shard_*.pt")), 240, what="a shard", log=log)
    assert returncode == -signal.SIGKILL, f"the run was not killed (rc {returncode}); it outraced the poll"
    assert not (out / "training_data.pt").exists(), "the run finished before SIGKILL; make it longer"
    return {"dir": out, "args": args, "log": log}


@pytest.fixture(scope="module")
def straight_gen(tiny_teacher_ckpt, tmp_path_factory) -> Path:
    from models.stages.generate import GenerateOptions, generate_training_data
    out = tmp_path_factory.mktemp("gen_straight") / "run"
    opts = GenerateOptions(ckpt=str(tiny_teacher_ckpt), output_dir=str(out), cpu=True, n_samples=32, batch_size=4,
                           shard_size=4, steps=10, seed=3)
    generate_training_data(opts)
    return out / "training_data.pt"


def test_killed_run_leaves_only_whole_shards(killed_gen):
    out = killed_gen["dir"]
    assert not (out / "training_data.pt").exists()
    names = sorted(p.name for p in out.iterdir())
    assert set(names) <= {"shards"} | {n for n in names if n.startswith(".")}, names
    shard_names = sorted(p.name for p in (out / "shards").iterdir())
    for name in shard_names:
        assert name.startswith(".") or name == "progress.json" or SHARD_NAME.match(name), \
            f"non-hidden partial file {name}"
    shards = [n for n in shard_names if SHARD_NAME.match(n)]
    assert shards
    for name in shards:
        shard = load_pt(out / "shards" / name)
        lo, hi = int(name[6:15]), int(name[16:25])
        assert (shard["start"], shard["end"]) == (lo, hi) and hi - lo == 4
        assert shard["noise"].shape == shard["images"].shape == (4, 1, 28, 28)


def test_unfinished_run_refuses_other_settings(killed_gen, tmp_path, gen):
    work = tmp_path / "run"
    shutil.copytree(killed_gen["dir"], work)
    before = {p.name: sha256(p) for p in (work / "shards").iterdir() if p.is_file()}
    args = [a if a != str(killed_gen["dir"]) else str(work) for a in killed_gen["args"]]
    seed_at = args.index("--seed") + 1
    args[seed_at] = "4"
    code, _, err = gen(*args)
    assert code == 1
    line = one_error_line(err)
    assert "other settings" in line or "unfinished" in line, line
    assert not (work / "training_data.pt").exists()
    assert {p.name: sha256(p) for p in (work / "shards").iterdir() if p.is_file()} == before


def test_resume_after_kill_is_bitwise_identical(killed_gen, straight_gen, tmp_path, gen):
    work = tmp_path / "run"
    shutil.copytree(killed_gen["dir"], work)
    n_shards = len([p for p in (work / "shards").iterdir() if SHARD_NAME.match(p.name)])
    args = [a if a != str(killed_gen["dir"]) else str(work) for a in killed_gen["args"]]
    code, out, err = gen(*args)
    assert code == 0, err
    done = ALREADY_DONE.search(out)
    assert done, out
    assert int(done.group(1)) == 4 * n_shards > 0
    resumed, straight = load_pt(work / "training_data.pt"), load_pt(straight_gen)
    assert torch.equal(resumed["noise"], straight["noise"])
    assert torch.equal(resumed["images"], straight["images"])
    assert resumed["n_samples"] == 32
    assert not (work / "shards").exists(), "shards must be removed once training_data.pt is verified"


def test_rerun_of_completed_command(straight_gen, tiny_teacher_ckpt, gen):
    out = straight_gen.parent
    args = ["--ckpt", tiny_teacher_ckpt, "--output_dir", out, "--cpu", *KILL_ARGS]
    digest, mtime = sha256(straight_gen), straight_gen.stat().st_mtime_ns
    code, stdout, err = gen(*args)
    assert code == 0, err
    assert "nothing to do" in stdout
    assert sha256(straight_gen) == digest and straight_gen.stat().st_mtime_ns == mtime

    other = list(args)
    other[other.index("--seed") + 1] = "4"
    code, _, err = gen(*other)
    assert code == 1
    one_error_line(err)
    assert sha256(straight_gen) == digest


# ---------------------------------------------------------------- samplers and CLI contract

def test_ddpm_sampler_uses_all_timesteps(tiny_teacher_ckpt, tmp_path, gen):
    code, _, err = gen("--ckpt", tiny_teacher_ckpt, "--output_dir", tmp_path, "--cpu", "--sampler", "ddpm",
                       "--n_samples", 4, "--batch_size", 4)
    assert code == 0, err
    data = load_pt(tmp_path / "training_data.pt")
    assert data["metadata"]["sampler"] == "ddpm" and data["metadata"]["steps"] == 50
    assert data["images"].shape == (4, 1, 28, 28)
    assert torch.isfinite(data["images"]).all() and data["images"].abs().max() <= 1.0


def test_dpmpp_pairs_record_their_sampler(tiny_teacher_ckpt, tmp_path, gen):
    """--sampler dpmpp2m: the pairs are that solver's images of their noises, and the frozen config saved with them
    says so (and regenerates them)."""
    from models.io.teacher_checkpoints import load_teacher
    from models.diffusion.sampling import SamplerConfig
    code, _, err = gen(*_small(tiny_teacher_ckpt, tmp_path, "--sampler", "dpmpp2m", "--n_samples", 6,
                               "--batch_size", 4))
    assert code == 0, err
    data = load_pt(tmp_path / "training_data.pt")
    meta = data["metadata"]
    cfg = SamplerConfig.from_metadata(meta)
    assert cfg == SamplerConfig("dpmpp2m", 3, "logsnr")
    assert (meta["sampler"], meta["steps"], meta["spacing"], meta["eta"]) == ("dpmpp2m", 3, "logsnr", 0.0)
    teacher = load_teacher(tiny_teacher_ckpt)
    rows = [0, 5]
    torch.testing.assert_close(cfg.sample(teacher.diffusion, data["noise"][rows], 0, rows), data["images"][rows],
                               rtol=0, atol=1e-5)
    other = SamplerConfig("ddim", 3).sample(teacher.diffusion, data["noise"][rows])
    assert (other - data["images"][rows]).abs().max() > 1e-3  # not DDIM's images under another name


@pytest.mark.parametrize("extra, name", [(["--spacing", "leading"], "spacing"), (["--steps", 50], "steps"),
                                         (["--eta", 0.5], "eta")])
def test_bad_dpmpp_options_exit_1_with_one_line(extra, name, tiny_teacher_ckpt, tmp_path, gen):
    """The tiny teacher's T = 50 clips lambda at t = 48: 50 steps do not fit; DPM-Solver++ has no leading grid or eta."""
    code, _, err = gen(*_replace(_small(tiny_teacher_ckpt, tmp_path / "out", "--sampler", "dpmpp2m", "--n_samples", 2),
                                 extra[0], extra[1]))
    assert code == 1, err
    assert name in one_error_line(err)
    assert not (tmp_path / "out" / "training_data.pt").exists()


@pytest.mark.parametrize("flag, value, name", [("--steps", 0, "steps"), ("--steps", 51, "steps"),
                                               ("--n_samples", 0, "n_samples"), ("--batch_size", 0, "batch_size"),
                                               ("--eta", 2, "eta")])
def test_bad_values_exit_1_with_one_line(flag, value, name, tiny_teacher_ckpt, tmp_path, gen):
    args = ["--ckpt", tiny_teacher_ckpt, "--output_dir", tmp_path / "out", "--cpu", "--n_samples", 4,
            "--batch_size", 4, "--steps", 3]
    code, _, err = gen(*_replace(args, flag, value))
    assert code == 1, err
    assert name in one_error_line(err)
    assert not (tmp_path / "out" / "training_data.pt").exists()


def _replace(args: list, flag: str, value) -> list:
    if flag in args:
        i = args.index(flag)
        return args[:i] + args[i + 2:] + [flag, value]
    return args + [flag, value]


def test_missing_teacher_exits_2(tmp_path, gen):
    code, _, err = gen(*_small(tmp_path / "nope.pt", tmp_path / "out", "--n_samples", 2))
    assert code == 2
    assert "nope.pt" in one_error_line(err)


def test_truncated_teacher_exits_1(tiny_teacher_ckpt, tmp_path, gen):
    raw = Path(tiny_teacher_ckpt).read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(raw[:len(raw) // 2])
    code, _, err = gen(*_small(broken, tmp_path / "out", "--n_samples", 2))
    assert code == 1
    line = one_error_line(err)
    assert "corrupted" in line or "truncated" in line, line


def test_output_dir_that_is_a_file_exits_1(tiny_teacher_ckpt, tmp_path, gen):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    code, _, err = gen(*_small(tiny_teacher_ckpt, target, "--n_samples", 2))
    assert code == 1
    one_error_line(err)
    assert target.read_text() == "keep me"


def test_dry_run_prints_json_and_writes_nothing(tiny_teacher_ckpt, tmp_path, gen):
    out = tmp_path / "out"
    code, stdout, err = gen(*_small(tiny_teacher_ckpt, out, "--n_samples", 7, "--dry-run"))
    assert code == 0, err
    resolved = json.loads(stdout)
    assert resolved["options"]["n_samples"] == 7
    assert resolved["identity"]["steps"] == 3
    assert not out.exists()


def test_help_lists_every_option(gen):
    code, stdout, _ = gen("--help")
    assert code == 0
    missing = [opt for opt in ALL_OPTIONS if opt not in stdout]
    assert not missing, f"--help does not mention {missing}"
