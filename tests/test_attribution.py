"""attribution_generation.py and the Python API: hook-steered generations, their top-k attribution to reference
images, the evaluation report, and the PNGs of the quickstart.

The tiny student's bottleneck is almost constant across inputs (base_dim 4, a few training steps), so cosine
similarities to the real tiny reference features all round to 1 and their ranking is decided by rounding noise.
The CLI run therefore uses a copy of the tiny reference_features.pt whose feature rows are replaced by seeded
random tensors: same teacher/student pairing, labels and indices, but neighbours that are unambiguous, so the
top-k and the hooks' effects can be checked exactly. The API test uses the real tiny features.

The first 120 mnist5k images are all zeros (the set is sorted by label), so the class hook targets class 0:
class 3 is absent from the tiny reference set and is refused (checked below).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import load_pt, run_main_in_process, sha256
from models.api import DirectDecoderPipeline
from models.diffusion.noise import per_sample_noise
from models.evaluation.attribution import SWEEP
from models.io.errors import PipelineError
from models.nets.student import load_student
from models.steering.hooks import class_hook, exclude_hook, include_hook
from models.steering.search import top_k_similar

N_SAMPLES, TOP_K, N_EVAL = 6, 3, 16
INCLUDE, EXCLUDE, TARGET = [0, 1, 2], [100, 101], 0
STRENGTHS = [0.3, 0.6]
HOOKED = ["include", "exclude", f"class_{TARGET}"]


@pytest.fixture(scope="module")
def random_ref(tiny_features, tmp_path_factory):
    ref = load_pt(tiny_features)
    g = torch.Generator().manual_seed(123)
    ref["features"] = torch.randn(ref["features"].shape, generator=g)
    path = tmp_path_factory.mktemp("random_ref") / "reference_features.pt"
    torch.save(ref, path)
    return path, ref


@pytest.fixture(scope="module")
def attr_run(tiny_pipeline, random_ref, tmp_path_factory, script) -> dict:
    out = tmp_path_factory.mktemp("attribution") / "out"
    proc = script("attribution_generation.py", "--ddpm_ckpt", tiny_pipeline.teacher, "--decoder_ckpt",
                  tiny_pipeline.student, "--ref_features_path", random_ref[0], "--output_dir", out,
                  "--n_samples", N_SAMPLES, "--top_k", TOP_K, "--include", *INCLUDE, "--exclude", *EXCLUDE,
                  "--target_class", TARGET, "--strength", *STRENGTHS, "--n_eval", N_EVAL, "--attribute_by",
                  "bottleneck", "--hook_style", "mean", "--cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "proc": proc, "results": load_pt(out / "attribution_results.pt"),
            "report": json.loads((out / "attribution_report.json").read_text())}


@pytest.fixture(scope="module")
def decoder(tiny_student):
    return load_student(tiny_student).decoder


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ---------------------------------------------------------------- the CLI run

def test_quickstart_outputs_exist(attr_run):
    out = attr_run["out"]
    names = {p.name for p in out.iterdir()}
    main = {"samples_baseline.png", "samples_include.png", "samples_exclude.png", f"samples_class_{TARGET}.png",
            "attribution_results.pt", "attribution_grid.png", "attribution_report.json"}
    sweep = {f"samples_{h}_s{STRENGTHS[1]}.png" for h in HOOKED}
    assert main | sweep == names, f"missing {sorted(main | sweep - names)}, unexpected {sorted(names - main - sweep)}"
    # 6 samples -> a 3x2 grid of 28px images with 2px padding
    for name in ["samples_baseline.png", *sorted(sweep)]:
        assert _png_size(out / name) == (3 * 30 + 2, 2 * 30 + 2), name
    w, h = _png_size(out / "attribution_grid.png")
    assert w > 100 and h > 100
    assert "have labels [0, 0, 0]" in attr_run["proc"].stdout


def test_results_noise_and_chosen_samples(attr_run, mnist5k):
    res = attr_run["results"]
    assert torch.equal(res["noise"], per_sample_noise(0, range(N_SAMPLES)))
    assert res["chosen"]["include"] == {"indices": INCLUDE, "labels": mnist5k.labels[INCLUDE].tolist()}
    assert res["chosen"]["exclude"] == {"indices": EXCLUDE, "labels": mnist5k.labels[EXCLUDE].tolist()}
    assert res["chosen"]["include"]["labels"] == [0, 0, 0] and res["chosen"]["exclude"]["labels"] == [0, 0]
    assert res["reference"]["dataset"] == "mnist5k"


def test_results_runs_shapes(attr_run, random_ref):
    runs = attr_run["results"]["runs"]
    assert set(runs) == {"baseline"} | {f"{h}@{s}" for h in HOOKED for s in STRENGTHS}
    c_h_w = tuple(random_ref[1]["features"].shape[1:])
    for key, run in runs.items():
        assert tuple(run["images"].shape) == (N_SAMPLES, 1, 28, 28), key
        assert run["images"].min() >= -1 and run["images"].max() <= 1, key
        assert tuple(run["features"].shape) == (N_SAMPLES, *c_h_w), key
        for field in ("top_k_scores", "top_k_indices", "top_k_labels"):
            assert tuple(run[field].shape) == (N_SAMPLES, TOP_K), (key, field)


def test_top_k_is_the_exact_cosine_ranking(attr_run, random_ref):
    ref = random_ref[1]
    flat_ref = ref["features"].flatten(1)
    for key, run in attr_run["results"]["runs"].items():
        scores, idx = run["top_k_scores"], run["top_k_indices"]
        assert (scores[:, :-1] >= scores[:, 1:]).all(), f"{key}: top-k scores not sorted descending"
        assert all(len(set(row.tolist())) == TOP_K for row in idx), f"{key}: repeated indices"
        assert torch.equal(run["top_k_labels"], ref["labels"][idx])
        feats = run["features"].flatten(1)
        recomputed = F.cosine_similarity(feats[:, None, :], flat_ref[idx], dim=2)
        torch.testing.assert_close(scores, recomputed, rtol=1e-5, atol=1e-5)
        # brute force over every reference row, in float64
        all_cos = F.normalize(feats.double(), dim=1) @ F.normalize(flat_ref.double(), dim=1).T
        best, order = all_cos.sort(dim=1, descending=True)
        assert torch.equal(idx[:, 0], all_cos.argmax(1)), key
        assert torch.equal(idx, order[:, :TOP_K]), key
        torch.testing.assert_close(scores.double(), best[:, :TOP_K], rtol=1e-5, atol=1e-5)


def test_runs_apply_the_hooks(attr_run, random_ref, decoder):
    runs = attr_run["results"]["runs"]
    ref = random_ref[1]["features"]
    labels = random_ref[1]["labels"]
    z = attr_run["results"]["noise"]
    with torch.inference_mode():
        h = decoder.bottleneck(z)
        torch.testing.assert_close(runs["baseline"]["features"], h, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(runs["baseline"]["images"], decoder(z).clamp(-1, 1), rtol=1e-4, atol=1e-5)
        for s in STRENGTHS:
            hooks = {"include": include_hook(ref[INCLUDE], s), "exclude": exclude_hook(ref[EXCLUDE], s),
                     f"class_{TARGET}": class_hook(ref[labels == TARGET], s)}
            for name, hook in hooks.items():
                run = runs[f"{name}@{s}"]
                torch.testing.assert_close(run["features"], hook(h), rtol=1e-4, atol=1e-5)
                images = decoder.generate(z, hook)[0].clamp(-1, 1)
                torch.testing.assert_close(run["images"], images, rtol=1e-4, atol=1e-5)
    # in the bottleneck, include pulls toward the chosen samples and exclude pushes away, more with strength
    inc = [runs["baseline"]["similarity_to_include_set"]] + [runs[f"include@{s}"]["similarity_to_include_set"]
                                                               for s in STRENGTHS]
    exc = [runs["baseline"]["similarity_to_exclude_set"]] + [runs[f"exclude@{s}"]["similarity_to_exclude_set"]
                                                               for s in STRENGTHS]
    assert inc[0] < inc[1] < inc[2] and exc[0] > exc[1] > exc[2], (inc, exc)


def test_report(attr_run):
    r = attr_run["report"]
    assert r["n_eval"] == N_EVAL and r["target_class"] == TARGET and r["strengths"] == SWEEP
    for key in ("class_hook_success", "class_hook_success_audit"):
        assert len(r[key]) == 10 and all(0 <= v <= 1 for v in r[key]), key
    for key in ("include_similarity", "exclude_similarity"):
        assert len(r[key]) == 10 and all(math.isfinite(v) and -1 - 1e-6 <= v <= 1 + 1e-6 for v in r[key]), key
    assert 0 <= r["baseline_share_target_class"] <= 1
    for key in ("baseline_include_similarity", "baseline_exclude_similarity"):
        assert math.isfinite(r[key]) and -1 - 1e-6 <= r[key] <= 1 + 1e-6
    assert r["attribute_by"] == "bottleneck"
    for key in ("attribution_label_agreement", "attribution_label_agreement_audit"):
        agreement = r[key]
        assert set(agreement) == {"bottleneck", "image", "shape", "pixel_nn_baseline"}
        for method in agreement.values():
            assert set(method) == {"top1", "top5_majority"}
            assert all(0 <= v <= 1 for v in method.values())
    # every reference image is a 0, so the neighbours' labels agree exactly when the classifier says 0
    agreement = r["attribution_label_agreement"]
    for rule in ("bottleneck", "image", "shape"):
        assert agreement[rule]["top1"] == pytest.approx(r["baseline_share_target_class"])
    examples = r["attribution_examples"]  # the readable sample: the baseline's first generations, as in the results
    base = attr_run["results"]["runs"]["baseline"]
    assert examples["attribute_by"] == "bottleneck" and len(examples["generations"]) == N_SAMPLES
    assert [[t["index"] for t in row] for row in examples["generations"]] == base["top_k_indices"].tolist()
    assert [[t["percentile"] for t in row] for row in examples["generations"]] == [
        [round(p, 1) for p in row] for row in base["top_k_percentiles"].tolist()]
    assert agreement["pixel_nn_baseline"]["top5_majority"] == pytest.approx(r["baseline_share_target_class"])


def test_attribute_by_image_re_encodes_the_generation(attr_run, tiny_pipeline, random_ref, tmp_path, monkeypatch,
                                                     capsys, repo_root):
    """--attribute_by image: each generation's top-k are the training images nearest its image read back by the
    features' image encoder; features without an encoder are refused in one line before any output. (The script's
    __main__ in this interpreter; attr_run above is the fresh-interpreter run.)"""
    def cli(*args):
        return run_main_in_process(repo_root / "attribution_generation.py", args, monkeypatch, capsys)
    out = tmp_path / "by_image"
    common = ["--ddpm_ckpt", tiny_pipeline.teacher, "--decoder_ckpt", tiny_pipeline.student, "--n_samples", N_SAMPLES,
              "--top_k", TOP_K, "--target_class", TARGET, "--strength", STRENGTHS[0], "--no_evaluate", "--cpu"]
    code, _, err = cli(*common, "--ref_features_path", random_ref[0], "--output_dir", out, "--attribute_by", "image")
    assert code == 0, err[-3000:]
    base = load_pt(out / "attribution_results.pt")["runs"]["baseline"]
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student), str(random_ref[0]),
                                      device="cpu")
    _, expected = top_k_similar(pipe.steering.encode_images(base["images"]), random_ref[1]["features"], TOP_K)
    assert torch.equal(base["top_k_indices"], expected)
    assert not torch.equal(base["top_k_indices"], attr_run["results"]["runs"]["baseline"]["top_k_indices"])
    no_encoder = dict(random_ref[1])
    no_encoder.pop("image_encoder")
    torch.save(no_encoder, tmp_path / "inverted.pt")
    code, _, err = cli(*common, "--ref_features_path", tmp_path / "inverted.pt", "--output_dir", tmp_path / "refused",
                       "--attribute_by", "image")
    assert code == 1 and "carry no image encoder" in err.strip().splitlines()[-1]
    assert not (tmp_path / "refused" / "attribution_results.pt").exists()


# ---------------------------------------------------------------- top_k_similar

def test_top_k_similar_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(7)
    query, reference = torch.randn(5, 8, 7, 7, generator=g), torch.randn(50, 8, 7, 7, generator=g)
    full_s, full_i = top_k_similar(query, reference, 4)
    for chunk in (1, 7, 16, 49):
        s, i = top_k_similar(query, reference, 4, chunk=chunk)
        assert torch.equal(i, full_i), chunk
        torch.testing.assert_close(s, full_s)
    brute = F.normalize(query.flatten(1), dim=1) @ F.normalize(reference.flatten(1), dim=1).T
    best, order = brute.topk(4, dim=1)
    assert torch.equal(full_i, order)
    torch.testing.assert_close(full_s, best)
    # k larger than the reference set: every row, ranked
    s, i = top_k_similar(query, reference[:3], 10, chunk=2)
    assert i.shape == (5, 3) and torch.equal(i.sort(1).values, torch.arange(3).expand(5, 3))


# ---------------------------------------------------------------- Python API

def test_api_generate_with_class_hook(tiny_pipeline):
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student),
                                      str(tiny_pipeline.features), device="cpu")
    hook = pipe.toward_class(TARGET, 0.5, "mean")  # the other styles: tests/test_hook_styles.py
    out = pipe.generate(4, hook=hook)
    assert tuple(out.images.shape) == (4, 1, 28, 28)
    assert out.images.min() >= -1 and out.images.max() <= 1
    assert torch.equal(out.noise, per_sample_noise(0, range(4)))
    ref = load_pt(tiny_pipeline.features)
    assert tuple(out.features.shape) == (4, *ref["features"].shape[1:])
    with torch.inference_mode():
        expected = class_hook(ref["features"][ref["labels"] == TARGET], 0.5)(pipe.student.decoder.bottleneck(out.noise))
    torch.testing.assert_close(out.features, expected, rtol=1e-4, atol=1e-6)
    assert tuple(out.top_k_indices.shape) == (4, 5) and tuple(out.top_k_scores.shape) == (4, 5)
    assert ((out.top_k_indices >= 0) & (out.top_k_indices < len(ref["labels"]))).all()
    assert torch.equal(out.top_k_labels, ref["labels"][out.top_k_indices])
    with pytest.raises(PipelineError, match="not a label"):
        pipe.toward_class(3, 0.5)  # no 3 among the first 120 mnist5k images


def test_api_without_features(tiny_pipeline):
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student), device="cpu")
    for call in (lambda: pipe.include([0]), lambda: pipe.exclude([0]), lambda: pipe.toward_class(0)):
        with pytest.raises(PipelineError, match="reference features"):
            call()
    out = pipe.generate(2, seed=5)
    assert tuple(out.images.shape) == (2, 1, 28, 28) and out.top_k_indices is None
    assert torch.equal(out.noise, per_sample_noise(5, range(2)))


def test_api_teacher_images_follow_the_students_pairs_sampler(tiny_pipeline):
    """The teacher image beside a student's is made by the sampler of the student's pairs, read from the frozen
    config its checkpoint records (old flat keys for these pairs), so a DPM-Solver++ student is compared with
    DPM-Solver++ images; ``steps`` overrides K only."""
    from models.diffusion.sampling import SamplerConfig
    pipe = DirectDecoderPipeline.load(str(tiny_pipeline.teacher), str(tiny_pipeline.student), device="cpu")
    noise = per_sample_noise(3, range(2))
    learned = SamplerConfig.from_student(pipe.student.checkpoint)
    assert learned.name == "ddim" and learned.steps == 5
    assert torch.equal(pipe.teacher_images(noise), learned.sample(pipe.teacher.diffusion, noise))
    assert torch.equal(pipe.teacher_images(noise, steps=2), SamplerConfig("ddim", 2, learned.spacing)
                       .sample(pipe.teacher.diffusion, noise))
    dpmpp = SamplerConfig("dpmpp2m", 4)
    pipe.student.checkpoint["training_data"] = {"metadata": {"sampler_config": dpmpp.to_dict()}}
    got = pipe.teacher_images(noise)
    assert torch.equal(got, dpmpp.sample(pipe.teacher.diffusion, noise))
    assert not torch.equal(got, SamplerConfig("ddim", 4).sample(pipe.teacher.diffusion, noise))


def test_make_figures_draws_the_readme_pictures_from_the_given_pair(tiny_pipeline, tmp_path, monkeypatch, capsys):
    """bench/make_figures.py: teacher row over student row on the same noises, and one panel per hook on the same
    noises; the baseline panel is the pipeline's own generation and every hook panel differs from it."""
    from PIL import Image

    from helpers import run_main_in_process
    label = int(load_pt(tiny_pipeline.features)["labels"][0])
    out = tmp_path / "figures"
    code, stdout, err = run_main_in_process(
        Path(__file__).resolve().parents[1] / "bench" / "make_figures.py", ["--ddpm_ckpt", tiny_pipeline.teacher, "--decoder_ckpt", tiny_pipeline.student,
                                  "--ref_features_path", tiny_pipeline.features, "--n", 6, "--pairs", 4,
                                  "--label", label, "--include", 0, 1, "--exclude", 2, "--output_dir", out, "--cpu"],
        monkeypatch, capsys)
    assert code == 0, err
    assert Image.open(out / "student_vs_teacher.png").size == (4 * 30 + 2, 2 * 30 + 2)  # 2-pixel padding
    pipe = DirectDecoderPipeline.load(tiny_pipeline.teacher, tiny_pipeline.student, tiny_pipeline.features, "cpu")
    panels = {}
    for name in ("baseline", "include", "exclude", f"class_{label}"):
        panels[name] = torch.tensor(np.asarray(Image.open(out / f"hooks_{name}.png").convert("L")), dtype=torch.float)
    baseline = pipe.generate(6, seed=0).images
    first = panels["baseline"][2:30, 2:30] / 255 * 2 - 1
    assert (first - baseline[0, 0]).abs().max() < 2 / 255 + 1e-6
    for name in ("include", "exclude", f"class_{label}"):
        assert (panels[name] - panels["baseline"]).abs().max() > 0, f"the {name} panel equals the baseline"
    record = json.loads((out / "figures.json").read_text())
    assert record["student"] == pipe.student.sha256 and set(record[f"share_classified_{label}"]) == {
        "baseline", "include", "exclude", f"class_{label}"}
    assert record["features"]["sha256"] == sha256(tiny_pipeline.features)  # by content, not by a local path
    assert record["features"]["rebuild"].startswith("python extract_reference_features.py ")
    assert "make_figures:" in stdout
