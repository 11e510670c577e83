"""extract_reference_features.py: what reference_features.pt holds, that each row is the student's bottleneck at
that image's latent, --fp16 / --no_latents, bit-exact resume after SIGKILL, and how the dataset is chosen."""
from __future__ import annotations

import math
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch

import models.data.datasets
import models.stages.features
from helpers import assert_identical, kill_when, load_pt, one_error_line, start_logged, use_cached_mnist5k
from models.diffusion.noise import per_sample_noise
from models.diffusion.samplers import ddim_invert, ddim_timesteps
from models.io.errors import MissingInputError, PipelineError, run_cli
from models.io.files import sha256_file
from models.io.teacher_checkpoints import load_teacher
from models.nets.image_encoder import ImageEncoder, load_image_encoder
from models.nets.student import load_student
from models.stages.features import FeatureOptions, extract_reference_features, latent_timestep, psnr
from models.training.image_encoder import EncoderTrainOptions, StudentPool, _student_batch, _training_batch, \
    train_image_encoder
from models.training.student import load_training_pairs

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
    return use_cached_mnist5k(monkeypatch, models.stages.features, mnist5k)


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
    assert "latents" not in ref  # the image encoder finds features, not latents
    assert tuple(ref["reconstruction_psnr_db"].shape) == (N,)
    assert torch.isfinite(ref["reconstruction_psnr_db"]).all()

    meta = ref["metadata"]
    assert meta["dataset"] == "mnist5k" and meta["split"] == "train" and meta["n"] == N
    assert meta["teacher_sha256"] == sha256_file(tiny_teacher_ckpt)
    assert meta["student_sha256"] == sha256_file(tiny_student)
    assert meta["method"] == "image_encoder"  # auto, for a zero-skip student
    assert meta["image_encoder"]["steps"] == int(_arg(tiny_pipeline.feature_args, "--encoder_steps")) == 6
    assert ref["image_encoder"]["options"] == meta["image_encoder"]
    assert meta["bottleneck_shape"] == list(student.decoder.bottleneck_shape)
    assert meta["dtype"] == "float32"
    cons = meta["consistency"]
    assert -1.0 <= cons["generated_bottleneck_cosine_mean"] <= 1.0
    assert cons["n_generated"] == int(_arg(tiny_pipeline.feature_args, "--consistency_samples"))
    assert math.isfinite(cons["reconstruction_psnr_db_mean"])
    assert cons["reconstruction_psnr_db_mean"] == pytest.approx(ref["reconstruction_psnr_db"].mean().item(), rel=1e-5)


def test_features_are_the_stored_encoders_output(ref, student, mnist5k, tiny_pipeline):
    """Each row is the shipped encoder applied to that training image, and its PSNR is that of the student's
    image decoded from the row, so anyone can recompute (or extend) the reference set from the file alone."""
    encoder = load_image_encoder(ref["image_encoder"])
    batch = int(_arg(tiny_pipeline.feature_args, "--batch_size"))
    with torch.inference_mode():
        for lo in (0, N - batch):  # recomputed exactly as the extraction batches them: bit-for-bit
            assert torch.equal(encoder(mnist5k.images[lo:lo + batch]), ref["features"][lo:lo + batch])
        rows = torch.tensor([3, 60, N - 2])
        recon = student.decoder.decode(ref["features"][rows])
    assert (ref["features"][rows[0]] - ref["features"][rows[1]]).abs().max() > 0  # rows differ: row i is image i
    torch.testing.assert_close(psnr(recon.clamp(-1, 1), mnist5k.images[rows]), ref["reconstruction_psnr_db"][rows],
                               rtol=1e-3, atol=1e-3)


def test_consistency_is_measured_on_the_students_own_generations(ref, student):
    """(a): for images the student generates from fresh latents, the encoder's features against the student's
    bottleneck at those latents, recomputed here from the file alone."""
    encoder = load_image_encoder(ref["image_encoder"])
    z = per_sample_noise(2024, range(8))
    with torch.inference_mode():
        images, h, _ = student.decoder.generate(z)
        cos = torch.nn.functional.cosine_similarity(encoder(images.clamp(-1, 1)).flatten(1), h.flatten(1))
    assert ref["metadata"]["consistency"]["generated_bottleneck_cosine_mean"] == pytest.approx(cos.mean().item(),
                                                                                               abs=1e-5)


@pytest.fixture(scope="module")
def pairs(tiny_pairs) -> dict:
    return load_training_pairs(tiny_pairs)


def test_image_encoder_training_learns_and_resumes(tmp_path, student, teacher, pairs):
    """Its training error against the student's bottleneck falls (on the real pair, BENCHMARKS.md has the
    consistency it reaches); a rerun after an interruption (the state at step 4 of 6 kept, the finished encoder
    gone) ends with the same weights and losses; a finished encoder is reused."""
    opts = EncoderTrainOptions(steps=6, batch_size=8, lr=1e-2, save_every=2, bn_samples=16)
    decoder, cfg = student.decoder, teacher.config
    trained, losses = train_image_encoder(decoder, teacher.diffusion.model, cfg, opts, tmp_path, "cpu", pairs)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    assert not trained.training and not any(p.requires_grad for p in trained.parameters())
    assert load_pt(tmp_path / "image_encoder_state.pt")["step"] == 4
    (tmp_path / "image_encoder_final.pt").unlink()
    resumed, resumed_losses = train_image_encoder(decoder, teacher.diffusion.model, cfg, opts, tmp_path, "cpu", pairs)
    assert_identical(resumed.state_dict(), trained.state_dict(), "encoder")
    assert resumed_losses == losses
    again, _ = train_image_encoder(decoder, teacher.diffusion.model, cfg, opts, tmp_path, "cpu", pairs)
    assert_identical(again.state_dict(), trained.state_dict(), "encoder")
    # the warm start is the teacher's own encoder, read at t = 0
    start = ImageEncoder.from_teacher(teacher.diffusion.model, cfg)
    theirs = teacher.diffusion.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in start.unet.state_dict().items())


def test_encoder_batches_mix_teacher_images_of_the_training_pairs(student, pairs):
    """Half of each batch (the default) is the teacher's image for a training pair's noise, with the student's
    bottleneck at that noise as the target (real digits are sharp like the teacher's, not blurred like the
    student's); the draw depends on (seed, step) only, so training resumes bit-exactly."""
    opts = EncoderTrainOptions(batch_size=8)
    decoder = student.decoder
    images, targets = _training_batch(decoder, pairs, opts, step=3, device="cpu")
    assert images.shape[0] == targets.shape[0] == 8
    teacher_rows, student_rows = images[4:], images[:4]
    flat = pairs["images"].flatten(1)
    matches = [(flat == row.flatten()).all(1).nonzero().flatten() for row in teacher_rows]
    assert all(len(m) >= 1 for m in matches)  # every second-half image is a stored teacher image
    idx = torch.stack([m[0] for m in matches])
    with torch.inference_mode():
        own_images, own_h, _ = decoder.generate(pairs["noise"][idx])
    torch.testing.assert_close(targets[4:], own_h.float())
    assert not any((flat == row.flatten()).all(1).any() for row in student_rows)
    again_images, again_targets = _training_batch(decoder, pairs, opts, step=3, device="cpu")
    assert torch.equal(again_images, images) and torch.equal(again_targets, targets)
    other, _ = _training_batch(decoder, pairs, opts, step=4, device="cpu")
    assert not torch.equal(other[4:], images[4:])
    only_own, _ = _training_batch(decoder, pairs, EncoderTrainOptions(batch_size=8, teacher_pairs_fraction=0.0),
                                  step=3, device="cpu")
    assert not any((flat == row.flatten()).all(1).any() for row in only_own)
    with pytest.raises(PipelineError, match="training pairs"):
        train_image_encoder(decoder, None, None, EncoderTrainOptions(), Path("unused"), "cpu", None)


def test_encoder_pool_is_the_students_generations_drawn_in_shuffled_passes(tmp_path, student, teacher, pairs):
    """The pool holds the student's generations at latents (seed, 0..size-1), exactly as fresh generation makes
    them; every pass over it draws each one once, in an order fixed by (seed, pass), so a step's batch depends on
    the step alone; training with it resumes bit-exactly and records the pool size."""
    decoder = student.decoder
    pool = StudentPool(decoder, seed=3, size=10, device="cpu")
    images, h = _student_batch(decoder, 3, range(10), "cpu")
    torch.testing.assert_close(pool.inputs, images, atol=1e-5, rtol=0)  # built in batches of 128: floats may round
    torch.testing.assert_close(pool.h, h, atol=1e-5, rtol=0)
    drawn = torch.cat([pool.batch(step, 4)[1] for step in range(5)])  # 20 draws = two passes
    rows = [int(((pool.h.flatten(1) - row.flatten()).abs().sum(1)).argmin()) for row in drawn]
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert rows[:10] != rows[10:]  # each pass has its own order
    assert torch.equal(pool.batch(3, 4)[0], StudentPool(decoder, 3, 10, "cpu").batch(3, 4)[0])
    assert pool.batch(0, 0)[0].shape[0] == 0
    opts = EncoderTrainOptions(steps=6, batch_size=8, lr=1e-2, save_every=2, bn_samples=16, pool_size=12)
    trained, losses = train_image_encoder(decoder, teacher.diffusion.model, teacher.config, opts, tmp_path, "cpu", pairs)
    (tmp_path / "image_encoder_final.pt").unlink()
    resumed, resumed_losses = train_image_encoder(decoder, teacher.diffusion.model, teacher.config, opts, tmp_path,
                                                  "cpu", pairs)
    assert_identical(resumed.state_dict(), trained.state_dict(), "pooled encoder")
    assert resumed_losses == losses
    with pytest.raises(PipelineError, match="--encoder_pool_size"):
        EncoderTrainOptions(batch_size=8, pool_size=3).validate()  # smaller than the student's 4 of a batch


def test_frozen_stem_keeps_the_teachers_layers_and_trains_the_rest(tmp_path, student, teacher, pairs):
    """--encoder_frozen_blocks 1: the input conv, the time embedding and the first encoder block keep the teacher's
    weights and BatchNorm statistics; the rest trains; head(stem(x)) is the encoder; resume stays bit-exact."""
    opts = EncoderTrainOptions(steps=4, batch_size=8, lr=1e-2, save_every=2, bn_samples=16, pool_size=8,
                               frozen_blocks=1)
    trained, losses = train_image_encoder(student.decoder, teacher.diffusion.model, teacher.config, opts, tmp_path,
                                          "cpu", pairs)
    start = ImageEncoder.from_teacher(teacher.diffusion.model, teacher.config).state_dict()
    mine = trained.state_dict()
    stem_keys = [k for k in start if k.startswith(("unet.init_conv.", "unet.time_embedding.",
                                                   "unet.encoder_blocks.0."))]
    assert stem_keys and all(torch.equal(mine[k], start[k]) for k in stem_keys)  # weights and running statistics
    assert any(not torch.equal(mine[k], start[k]) for k in start if k.startswith("unet.mid_block."))
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.equal(trained.head(trained.stem(x, 1), 1), trained(x))
    (tmp_path / "image_encoder_final.pt").unlink()
    resumed, resumed_losses = train_image_encoder(student.decoder, teacher.diffusion.model, teacher.config, opts,
                                                  tmp_path, "cpu", pairs)
    assert_identical(resumed.state_dict(), trained.state_dict(), "frozen-stem encoder")
    assert resumed_losses == losses
    with pytest.raises(PipelineError, match="--encoder_frozen_blocks"):
        ImageEncoder.from_teacher(teacher.diffusion.model, teacher.config).freeze_stem(3)


def test_features_record_the_pairs_the_encoder_used(ref, tiny_pairs):
    meta = ref["metadata"]
    assert meta["image_encoder"]["teacher_pairs_fraction"] == 0.5
    assert meta["encoder_teacher_pairs"] == {"path": str(tiny_pairs), "sha256": sha256_file(tiny_pairs)}


def test_missing_pairs_fall_back_to_the_students_images(tmp_path, tiny_student, capsys):
    ckpt = load_pt(tiny_student)
    ckpt["training_data"] = {**ckpt["training_data"], "path": str(tmp_path / "moved.pt")}
    assert models.stages.features.student_training_pairs(ckpt) is None
    assert "missing or changed" in capsys.readouterr().out


def test_ddim_inversion_method(tmp_path, student, teacher, mnist5k, tiny_teacher_ckpt, tiny_student, cached_dataset):
    """--method ddim_inversion: latents by DDIM inversion that ends where the student's noise lives, and each
    feature the student's bottleneck at its stored latent."""
    out = tmp_path / "ddim.pt"
    extract_reference_features(FeatureOptions(
        ddpm_ckpt=str(tiny_teacher_ckpt), decoder_ckpt=str(tiny_student), output_path=str(out), dataset="mnist5k",
        limit=40, method="ddim_inversion", inversion_steps=3, batch_size=20, consistency_samples=4, cpu=True))
    got = load_pt(out)
    meta = got["metadata"]
    assert meta["method"] == "ddim_inversion" and "image_encoder" not in got
    pairs = student.checkpoint["training_data"]["metadata"]
    start = ddim_timesteps(student.decoder.teacher_config.timesteps, pairs["steps"], pairs["spacing"])[0]
    assert meta["inversion_timesteps"][-1] == meta["latent_timestep"] == start
    assert meta["inversion_timesteps"][0] == 0 and len(meta["inversion_timesteps"]) == 3
    assert "generated_latent_cosine_mean" in meta["consistency"]
    rows = torch.tensor([3, 21, 39])
    x = mnist5k.images[rows]
    with torch.inference_mode():
        z = ddim_invert(teacher.diffusion.predict_noise, x, teacher.diffusion.alphas_cumprod,
                        meta["inversion_steps"], timesteps=meta["inversion_timesteps"])
        torch.testing.assert_close(z, got["latents"][rows], rtol=1e-4, atol=1e-4)
        assert torch.equal(student.decoder.bottleneck(got["latents"][:20]), got["features"][:20])
    assert (got["latents"][rows[0]] - got["latents"][rows[1]]).abs().max() > 0.1


# ---------------------------------------------------------------- options

def test_fp16_and_no_latents(tmp_path, ref, tiny_teacher_ckpt, tiny_student, cached_dataset):
    out = tmp_path / "f16.pt"
    opts = FeatureOptions(ddpm_ckpt=str(tiny_teacher_ckpt), decoder_ckpt=str(tiny_student), output_path=str(out),
                          dataset="mnist5k", limit=40, encoder_steps=6, encoder_batch_size=8, batch_size=40,
                          consistency_samples=0, fp16=True, store_latents=False, cpu=True)
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
    monkeypatch.setattr(models.data.datasets, "MNIST_ROOT", tmp_path / "no_mnist_here")
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
    monkeypatch.setattr(models.stages.features, "load_dataset",
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
        assert not list(tmp_path.glob(".reference_features.pt.*.tmp"))

    proc = script("extract_reference_features.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_pt(out)
    for key in ("features", "labels", "indices", "reconstruction_psnr_db"):
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    assert got["metadata"]["consistency"] == ref["metadata"]["consistency"]
    assert not shards.exists(), "shards were left behind after a verified result"
    # beside the result: only its hidden output lock
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "killed.log") == [f".{out.name}.lock", out.name]


def test_latent_timestep_is_where_the_pairs_sampler_starts():
    """Inversion must end where the student's noise lives: the first timestep of its pairs' sampler grid."""
    from models.diffusion.sampling import SamplerConfig

    def student(meta):
        return {"training_data": {"metadata": meta}}
    assert latent_timestep(student({"sampler": "ddim", "steps": 25, "spacing": "leading"}), 1000) == 960
    assert latent_timestep(student({"sampler": "ddim", "steps": 50, "spacing": "trailing"}), 1000) == 999
    assert latent_timestep(student({"sampler": "ddpm", "steps": 1000}), 1000) == 999
    assert latent_timestep(student({"sampler_config": SamplerConfig("dpmpp2m", 10).to_dict()}), 1000) == 995
