"""verify_models.py: a manifest of checkpoints (path, size, sha256, kind) that passes while the files are intact and
fails with exit 2 and the fix when one is corrupted or missing. Manifest paths are relative to the working
directory, so every run happens in a temporary directory."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_pt, one_error_line, run_main_in_process, subprocess_env
from models.io.errors import PipelineError
from models.io.files import sha256_file
from models.io.manifest import add_entry, verify

TEACHER, STUDENT = "ckpts/teacher.pt", "ckpts/student.pt"


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_teacher_ckpt, tiny_student) -> Path:
    (tmp_path / "ckpts").mkdir()
    shutil.copyfile(tiny_teacher_ckpt, tmp_path / TEACHER)
    shutil.copyfile(tiny_student, tmp_path / STUDENT)
    monkeypatch.chdir(tmp_path)
    add_entry(TEACHER, "python train_ddpm.py --steps 8", Path("MANIFEST.json"))
    add_entry(STUDENT, "python train_direct_decoder.py --epochs 2", Path("MANIFEST.json"))
    return tmp_path


@pytest.fixture
def verify_in_process(workdir, repo_root, monkeypatch, capsys):
    """verify_models.py's __main__ in this interpreter, with the cwd at workdir: (exit code, stdout, stderr)."""
    return lambda *args: run_main_in_process(repo_root / "verify_models.py", ["--manifest", "MANIFEST.json", *args],
                                             monkeypatch, capsys)


def _verify_cli(workdir: Path, repo_root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(repo_root / "verify_models.py"), "--manifest", "MANIFEST.json", *args],
                          cwd=workdir, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def _row(stdout: str, path: str) -> str:
    rows = [line for line in stdout.splitlines() if line.split()[1:2] == [path]]
    assert len(rows) == 1, stdout
    return rows[0]


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_entries(workdir):
    entries = json.loads((workdir / "MANIFEST.json").read_text())
    assert set(entries) == {TEACHER, STUDENT}
    for path, kind in ((TEACHER, None), (STUDENT, "direct_decoder")):
        e = entries[path]
        assert e["sha256"] == sha256_file(workdir / path) and e["size"] == (workdir / path).stat().st_size
        assert e["produced_by"].startswith("python ")
        if kind:
            assert e["kind"] == kind
        else:
            assert "teacher" in e["kind"]
    assert entries[TEACHER]["data_source"] == "mnist5k"
    assert entries[TEACHER]["model_args"]["base_dim"] == 4


def test_intact_files_pass_and_are_listed(workdir, repo_root):
    proc = _verify_cli(workdir, repo_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries = json.loads((workdir / "MANIFEST.json").read_text())
    for path, e in entries.items():
        row = _row(proc.stdout, path)
        assert row.split()[0] == "ok"
        assert f"{e['size']} B" in row and e["sha256"][:16] in row and str(e["kind"]) in row
        assert e["produced_by"] in row
    assert "2 checkpoint(s) intact" in proc.stdout
    assert "error" not in proc.stderr.lower()


def test_flipped_byte_is_a_mismatch(workdir, repo_root, verify_in_process):
    _flip_middle_byte(workdir / TEACHER)
    proc = _verify_cli(workdir, repo_root)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert _row(proc.stdout, TEACHER).split()[0] == "MISMATCH"
    assert _row(proc.stdout, STUDENT).split()[0] == "ok"
    err = one_error_line(proc.stderr)
    assert TEACHER in err, proc.stderr
    assert f"git checkout -- {TEACHER}" in err
    # checking only the intact entry passes
    code, out, _ = verify_in_process(STUDENT)
    assert code == 0 and "1 checkpoint(s) intact" in out


def test_missing_file(workdir, verify_in_process):
    (workdir / STUDENT).unlink()
    code, out, err = verify_in_process()
    assert code == 2
    assert _row(out, STUDENT).split()[0] == "MISSING" and _row(out, TEACHER).split()[0] == "ok"
    line = one_error_line(err)
    assert STUDENT in line
    assert "missing" in line and "train_direct_decoder.py" in line


def test_replaced_file_and_missing_manifest(workdir, verify_in_process):
    # another valid checkpoint under an entry's name is caught (it loads fine; only the manifest can tell)
    shutil.copyfile(workdir / STUDENT, workdir / TEACHER)
    with pytest.raises(PipelineError) as info:
        verify(Path("MANIFEST.json"))
    assert info.value.exit_code == 2 and "does not match" in str(info.value)
    code, _, err = verify_in_process("--manifest", "nowhere.json")
    assert code == 2 and err.startswith("error: ") and "nowhere.json not found" in err


def test_continuation_records_its_total_steps(workdir):
    """A teacher continued with --init_from counts only its own leg in `step`; the manifest adds the earlier legs."""
    ckpt = load_pt(workdir / TEACHER)
    ckpt["config"] = {**ckpt["config"], "steps_before": 14000}
    torch.save(ckpt, workdir / "ckpts/continued.pt")
    entry = add_entry("ckpts/continued.pt", "python train_ddpm.py --init_from ckpts/teacher.pt", Path("MANIFEST.json"))
    assert entry["step"] == ckpt["step"] and entry["steps_total"] == int(ckpt["step"]) + 14000
    assert "steps_total" not in json.loads((workdir / "MANIFEST.json").read_text())[TEACHER]


# ---------------------------------------------------------------- records beside a checkpoint

def _write(path: Path, text: str) -> None:
    path.write_text(text)


def test_add_records_the_files_named_after_the_checkpoint(workdir, verify_in_process):
    """--add takes NAME.json and NAME_* beside NAME.pt as its records (checked by hash); a longer-named checkpoint
    (teacher_audit.pt) keeps its own records; a record that breaks fails like a checkpoint."""
    ckpts = workdir / "ckpts"
    for name in ("teacher.json", "teacher_eval.png", "teacher_stats.jsonl", "teacher_audit.json", "other.json"):
        _write(ckpts / name, name)
    shutil.copyfile(ckpts / "teacher.pt", ckpts / "teacher_audit.pt")
    add_entry(TEACHER, "python train_ddpm.py --steps 8", Path("MANIFEST.json"))
    entries = json.loads((workdir / "MANIFEST.json").read_text())
    records = {name for name, e in entries.items() if e.get("record_of") == TEACHER}
    assert records == {"ckpts/teacher.json", "ckpts/teacher_eval.png", "ckpts/teacher_stats.jsonl"}
    assert entries["ckpts/teacher.json"]["sha256"] == sha256_file(ckpts / "teacher.json")
    code, out, _ = verify_in_process()
    assert code == 0 and "2 checkpoint(s) intact, with 3 record file(s)" in out
    assert _row(out, "ckpts/teacher_eval.png").split()[:2] == ["ok", "ckpts/teacher_eval.png"]
    _write(ckpts / "teacher_eval.png", "changed")
    code, out, err = verify_in_process()
    assert code == 2 and _row(out, "ckpts/teacher_eval.png").split()[0] == "MISMATCH"
    assert "git checkout -- ckpts/teacher_eval.png" in one_error_line(err)


def test_readding_a_replaced_checkpoint_replaces_its_records(workdir, verify_in_process):
    """How a new shipped checkpoint enters the manifest: one --add; records it no longer has are dropped, and the
    date added changes only when the checkpoint does."""
    ckpts = workdir / "ckpts"
    _write(ckpts / "student_evaluation.json", "{}")
    _write(ckpts / "student_old_notes.json", "{}")
    add_entry(STUDENT, "python train_direct_decoder.py --epochs 2", Path("MANIFEST.json"))
    entries = json.loads((workdir / "MANIFEST.json").read_text())
    entries[STUDENT]["added"] = "2000-01-01"
    (workdir / "MANIFEST.json").write_text(json.dumps(entries))
    add_entry(STUDENT, "python train_direct_decoder.py --epochs 2", Path("MANIFEST.json"))
    assert json.loads((workdir / "MANIFEST.json").read_text())[STUDENT]["added"] == "2000-01-01"

    (ckpts / "student_old_notes.json").unlink()
    shutil.copyfile(workdir / TEACHER, workdir / STUDENT)  # "a new student"
    code, out, err = verify_in_process("--add", STUDENT, "--produced_by", "python train_direct_decoder.py --new",
                                       "--note", "the replacement")
    assert code == 0 and f"recorded {STUDENT}" in out
    entries = json.loads((workdir / "MANIFEST.json").read_text())
    assert {n for n, e in entries.items() if e.get("record_of") == STUDENT} == {"ckpts/student_evaluation.json"}
    new = entries[STUDENT]
    assert new["sha256"] == sha256_file(workdir / STUDENT) and new["added"] != "2000-01-01"
    assert new["produced_by"] == "python train_direct_decoder.py --new" and new["note"] == "the replacement"
    code, out, _ = verify_in_process()
    assert code == 0 and "2 checkpoint(s) intact, with 1 record file(s)" in out


def test_unlisted_files_are_shown_not_failed(workdir, verify_in_process):
    (workdir / "MANIFEST.json").rename(workdir / "ckpts" / "MANIFEST.json")
    entries = json.loads((workdir / "ckpts" / "MANIFEST.json").read_text())
    _write(workdir / "ckpts" / "stray.pt", "x")
    code, out, _ = verify_in_process("--manifest", "ckpts/MANIFEST.json")
    assert code == 0 and len(entries) == 2
    assert _row(out, "ckpts/stray.pt").split()[0] == "unlisted" and "--add ckpts/stray.pt" in out


# ---------------------------------------------------------------- the shipped manifest

REPO = Path(__file__).resolve().parents[1]


def _tracked_checkpoint_files() -> list[str]:
    proc = subprocess.run(["git", "-C", str(REPO), "ls-files", "checkpoints"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout ({proc.stderr.strip()[:200]}): the tracked files cannot be listed")
    return sorted(proc.stdout.split())


def test_shipped_manifest_lists_exactly_the_tracked_files_under_40_mb():
    tracked = _tracked_checkpoint_files()
    listed = json.loads((REPO / "checkpoints" / "MANIFEST.json").read_text())
    assert sorted(listed) == [p for p in tracked if p != "checkpoints/MANIFEST.json"]
    shipped = ("teacher_mnist5k.pt", "student_mnist5k.pt", "classifier_mnist5k.pt", "classifier_mnist5k_audit.pt")
    kinds = {listed[f"checkpoints/{name}"]["kind"] for name in shipped}
    assert kinds == {"teacher", "direct_decoder", "classifier"}
    assert sum((REPO / p).stat().st_size for p in tracked) < 40e6


def test_verify_models_passes_on_the_shipped_files(repo_root, monkeypatch, capsys):
    """What a fresh clone runs (`make verify`): every shipped file intact, every checkpoint loadable."""
    monkeypatch.chdir(repo_root)
    code, out, err = run_main_in_process(repo_root / "verify_models.py", [], monkeypatch, capsys)
    assert code == 0, err
    listed = json.loads((repo_root / "checkpoints" / "MANIFEST.json").read_text())
    for path in listed:
        assert _row(out, path).split()[0] == "ok"
    checkpoints = sum(e["kind"] != "record" for e in listed.values())
    assert f"{checkpoints} checkpoint(s) intact, with {len(listed) - checkpoints} record file(s)" in out


def test_teacher_record_goes_through_the_one_writer(tiny_teacher_run, tmp_path, repo_root, monkeypatch, capsys):
    """bench/teacher_manifest.py writes CKPT.json with models.io.manifest's identity (path, sha256, size_bytes), and
    --refresh_eval replaces only the evaluation (and status)."""
    ckpt = tmp_path / "teacher.pt"
    shutil.copyfile(tiny_teacher_run["final"], ckpt)
    digest = sha256_file(ckpt)
    evaluation = tmp_path / "teacher_eval.json"
    evaluation.write_text(json.dumps({"sha256": digest, "sampler": "ddim K=2", "n": 4, "teacher": {"fd": 1.0}}))
    bench = repo_root / "bench" / "teacher_manifest.py"
    code, out, err = run_main_in_process(bench, ["--ckpt", str(ckpt), "--run_dir", str(tiny_teacher_run["dir"]),
                                                 "--command", "python train_ddpm.py --steps 8", "--wall_s", "3",
                                                 "--eval", str(evaluation)], monkeypatch, capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "teacher.json").read_text())
    assert (record["path"], record["sha256"], record["size_bytes"]) == (str(ckpt), digest, ckpt.stat().st_size)
    assert record["steps"] == 8 and record["evaluation"]["n"] == 4 and record["command"].endswith("--steps 8")
    evaluation.write_text(json.dumps({"sha256": digest, "sampler": "ddim K=2", "n": 8, "teacher": {"fd": 0.5}}))
    code, _, err = run_main_in_process(bench, ["--ckpt", str(ckpt), "--refresh_eval", "--status", "evaluated again",
                                               "--eval", str(evaluation)], monkeypatch, capsys)
    assert code == 0, err
    refreshed = json.loads((tmp_path / "teacher.json").read_text())
    assert refreshed["evaluation"]["n"] == 8 and refreshed["status"] == "evaluated again"
    assert {k: v for k, v in refreshed.items() if k not in ("evaluation", "status")} == \
        {k: v for k, v in record.items() if k not in ("evaluation", "status")}
