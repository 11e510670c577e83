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
from models.io import PipelineError, sha256_file
from models.manifest import add_entry, verify

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
    rows = [line for line in stdout.splitlines() if f" {path} " in f" {line} "]
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
