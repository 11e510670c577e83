"""Refusing bad input clearly: one stderr line starting with "error:", exit code 1 (bad input) or 2 (missing
input), and no partial file under a final name, for the stage scripts.

Most cases run a script's ``__main__`` (argparse + run_cli) in this interpreter, as tests/test_train_ddpm.py does:
the same code path as the command line without paying a torch import per case. Two cases run in a fresh
interpreter to check the real exit status and stderr. Every case is sized so that, were the validation missing,
the run would finish quickly with exit 0 and the test would fail rather than hang.
"""
from __future__ import annotations

import errno
import re
import os
from pathlib import Path

import pytest
import torch

import models.stages.features
from helpers import load_pt, one_error_line, run_main_in_process, use_cached_mnist5k
from models.io.errors import PipelineError, run_cli
from models.io.files import atomic_save, atomic_write_json
from models.stages.features import FeatureOptions, extract_reference_features

REPO = Path(__file__).resolve().parents[1]
MARKER_NAME = "pickle_payload_ran"


class Payload:
    """An arbitrary class: pickling it records a GLOBAL that weights_only loading must not import."""

    def __init__(self):
        self.value = 1


@pytest.fixture(scope="module")
def files(tiny_pipeline, upstream_ckpt_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    f = {"teacher": Path(tiny_pipeline.teacher), "student": Path(tiny_pipeline.student),
         "features": Path(tiny_pipeline.features), "pairs": Path(tiny_pipeline.pairs),
         "upstream": Path(upstream_ckpt_path), "missing": d / "does_not_exist.pt", "marker": d / MARKER_NAME}
    for name in ("teacher", "student", "features"):
        data = f[name].read_bytes()
        f[f"truncated_{name}"] = d / f"truncated_{name}.pt"
        f[f"truncated_{name}"].write_bytes(data[:len(data) // 2])
    # a raw (non-zip) pickle whose REDUCE would call os.system; the command only touches a marker file
    f["evil"] = d / "evil.pt"
    f["evil"].write_bytes(b"cos\nsystem\n(S'touch " + str(f["marker"]).encode() + b"'\ntR.")
    f["custom"] = d / "custom_object.pt"
    torch.save({"kind": "reference_features", "model": Payload()}, f["custom"])
    other = load_pt(f["features"])
    other["metadata"]["student_sha256"] = "0" * 64
    f["other_pair"] = d / "features_other_pair.pt"
    torch.save(other, f["other_pair"])
    f["a_file"] = d / "a_file"
    f["a_file"].write_text("not a directory\n")
    return f


_LOADED: dict = {}


def _memoised(fn, good: set):
    """``fn`` that loads each known-good file once per session; any other file goes through ``fn`` itself."""
    def load(path, *args, **kwargs):
        if str(path) not in good:
            return fn(path, *args, **kwargs)
        key = (fn.__module__, fn.__name__, str(path))
        if key not in _LOADED:
            _LOADED[key] = fn(path, *args, **kwargs)
        return _LOADED[key]
    return load


@pytest.fixture
def cli(monkeypatch, capsys, mnist5k, files):
    """Runs SCRIPT's __main__ in this interpreter: (exit code, stdout, stderr).

    The valid tiny checkpoints and mnist5k are loaded once and reused (loading a checkpoint with weights_only costs
    seconds on a busy CPU); every bad file still goes through the real loaders and checks."""
    import models.stages.attribution
    import models.stages.generate
    import models.training.student
    good = {str(files[k]) for k in ("teacher", "student", "features", "pairs", "upstream")}
    for module in (models.stages.features, models.stages.attribution, models.stages.generate, models.training.student):
        for name in ("load_teacher", "load_student", "load_reference_features", "load_training_pairs"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _memoised(getattr(module, name), good))
    use_cached_mnist5k(monkeypatch, models.stages.features, mnist5k)
    return lambda script, *args: run_main_in_process(REPO / script, args, monkeypatch, capsys)


def _assert_refused(code: int, err: str, expected: int, needles: tuple[str, ...]) -> None:
    assert code == expected, f"exit {code}, expected {expected}; stderr:\n{err[-2000:]}"
    line = one_error_line(err)
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---------------------------------------------------------------- extract_reference_features.py

EXTRACT_CASES = {
    # id: (overrides, extra args, exit code, message fragments)
    "missing-teacher": ({"--ddpm_ckpt": "missing"}, [], 2, ("not found", "does_not_exist.pt")),
    "missing-student": ({"--decoder_ckpt": "missing"}, [], 2, ("not found", "train_direct_decoder.py")),
    "truncated-teacher": ({"--ddpm_ckpt": "truncated_teacher"}, [], 1, ("corrupted or truncated",)),
    "truncated-student": ({"--decoder_ckpt": "truncated_student"}, [], 1, ("corrupted or truncated",)),
    "pickled-code": ({"--decoder_ckpt": "evil"}, [], 1, ("refusing", "weights_only")),
    "pickled-object": ({"--ddpm_ckpt": "custom"}, [], 1, ("refusing", "weights_only")),
    "teacher-as-student": ({"--decoder_ckpt": "teacher"}, [], 1, ("teacher", "not a direct-decoder checkpoint")),
    "student-as-teacher": ({"--ddpm_ckpt": "student"}, [], 1, ("direct-decoder (student) checkpoint",)),
    "features-as-student": ({"--decoder_ckpt": "features"}, [], 1, ("reference_features", "not a direct-decoder")),
    "student-of-other-teacher": ({"--ddpm_ckpt": "upstream"}, [], 1, ("distilled from teacher", "matching teacher")),
    "batch-size-0": ({}, ["--batch_size", "0"], 1, ("--batch_size",)),
    "inversion-steps-0": ({}, ["--inversion_steps", "0"], 1, ("--inversion_steps",)),
    "encoder-steps-0": ({}, ["--encoder_steps", "0"], 1, ("--encoder_steps",)),
    "encoder-lr-nan": ({}, ["--encoder_lr", "nan"], 1, ("--encoder_lr",)),
    "negative-limit": ({}, ["--limit", "-1"], 1, ("--limit",)),
}


@pytest.mark.parametrize("case", EXTRACT_CASES)
def test_extract_refuses(case, files, cli, tmp_path):
    overrides, extra, expected, needles = EXTRACT_CASES[case]
    paths = {"--ddpm_ckpt": files["teacher"], "--decoder_ckpt": files["student"]}
    paths.update({flag: files[name] for flag, name in overrides.items()})
    out = tmp_path / "out" / "reference_features.pt"
    code, _, err = cli("extract_reference_features.py", *[x for kv in paths.items() for x in kv],
                       "--output_path", out, "--dataset", "mnist5k", "--limit", "8", "--batch_size", "8",
                       "--encoder_steps", "2", "--encoder_batch_size", "4", "--consistency_samples", "0", "--cpu",
                       *extra)
    _assert_refused(code, err, expected, needles)
    assert not out.exists() and not out.with_name(out.name + ".shards").exists()
    assert not (tmp_path / "out").exists() or _tree(tmp_path / "out") == []
    assert not files["marker"].exists(), "the pickle's payload ran"


@pytest.mark.parametrize("where", ["directory", "under-a-file"])
def test_extract_refuses_bad_output_path(where, files, cli, tmp_path):
    if where == "directory":
        out = tmp_path / "somedir"
        out.mkdir()
    else:
        out = files["a_file"] / "reference_features.pt"
    code, _, err = cli("extract_reference_features.py", "--ddpm_ckpt", files["teacher"], "--decoder_ckpt",
                       files["student"], "--output_path", out, "--dataset", "mnist5k", "--limit", "8",
                       "--batch_size", "8", "--encoder_steps", "2", "--encoder_batch_size", "4",
                       "--consistency_samples", "0", "--cpu")
    _assert_refused(code, err, 1, (str(out),))
    if where == "directory":
        assert _tree(out) == []
    assert files["a_file"].read_text() == "not a directory\n"


# ---------------------------------------------------------------- attribution_generation.py

ATTR_CASES = {
    "missing-features": ({"--ref_features_path": "missing"}, [], 2, ("not found", "extract_reference_features.py")),
    "missing-teacher": ({"--ddpm_ckpt": "missing"}, [], 2, ("not found",)),
    "truncated-features": ({"--ref_features_path": "truncated_features"}, [], 1, ("corrupted or truncated",)),
    "truncated-teacher": ({"--ddpm_ckpt": "truncated_teacher"}, [], 1, ("corrupted or truncated",)),
    "pickled-code": ({"--ref_features_path": "evil"}, [], 1, ("refusing", "weights_only")),
    "pickled-object": ({"--ref_features_path": "custom"}, [], 1, ("refusing", "weights_only")),
    "teacher-as-student": ({"--decoder_ckpt": "teacher"}, [], 1, ("teacher", "not a direct-decoder checkpoint")),
    "student-as-teacher": ({"--ddpm_ckpt": "student"}, [], 1, ("direct-decoder (student) checkpoint",)),
    "pairs-as-features": ({"--ref_features_path": "pairs"}, [], 1, ("not a reference_features.pt",)),
    "features-of-other-pair": ({"--ref_features_path": "other_pair"}, [], 1, ("re-extract", "000000000000")),
    "n-samples-0": ({}, ["--n_samples", "0"], 1, ("--n_samples",)),
    "top-k-0": ({}, ["--top_k", "0"], 1, ("--top_k",)),
    "include-outside": ({}, ["--include", "999999"], 1, ("--include", "999999", "outside")),
    "exclude-negative": ({}, ["--exclude", "3", "-5"], 1, ("--exclude", "-5")),
    "target-class-42": ({}, ["--target_class", "42"], 1, ("--target_class 42",)),
    "strength-nan": ({}, ["--strength", "nan"], 1, ("--strength", "nan")),
    "strength-inf": ({}, ["--strength", "0.5", "inf"], 1, ("--strength", "inf")),
    "strength-negative": ({}, ["--strength", "-1"], 1, ("--strength", "-1")),
    "strength-above-1": ({}, ["--strength", "1.5"], 1, ("--strength",)),
    "output-dir-is-a-file": ({"--output_dir": "a_file"}, [], 1, ("a_file", "is a file")),
}


@pytest.mark.parametrize("case", ATTR_CASES)
def test_attribution_refuses(case, files, cli, tmp_path):
    overrides, extra, expected, needles = ATTR_CASES[case]
    out = tmp_path / "attr"
    paths = {"--ddpm_ckpt": files["teacher"], "--decoder_ckpt": files["student"],
             "--ref_features_path": files["features"], "--output_dir": out}
    paths.update({flag: files[name] for flag, name in overrides.items()})
    code, _, err = cli("attribution_generation.py", *[x for kv in paths.items() for x in kv],
                       "--n_samples", "2", "--top_k", "2", "--include", "0", "--exclude", "1", "--target_class", "0",
                       "--no_evaluate", "--cpu", *extra)
    _assert_refused(code, err, expected, needles)
    assert not out.exists()
    assert files["a_file"].read_text() == "not a directory\n"
    assert not files["marker"].exists(), "the pickle's payload ran"


def test_attribution_dry_run_checks_hook_inputs(files, cli, tmp_path):
    """--dry-run resolves the hooks, so index and class mistakes are caught without any work."""
    base = ["--ddpm_ckpt", files["teacher"], "--decoder_ckpt", files["student"], "--ref_features_path",
            files["features"], "--output_dir", tmp_path / "attr", "--cpu", "--dry-run"]
    code, out, err = cli("attribution_generation.py", *base, "--include", "0", "1", "--exclude", "5",
                         "--target_class", "0")
    assert code == 0 and "'labels': [0, 0]" in out, err[-2000:]
    code, _, err = cli("attribution_generation.py", *base)  # default --target_class 3: not in the first 120 images
    _assert_refused(code, err, 1, ("--target_class 3", "[0]"))
    assert not (tmp_path / "attr").exists()


# ---------------------------------------------------------------- generate_training_data.py / train_direct_decoder.py

# script: (the arguments of a run that would succeed quickly, {id: (extra args, exit code, message fragments)});
# "@out" stands for the run's output directory and "@name" for files[name].
STAGE_CASES = {
    "generate_training_data.py": (
        ["--ckpt", "@teacher", "--output_dir", "@out", "--n_samples", "2", "--batch_size", "2", "--steps", "1",
         "--cpu"],
        {
            "missing-teacher": (["--ckpt", "@missing"], 2, ("not found",)),
            "student-as-teacher": (["--ckpt", "@student"], 1, ("direct-decoder (student) checkpoint",)),
            "pickled-code": (["--ckpt", "@evil"], 1, ("refusing", "weights_only")),
            "n-samples-0": (["--n_samples", "0"], 1, ("--n_samples",)),
            "batch-size-0": (["--batch_size", "0"], 1, ("--batch_size",)),
            "steps-above-T": (["--steps", "51"], 1, ("--steps", "[1, 50]")),
            "output-dir-is-a-file": (["--output_dir", "@a_file"], 1, ("a_file", "is a file")),
        }),
    "train_direct_decoder.py": (
        ["--ddpm_ckpt", "@teacher", "--data_path", "@pairs", "--output_dir", "@out", "--epochs", "1", "--batch_size",
         "8", "--no_evaluate", "--cpu"],
        {
            "missing-data": (["--data_path", "@missing"], 2, ("not found", "generate_training_data.py")),
            "truncated-data": (["--data_path", "@truncated_features"], 1, ("corrupted or truncated",)),
            "features-as-data": (["--data_path", "@features"], 1, ("not a training_data.pt",)),
            "student-as-teacher": (["--ddpm_ckpt", "@student"], 1, ("direct-decoder (student) checkpoint",)),
            "data-of-other-teacher": (["--ddpm_ckpt", "@upstream"], 1, ("generated by teacher",)),
            "batch-size-0": (["--batch_size", "0"], 1, ("--batch_size",)),
            "epochs-0": (["--epochs", "0"], 1, ("--epochs",)),
            "lr-nan": (["--lr", "nan"], 1, ("--lr",)),
            "output-dir-is-a-file": (["--output_dir", "@a_file"], 1, ("a_file", "is a file")),
        }),
}


@pytest.mark.parametrize("script, case", [pytest.param(script, case, id=f"{script[:-3]}-{case}")
                                          for script, (_, cases) in STAGE_CASES.items() for case in cases])
def test_stage_refuses(script, case, files, cli, tmp_path):
    base, cases = STAGE_CASES[script]
    extra, expected, needles = cases[case]
    out = tmp_path / "out"
    paths = dict(files, out=out)
    code, _, err = cli(script, *[paths[a[1:]] if a.startswith("@") else a for a in base + extra])
    _assert_refused(code, err, expected, needles)
    assert not out.exists()
    assert not files["marker"].exists(), "the pickle's payload ran"
    assert files["a_file"].read_text() == "not a directory\n"


# ---------------------------------------------------------------- in a fresh interpreter

def test_fresh_interpreter_missing_checkpoint_exits_2(files, script, tmp_path):
    out = tmp_path / "reference_features.pt"
    proc = script("extract_reference_features.py", "--ddpm_ckpt", files["missing"], "--decoder_ckpt",
                  files["student"], "--output_path", out, "--cpu")
    _assert_refused(proc.returncode, proc.stderr, 2, ("teacher checkpoint not found", str(files["missing"])))
    assert "Traceback" not in proc.stderr and not out.exists()


def test_fresh_interpreter_pickled_code_is_refused(files, script, tmp_path):
    out = tmp_path / "attr"
    proc = script("attribution_generation.py", "--ddpm_ckpt", files["teacher"], "--decoder_ckpt", files["student"],
                  "--ref_features_path", files["evil"], "--output_dir", out, "--cpu")
    _assert_refused(proc.returncode, proc.stderr, 1, ("refusing", "weights_only"))
    assert not out.exists() and not files["marker"].exists()


# ---------------------------------------------------------------- a full disk

def _enospc_after_partial_write(obj, f, *args, **kwargs):
    """torch.save on a full disk: some bytes reach the file, then the write fails."""
    f.write(b"PK\x03\x04 partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _enospc_after_partial_write)
    target = tmp_path / "result.pt"
    with pytest.raises(PipelineError, match="No space left") as info:
        atomic_save({"x": torch.zeros(3)}, target)
    assert info.value.exit_code == 1 and str(target) in str(info.value)
    assert _tree(tmp_path) == [], "a partial or temporary file was left behind"
    # an earlier good file under the final name survives a failed overwrite
    target.write_bytes(b"previous good result")
    with pytest.raises(PipelineError, match="No space left"):
        atomic_save({"x": torch.ones(3)}, target)
    assert target.read_bytes() == b"previous good result"
    assert _tree(tmp_path) == ["result.pt"]


def test_full_disk_during_json_write(tmp_path, monkeypatch):
    def full(self, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(PipelineError, match="No space left"):
        atomic_write_json({"a": 1}, tmp_path / "report.json")
    assert _tree(tmp_path) == []


def test_full_disk_while_writing_features(tmp_path, monkeypatch, capsys, files, mnist5k):
    """The final write fails: exit 1 with one line, no reference_features.pt, the finished shards kept; a rerun
    (disk freed) completes from them."""
    monkeypatch.setattr(models.stages.features, "load_dataset", lambda *a, **k: mnist5k)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f.name).name.startswith(".reference_features.pt."):
            return _enospc_after_partial_write(obj, f)
        return real_save(obj, f, *args, **kwargs)
    out = tmp_path / "reference_features.pt"
    opts = FeatureOptions(ddpm_ckpt=str(files["teacher"]), decoder_ckpt=str(files["student"]), output_path=str(out),
                          dataset="mnist5k", limit=16, batch_size=8, encoder_steps=2, encoder_batch_size=4,
                          consistency_samples=0, cpu=True)
    monkeypatch.setattr(torch, "save", save)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: extract_reference_features(opts))
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not line.startswith(("features", "image encoder"))]  # progress bars
    assert exit_info.value.code == 1
    assert len(err) == 1 and err[0].startswith("error: could not write") and "No space left on device" in err[0]
    shards = out.with_name(out.name + ".shards")
    assert not out.exists() and shards.is_dir() and len(list(shards.glob("shard_*.pt"))) == 1
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    monkeypatch.setattr(torch, "save", real_save)
    extract_reference_features(opts)
    assert load_pt(out)["features"].shape[0] == 16 and not shards.exists()


# ---------------------------------------------------------------- usage errors, every script

SCRIPTS = ("train_ddpm.py", "generate_training_data.py", "train_direct_decoder.py", "test_direct_decoder.py",
           "extract_reference_features.py", "attribution_generation.py", "run_pipeline.py", "verify_models.py",
           "train_classifier.py", "serve.py")
BENCHES = tuple(f"bench/{path.name}" for path in sorted((REPO / "bench").glob("*.py")) if path.name != "common.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_errors_are_one_line_exit_1(script, monkeypatch, capsys, tmp_path):
    """A mistyped flag is bad input (exit 1), not a missing model (exit 2, which argparse would use)."""
    monkeypatch.chdir(tmp_path)
    for args, needle in ((["--no_such_flag", "1"], "--no_such_flag"), (["--cpu", "--cpu=3"], "--cpu")):
        code, out, err = run_main_in_process(REPO / script, args, monkeypatch, capsys)
        _assert_refused(code, err, 1, (needle, "--help"))
        assert len(err.strip().splitlines()) == 1 and not out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", SCRIPTS + BENCHES)
def test_help_explains_every_option_with_its_default(script, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main_in_process(REPO / script, ["--help"], monkeypatch, capsys)
    assert code == 0
    usage, _, body = out.partition("options:")
    taking_values = set(re.findall(r"\[(--[\w-]+) [A-Z_{]", usage))
    flags = set(re.findall(r"\[(--[\w-]+)\]", usage)) - {"--help"}
    blocks = re.split(r"\n(?=  -)", body)
    for option in taking_values | flags:
        block = next((b for b in blocks if re.match(rf"\s*(-\w, )?{option}\b", b)), None)
        assert block is not None, f"{script}: {option} has no help entry"
        words = re.sub(rf"^\s*(-\w, )?{option}( \S+)?", "", block).split()
        assert len(words) >= 3, f"{script}: {option} is not explained: {block!r}"
        if option in taking_values:
            assert "(default:" in " ".join(words), f"{script}: {option} does not show its default"


# ---------------------------------------------------------------- benches

BENCH_MISSING_INPUT = {
    "average_teacher_checkpoints.py": ["MISSING", "MISSING", "--out", "OUT"],
    # script: arguments, with MISSING where a model goes; OUT is where the bench would write its record
    "bench_attribution_analysis.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING",
                                      "--ref_features_path", "MISSING", "--record", "OUT", "--cpu"],
    "bench_attribution_label_free.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING",
                                        "--ref_features_path", "MISSING", "--record", "OUT", "--cpu"],
    "bench_attribution_neighbours.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING",
                                        "--ref_features_path", "MISSING", "--record", "OUT", "--cpu"],
    "bench_bottleneck_control.py": ["--students", "MISSING", "--record", "OUT", "--cpu"],
    "bench_class_hook.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING", "--ref_features_path", "MISSING",
                            "--record", "OUT", "--cpu"],
    "bench_counterfactual_attribution.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING",
                                            "--ref_features_path", "MISSING", "--record", "OUT", "--cpu"],
    "bench_ddim_quality.py": ["--ckpt", "MISSING", "--out", "OUT", "--cpu"],
    "bench_demo_student.py": ["--ckpt", "MISSING", "--record", "OUT", "--cpu"],
    "bench_distributed.py": ["--ckpt", "MISSING", "--out", "OUT"],
    "bench_encoder_cost.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING", "--record", "OUT"],
    "bench_features.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING", "--record", "OUT", "--cpu"],
    "bench_generate.py": ["--ckpt", "MISSING", "--out", "OUT", "--cpu"],
    "bench_layer_hooks.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING", "--ref_features_path", "MISSING",
                             "--record", "OUT", "--figures_dir", "OUT", "--cpu"],
    "bench_hook_variety.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING", "--ref_features_path", "MISSING",
                              "--record", "OUT", "--cpu"],
    "bench_serve.py": ["--teacher", "MISSING", "--student", "MISSING", "--record", "OUT", "--cpu"],
    "bench_shape_rule_cost.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING", "--ref_features_path",
                                 "MISSING", "--record", "OUT", "--cpu"],
    "bench_student_quality.py": ["--ddpm_ckpt", "MISSING", "--data_path", "MISSING", "--students", "MISSING",
                                 "--record", "OUT", "--cpu"],
    "bench_student_generalization.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING", "--record", "OUT",
                                        "--cpu"],
    "eval_teacher.py": ["--ckpt", "MISSING", "--out", "OUT", "--cpu"],
    "make_figures.py": ["--ddpm_ckpt", "MISSING", "--decoder_ckpt", "MISSING", "--ref_features_path", "MISSING",
                        "--output_dir", "OUT", "--cpu"],
    "teacher_loss_by_t.py": ["MISSING", "--record", "OUT"],
    "teacher_manifest.py": ["--ckpt", "MISSING", "--eval", "MISSING", "--out", "OUT"],
}


def test_every_bench_has_a_missing_input_case():
    assert sorted(f"bench/{name}" for name in BENCH_MISSING_INPUT) == sorted(BENCHES)


@pytest.mark.parametrize("script", BENCH_MISSING_INPUT)
def test_bench_missing_model_is_one_line_exit_2(script, monkeypatch, capsys, tmp_path):
    """A bench pointed at a checkpoint that is not there says so in one line (exit 2), like the stages, and
    appends nothing to its record."""
    monkeypatch.chdir(tmp_path)
    missing, record = tmp_path / "no_such_model.pt", tmp_path / "results" / "record.jsonl"
    args = [{"MISSING": missing, "OUT": record}.get(a, a) for a in BENCH_MISSING_INPUT[script]]
    code, _, err = run_main_in_process(REPO / "bench" / script, args, monkeypatch, capsys)
    _assert_refused(code, err, 2, ("not found", "no_such_model.pt"))
    assert list(tmp_path.iterdir()) == []


def test_serve_without_its_extra_names_the_install_command():
    """serve.py in a runtime-only install (no FastAPI): one line naming `make serve`, exit 2, before any loading."""
    import subprocess
    import sys
    from helpers import subprocess_env
    code = ("import runpy, sys; sys.modules['fastapi'] = None; sys.argv = ['serve.py', '--dry-run', '--cpu']; "
            "runpy.run_path('serve.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "fastapi" in line and "make serve" in line and "requirements-serve.txt" in line
