"""Reading teacher checkpoints: ours (self-describing) and upstream MNISTDiffusion's (config inferred)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..nets.teacher import MNISTDiffusion, TeacherConfig
from .checkpoints import load_checkpoint
from .errors import PipelineError
from .files import sha256_file
from .guards import require_finite_weights

TEACHER_FIX = "pass an MNISTDiffusion checkpoint (train one with `python train_ddpm.py`, or use checkpoints/teacher_mnist5k.pt)"
BROKEN_WEIGHTS_FIX = ("the run that saved it diverged or the file was damaged, and a rerun cannot help: use an "
                      "earlier checkpoint of that run, or retrain")
EMA_PREFIX = "module."


def total_steps(ckpt: dict) -> int:
    """Optimizer steps since initialisation over every leg: a ``--init_from`` continuation's ``step`` counts only
    its own leg, and its config records the steps before it."""
    return int(ckpt.get("step") or 0) + int((ckpt.get("config") or {}).get("steps_before") or 0)


def strip_ema(ema_state: dict) -> dict:
    """AveragedModel keeps the wrapped module under ``module.`` and adds ``n_averaged``."""
    return {k[len(EMA_PREFIX):]: v for k, v in ema_state.items() if k.startswith(EMA_PREFIX)}


def inference_weights(ckpt: dict, prefer_ema: bool = True) -> tuple[dict, str]:
    """The weights to run: the EMA average when there is one (and it is wanted), else the raw weights."""
    if prefer_ema and isinstance(ckpt.get("model_ema"), dict):
        return strip_ema(ckpt["model_ema"]), "ema"
    return ckpt["model"], "model"


def require_finite_checkpoint(state: dict, path, what: str, weights: str = "model") -> None:
    """Refuses, before any work, a checkpoint whose weights (``weights``: "ema" or the raw "model") hold NaN/Inf."""
    require_finite_weights(state, f"{what} {path} ({'EMA' if weights == 'ema' else 'raw'} weights)",
                           BROKEN_WEIGHTS_FIX)


def load_strict(module: torch.nn.Module, state: dict, path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise PipelineError(f"{path}: weights do not match {what} ({str(err).splitlines()[0][:200]})") from err


def checkpoint_to_resume(existing: list, resume: bool, out) -> "Path | None":
    """The checkpoint --resume continues from; without --resume, existing checkpoints are never overwritten."""
    if existing and not resume:
        raise PipelineError(f"{out} already holds checkpoints (latest {existing[-1].name}); pass --resume to "
                            "continue, or choose another --output_dir")
    return existing[-1] if resume and existing else None


def restore_training_state(ckpt: dict, model, ema, optimizer, scheduler) -> None:
    """Everything --resume needs besides the step counter, which each trainer keeps in its own unit."""
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["model_ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])


def infer_teacher_config(state: dict) -> TeacherConfig:
    """Recovers the architecture from tensor shapes, so upstream checkpoints need no architecture flags."""
    try:
        timesteps, time_dim = state["model.time_embedding.weight"].shape
        base_dim, in_channels = state["model.init_conv.module.0.weight"].shape[:2]
        n_stages = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.encoder_blocks."))
        mults = []
        for i in range(n_stages):
            half_out = state[f"model.encoder_blocks.{i}.conv1.branch1.2.module.0.weight"].shape[0]
            mults.append(2 * half_out // base_dim)
    except (KeyError, ValueError, AttributeError) as err:
        raise PipelineError(f"not an MNISTDiffusion state dict (missing {err})") from err
    image_size = 28
    return TeacherConfig(image_size=image_size, in_channels=int(in_channels), time_embedding_dim=int(time_dim),
                         timesteps=int(timesteps), base_dim=int(base_dim), dim_mults=mults)


@dataclass
class LoadedTeacher:
    diffusion: MNISTDiffusion
    config: TeacherConfig
    path: str
    sha256: str
    weights: str  # "ema" or "model"
    checkpoint: dict  # everything else the file carried (config, data source, step ...)


def load_teacher(path: str | Path, device: torch.device | str = "cpu", prefer_ema: bool = True) -> LoadedTeacher:
    ckpt = load_checkpoint(path, device, what="teacher checkpoint", fix=TEACHER_FIX)
    if ckpt.get("kind") == "direct_decoder":
        raise PipelineError(f"{path} is a direct-decoder (student) checkpoint; the teacher is the DDPM checkpoint "
                            f"it was distilled from (its sha256 is {ckpt.get('teacher', {}).get('sha256', '?')[:12]})")
    if ckpt.get("kind") not in (None, "teacher") or "model" not in ckpt:
        raise PipelineError(f"{path} is not a teacher checkpoint: expected keys 'model'/'model_ema', "
                            f"found {sorted(k for k in ckpt if not k.startswith('_'))[:6]}")
    state, weights = inference_weights(ckpt, prefer_ema)
    require_finite_checkpoint(state, path, "teacher checkpoint", weights)
    config = TeacherConfig(**ckpt["model_args"]) if "model_args" in ckpt else infer_teacher_config(state)
    if "model_args" in ckpt:
        config.dim_mults = list(config.dim_mults)
    diffusion = MNISTDiffusion(config)
    load_strict(diffusion, state, path, "the MNISTDiffusion architecture")
    diffusion.to(device).eval().requires_grad_(False)
    return LoadedTeacher(diffusion, config, str(path), sha256_file(path), weights, ckpt)
