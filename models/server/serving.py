"""serve.py's work: load the served pair, find (or build once) its reference features, open the job store, serve."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..api import DirectDecoderPipeline
from ..io.checkpoints import load_checkpoint
from ..io.device import pick_device
from ..io.errors import PipelineError, require_extra
from ..io.paths import DEFAULT_STUDENT, DEFAULT_TEACHER, REPO_ROOT
from ..stages.features import FeatureOptions, extract_reference_features
from ..stages.pipeline import PRESETS, preset_feature_options

SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "pydantic")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    teacher: str = DEFAULT_TEACHER
    student: str = DEFAULT_STUDENT
    features: str = ""      # "": found, or built once into the working directory
    workdir: str = "serve_work"
    cpu: bool = False


def default_features_path(workdir: Path, teacher_sha256: str, student_sha256: str) -> Path:
    return Path(workdir) / "features" / f"reference_features_{teacher_sha256[:12]}_{student_sha256[:12]}.pt"


def feature_candidates(workdir: Path, teacher_sha256: str, student_sha256: str) -> list[Path]:
    """Where features of this pair may already be: the server's own, `make demo`'s, the extract stage's default."""
    return [default_features_path(workdir, teacher_sha256, student_sha256), REPO_ROOT / "demo" / "reference_features.pt",
            Path(FeatureOptions.output_path)]


def find_features(candidates: list[Path], teacher_sha256: str, student_sha256: str) -> Optional[Path]:
    """The first candidate extracted from this very pair (unreadable or other pairs' files are passed over)."""
    for path in candidates:
        if not path.is_file():
            continue
        try:
            meta = load_checkpoint(path, "cpu", what="reference features", mmap=True).get("metadata", {})
        except PipelineError:
            continue
        if meta.get("teacher_sha256") == teacher_sha256 and meta.get("student_sha256") == student_sha256:
            return path
    return None


def build_features(teacher: str, student: str, out: Path, cpu: bool) -> Path:
    """Reference features of the pair with the `make demo` preset's extraction settings (minutes on a CPU, once)."""
    preset = PRESETS["demo"]
    print(f"serve: no reference features for this pair yet; extracting them once into {out}")
    extract_reference_features(preset_feature_options(preset, teacher, student, str(out), cpu))
    return out


def load_served_pipeline(opts: ServeOptions, dry_run: bool = False) -> tuple[Optional[DirectDecoderPipeline], dict]:
    """The pipeline with its features, and what the server reports about them in /v1/info."""
    start = time.perf_counter()
    workdir = Path(opts.workdir)
    bare = DirectDecoderPipeline.load(opts.teacher, opts.student, device=str(pick_device(opts.cpu)))
    t_sha, s_sha = bare.teacher.sha256, bare.student.sha256
    if opts.features:
        features = Path(opts.features)
    else:
        features = find_features(feature_candidates(workdir, t_sha, s_sha), t_sha, s_sha)
    info = {"teacher": str(opts.teacher), "teacher_sha256": t_sha, "student": str(opts.student),
            "student_sha256": s_sha, "features": str(features) if features else None, "workdir": str(workdir),
            "device": str(bare.device)}
    if dry_run:
        if features is None:
            info["features_to_build"] = str(default_features_path(workdir, t_sha, s_sha))
        else:
            bare.with_features(str(features))
        return None, info
    if features is None:
        features = build_features(opts.teacher, opts.student, default_features_path(workdir, t_sha, s_sha), opts.cpu)
        info["features"] = str(features)
    pipe = bare.with_features(str(features))
    info.update(n_reference=len(pipe.reference["labels"]),
                classes=sorted(int(c) for c in pipe.reference["labels"].unique()),
                dataset=pipe.reference["metadata"]["dataset"], load_s=round(time.perf_counter() - start, 2))
    return pipe, info


def serve(opts: ServeOptions, dry_run: bool = False) -> dict:
    require_extra(SERVER_MODULES, "serve", "serve")
    if not 0 <= opts.port <= 65535:
        raise PipelineError(f"--port must be in 0..65535, got {opts.port}")
    pipe, info = load_served_pipeline(opts, dry_run)
    if dry_run:
        print(json.dumps({"options": asdict(opts), **info}, indent=2))
        return info
    import uvicorn

    from .app import create_app
    from .generation import GenerationService
    from .jobs import JobManager
    jobs = JobManager(Path(opts.workdir), {"teacher": str(Path(opts.teacher).resolve()),
                                           "student": str(Path(opts.student).resolve()),
                                           "features": str(Path(info["features"]).resolve())})
    app = create_app(GenerationService(pipe), jobs, info)
    print(f"serve: {info['n_reference']} reference features, pair loaded in {info['load_s']}s; "
          f"http://{opts.host}:{opts.port}/ (jobs and their logs in {Path(opts.workdir) / 'jobs'})", flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="warning")
    return info
