"""extract_reference_features.py: what reference_features.pt holds, that each row is the student's bottleneck at
that image's latent, --fp16 / --no_latents, bit-exact resume after SIGKILL, and how the dataset is chosen."""
from __future__ import annotations

import math
import signal
import sys
import warnings

import pytest
import torch

import models.data
import models.features
from helpers import kill_when, load_pt, one_error_line, start_logged, use_cached_mnist5k
from models.checkpoint import load_teacher
from models.features import FeatureOptions, extract_reference_features, psnr
from models.io import MissingInputError, run_cli, sha256_file
from models.samplers import ddim_invert, ddim_timesteps
from models.student import load_student

N = 120  # --limit of the tiny feature run (conftest TINY_FEATURE_ARGS)


def _arg(args: list, name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture(scope="module")
def ref(tiny_features) -> dict:
    return load_pt(tiny_features)


@pytest.fixture(scope="module")
def student(tiny_student):
    return load_student(tiny_student)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_ckpt):
    return load_teacher(tiny_teacher_ckpt)


@pytest.fixture
def cached_dataset(monkeypatch, mnist5k):
    """In-process runs read mnist5k from the session cache (the CSV parse costs seconds of CPU)."""
    return use_cached_mnist5k(monkeypatch, models.features, mnist5k)


# ---------------------------------------------------------------- contents of the file

def test_file_layout(ref, student, tiny_teacher_ckpt, tiny_student, mnist5k, tiny_pipeline):
    assert ref["kind"] == "reference_features"
    feats = ref["features"]
    assert feats.dtype == torch.float32
    assert tuple(feats.shape) == (N, *student.decoder.bottleneck_shape)
    assert tuple(feats.shape[2:]) == (7, 7)
    assert torch.isfinite(feats).all() and feats.abs().sum() > 0
    assert torch.equal(ref["labels"], mnist5k.labels[:N])
    assert torch.equal(ref["indices"], torch.arange(N))
    assert tuple(ref["latents"].shape) == (N, 1, 28, 28) and ref["latents"].dtype == torch.float32
    assert tuple(ref["reconstruction_psnr_db"].shape) == (N,)
    assert torch.isfinite(ref["reconstruction_psnr_db"]).all()

    meta = ref["metadata"]
    assert meta["dataset"] == "mnist5k" and meta["split"] == "train" and meta["n"] == N
    assert meta["teacher_sha256"] == sha256_file(tiny_teacher_ckpt)
    assert meta["student_sha256"] == sha256_file(tiny_student)
    assert "ddim_inversion" in meta["method"]
    assert meta["inversion_steps"] == int(_arg(tiny_pipeline.feature_args, "--inversion_steps")) == 3
    # the inversion ends where the student's noise lives: the first step of the grid that made its training pairs
    pairs = student.checkpoint["training_data"]["metadata"]
    start = ddim_timesteps(student.decoder.teacher_config.timesteps, pairs["steps"], pairs["spacing"])[0]
    assert meta["inversion_timesteps"][-1] == meta["latent_timestep"] == start
    assert meta["inversion_timesteps"][0] == 0 and len(meta["inversion_timesteps"]) == 3
    assert meta["bottleneck_shape"] == list(student.decoder.bottleneck_shape)
    assert meta["dtype"] == "float32"
    cons = meta["consistency"]
    assert -1.0 <= cons["generated_bottleneck_cosine_mean"] <= 1.0
    assert cons["n_generated"] == int(_arg(tiny_pipeline.feature_args, "--consistency_samples"))
    assert math.isfinite(cons["reconstruction_psnr_db_mean"])
    assert cons["reconstruction_psnr_db_mean"] == pytest.approx(ref["reconstruction_psnr_db"].mean().item(), rel=1e-5)


def test_features_are_student_bottleneck_at_stored_latents(ref, student, tiny_pipeline):
    # Recomputed exactly as the extraction batches them (--batch_size 40): bit-for-bit the same numbers. (The tiny
    # student's bottleneck barely varies between inputs, so a tolerance-based comparison could not tell rows apart.)
    batch = int(_arg(tiny_pipeline.feature_args, "--batch_size"))
    with torch.inference_mode():
        for lo in (0, N - batch):
            _, h, steered = student.decoder.generate(ref["latents"][lo:lo + batch])
            assert torch.equal(h, steered)
            assert torch.equal(h, ref["features"][lo:lo + batch]), f"rows {lo}..{lo + batch - 1}"
        rows = torch.tensor([0, 1, 41, 77, N - 1])
        torch.testing.assert_close(student.decoder.bottleneck(ref["latents"][rows]), ref["features"][rows],
                                   rtol=1e-4, atol=1e-6)


def test_latents_are_ddim_inversions_of_the_images(ref, teacher, student, mnist5k):
    rows = torch.tensor([3, 60, N - 2])
    meta = ref["metadata"]
    x = mnist5k.images[rows]
    with torch.inference_mode():
        z = ddim_invert(teacher.diffusion.predict_noise, x, teacher.diffusion.alphas_cumprod,
                        meta["inversion_steps"], timesteps=meta["inversion_timesteps"])
        recon = student.decoder(z).float().clamp(-1, 1)
    torch.testing.assert_close(z, ref["latents"][rows], rtol=1e-4, atol=1e-4)
    # distinct images have distinct latents, so this pins row i to image i
    assert (ref["latents"][rows[0]] - ref["latents"][rows[1]]).abs().max() > 0.1
    torch.testing.assert_close(psnr(recon, x), ref["reconstruction_psnr_db"][rows], rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- options

def test_fp16_and_no_latents(tmp_path, ref, tiny_teacher_ckpt, tiny_student, cached_dataset):
    out = tmp_path / "f16.pt"
    opts = FeatureOptions(ddpm_ckpt=str(tiny_teacher_ckpt), decoder_ckpt=str(tiny_student), output_path=str(out),
                          dataset="mnist5k", limit=40, inversion_steps=3, batch_size=40, consistency_samples=0,
                          fp16=True, store_latents=False, cpu=True)
    extract_reference_features(opts)
    got = load_pt(out)
    assert got["features"].dtype == torch.float16 and got["metadata"]["dtype"] == "float16"
    assert tuple(got["features"].shape) == (40, *ref["features"].shape[1:])
    assert "latents" not in got
    torch.testing.assert_close(got["features"].float(), ref["features"][:40], rtol=2e-3, atol=2e-3)
    assert torch.equal(got["labels"], ref["labels"][:40])
    assert not out.with_name(out.name + ".shards").exists()


def test_default_dataset_is_the_teachers(tmp_path, tiny_teacher_ckpt, tiny_student, cached_dataset, teacher):
    assert teacher.checkpoint.get("data_source") == "mnist5k"
    opts = FeatureOptions(ddpm_ckpt=str(tiny_teacher_ckpt), decoder_ckpt=str(tiny_student),
                          output_path=str(tmp_path / "r.pt"), limit=8, cpu=True)
    assert opts.dataset is None
    resolved = extract_reference_features(opts, dry_run=True)
    assert resolved["identity"]["dataset"] == "mnist5k" and cached_dataset == ["mnist5k"]
    assert not (tmp_path / "r.pt").exists()


@pytest.fixture(scope="module")
def upstream_like_pair(tmp_path_factory, tiny_teacher_ckpt, tiny_student):
    """The tiny teacher without its data_source record (as upstream checkpoints come), and the tiny student
    re-pointed at that file's sha256 so the pairing check passes."""
    tmp_path = tmp_path_factory.mktemp("upstream_like")
    t = load_pt(tiny_teacher_ckpt)
    t.pop("data_source")
    teacher_path = tmp_path / "upstream_like_teacher.pt"
    torch.save(t, teacher_path)
    s = load_pt(tiny_student)
    s["teacher"]["sha256"] = sha256_file(teacher_path)
    student_path = tmp_path / "student.pt"
    torch.save(s, student_path)
    return teacher_path, student_path


def test_checkpoint_without_data_source_means_mnist(tmp_path, monkeypatch, capsys, upstream_like_pair):
    teacher_path, student_path = upstream_like_pair
    monkeypatch.setattr(models.data, "MNIST_ROOT", tmp_path / "no_mnist_here")
    out = tmp_path / "r.pt"
    opts = FeatureOptions(ddpm_ckpt=str(teacher_path), decoder_ckpt=str(student_path), output_path=str(out),
                          limit=8, cpu=True)
    with pytest.raises(MissingInputError) as info:
        extract_reference_features(opts, dry_run=True)
    assert info.value.exit_code == 2
    assert "MNIST" in str(info.value) and "--download" in str(info.value)
    # a real run, as the CLI reports it: exit 2 and one line naming the fix
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: extract_reference_features(opts))
    assert exit_info.value.code == 2
    assert "--download" in one_error_line(capsys.readouterr().err)
    assert not out.exists() and not out.with_name(out.name + ".shards").exists()


def test_checkpoint_without_data_source_resolves_mnist(tmp_path, monkeypatch, upstream_like_pair, mnist5k):
    teacher_path, student_path = upstream_like_pair
    seen = []
    monkeypatch.setattr(models.features, "load_dataset",
                        lambda source, split="train", download=False: seen.append((source, download)) or mnist5k)
    opts = FeatureOptions(ddpm_ckpt=str(teacher_path), decoder_ckpt=str(student_path),
                          output_path=str(tmp_path / "r.pt"), limit=8, cpu=True)
    assert extract_reference_features(opts, dry_run=True)["identity"]["dataset"] == "mnist"
    assert seen == [("mnist", False)]
    # an explicit --dataset wins over the default
    opts.dataset = "fashion-mnist"
    assert extract_reference_features(opts, dry_run=True)["identity"]["dataset"] == "fashion-mnist"


# ---------------------------------------------------------------- SIGKILL and resume

def test_resume_after_sigkill_is_bitwise_identical(tmp_path, repo_root, tiny_pipeline, ref, script):
    out = tmp_path / "reference_features.pt"
    shards = out.with_name(out.name + ".shards")
    args = [f"--ddpm_ckpt={tiny_pipeline.teacher}", f"--decoder_ckpt={tiny_pipeline.student}",
            f"--output_path={out}", *tiny_pipeline.feature_args, "--shard_size", "40"]
    assert _arg(tiny_pipeline.feature_args, "--limit") == str(N)
    cmd = [sys.executable, str(repo_root / "extract_reference_features.py"), *args]
    proc = start_logged(cmd, tmp_path / "killed.log", cwd=repo_root)
    # allow_exit: a run that outraces the poll and finishes is checked below (rc 0: only the rerun half is exercised)
    rc = kill_when(proc, lambda: shards.is_dir() and any(shards.glob("shard_*.pt")), 240, what="a shard",
                   allow_exit=True, interval=0.002)
    assert rc in (-signal.SIGKILL, 0), (tmp_path / "killed.log").read_text()[-2000:]
    if rc == 0:
        warnings.warn("the extraction finished before SIGKILL landed; only the rerun half was exercised")
    else:
        assert not out.exists(), "the output existed although the run was killed before its last shard"
        done = sorted(p.name for p in shards.glob("shard_*.pt"))
        assert 1 <= len(done) < 3, done
        assert not list(tmp_path.glob(".reference_features.pt.*"))

    proc = script("extract_reference_features.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_pt(out)
    for key in ("features", "latents", "labels", "indices", "reconstruction_psnr_db"):
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    assert got["metadata"]["consistency"] == ref["metadata"]["consistency"]
    assert not shards.exists(), "shards were left behind after a verified result"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "killed.log") == [out.name]
