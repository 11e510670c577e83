"""Distillation of the teacher's deterministic sampler into the one-step direct decoder."""
from __future__ import annotations

import functools
import json
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from ..data.pairs import combine_training_pairs, load_training_pairs, read_merged_pairs, student_split
from ..diffusion.sampling import autocast_for, configure_precision
from ..evaluation.plots import plot_metric_curves
from ..io.checkpoints import load_checkpoint, without_resume_state
from ..io.device import pick_device
from ..io.distributed import Ranks, naming_rank, start as start_ranks
from ..io.errors import PipelineError
from ..io.files import append_jsonl, atomic_save, atomic_write_json, prepare_output_dir, sha256_file, truncate_jsonl
from ..io.guards import holds_output_locks, require_finite_values
from ..io.images import save_image_grid
from ..io.paths import AUDIT_CLASSIFIER, DEFAULT_CLASSIFIER, DEFAULT_TEACHER
from ..io.progress import progress_bar
from ..io.records import software_versions
from ..io.teacher_checkpoints import (checkpoint_to_resume, load_teacher, require_finite_checkpoint,
                                      restore_training_state)
from ..nets.student import GLOBAL_CONTEXT, SKIP_MODES, DirectDecoder, load_student
from ..nets.unet import recalibrate_batchnorm
from .optim import warmup_cosine

EPOCH_RE = re.compile(r"ckpt_epoch_(\d{3,})\.pt$")
LOSSES = ("mse", "huber")
ADV_REAL = ("dataset", "teacher", "both")


@dataclass
class StudentTrainOptions:
    ddpm_ckpt: str = DEFAULT_TEACHER
    data_path: str | list[str] = "direct_decoder_data/training_data.pt"  # several: merged into output_dir
    output_dir: str = "direct_decoder_results"
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    loss: str = "mse"
    huber_delta: float = 0.1
    perceptual_weight: float = 0.0
    classifier: str = DEFAULT_CLASSIFIER
    class_weight: float = 0.0   # cross-entropy of the classifier on the student's image against the teacher image's class
    adv_weight: float = 0.0     # weight of the adversarial (hinge) term; 0: regression only
    adv_start_epoch: int = 0    # epochs of regression alone (phase 1) before the adversarial phase (see training_phases)
    adv_lr: float | None = None  # the adversarial phase's peak lr (its own warm-up + cosine); None: --lr
    adv_perceptual_weight: float | None = None  # the perceptual weight in the adversarial phase; None: --perceptual_weight
    disc_warmup_steps: int = 0  # first steps of the adversarial phase in which only the discriminator learns
    adv_real: str = "dataset"   # what the discriminator sees as real: dataset digits, teacher images, or both
    adv_dataset: str = "mnist5k"
    disc_width: int = 64
    disc_lr: float = 2e-4
    disc_shift: int = 2         # random translation (pixels) of real and fake discriminator inputs
    adv_adaptive: bool = True   # scale the adversarial term to the regression's gradient at the last layer
    ema_decay: float = 0.999
    bn_samples: int = 1024      # training latents used to recompute the EMA model's BatchNorm statistics
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    n_preview: int = 8
    seed: int = 0
    skips: str = "zero"         # "zero": the decoder reads only the bottleneck; "keep": the teacher's skips
    global_context: str = "none"  # "attention": self-attention over the deepest features before the mid block
    precision: str = "bf16"     # CUDA only
    cpu: bool = False
    evaluate: bool = True
    init_from: str = ""         # continue a finished student (weights and EMA) under a new schedule / on new pairs
    init_from_other_teacher: bool = False  # allow init_from a student of another teacher with the same architecture
    fresh_discriminator: bool = False  # with init_from: a new discriminator instead of continuing the student's


def make_student_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """EMA with the usual warm-up min(decay, (1+n)/(10+n)): short runs still average something meaningful."""
    def ema_avg(avg, new, num_averaged):
        d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return d * avg + (1.0 - d) * new
    return AveragedModel(model, avg_fn=ema_avg, use_buffers=True)


def list_epoch_checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("ckpt_epoch_*.pt") if EPOCH_RE.search(p.name)]
    return sorted(found, key=lambda p: int(EPOCH_RE.search(p.name).group(1)))


def _validate(opts: StudentTrainOptions) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(opts, name) <= 0:
            raise PipelineError(f"--{name} must be positive, got {getattr(opts, name)}")
    for name in ("lr", "grad_clip"):
        if not (getattr(opts, name) > 0 and math.isfinite(getattr(opts, name))):
            raise PipelineError(f"--{name} must be a positive number, got {getattr(opts, name)}")
    if opts.skips not in SKIP_MODES:
        raise PipelineError(f"--skips must be one of {SKIP_MODES}, got {opts.skips!r}")
    if opts.global_context not in GLOBAL_CONTEXT:
        raise PipelineError(f"--global_context must be one of {GLOBAL_CONTEXT}, got {opts.global_context!r}")
    if opts.loss not in LOSSES:
        raise PipelineError(f"--loss must be one of {LOSSES}, got {opts.loss!r}")
    if not (0 <= opts.perceptual_weight < math.inf):
        raise PipelineError(f"--perceptual_weight must be finite and >= 0, got {opts.perceptual_weight}")
    for name in ("class_weight", "adv_weight"):
        if not (0 <= getattr(opts, name) < math.inf):
            raise PipelineError(f"--{name} must be finite and >= 0, got {getattr(opts, name)}")
    if opts.adv_real not in ADV_REAL:
        raise PipelineError(f"--adv_real must be one of {ADV_REAL}, got {opts.adv_real!r}")
    if opts.adv_start_epoch < 0 or opts.disc_width <= 0 or opts.disc_shift < 0 or opts.disc_warmup_steps < 0:
        raise PipelineError("--adv_start_epoch, --disc_shift and --disc_warmup_steps must be >= 0 and --disc_width "
                            "positive")
    if opts.adv_weight > 0 and opts.adv_start_epoch >= opts.epochs:
        raise PipelineError(f"--adv_start_epoch {opts.adv_start_epoch} leaves no adversarial epoch in --epochs "
                            f"{opts.epochs}; start it earlier, or drop --adv_weight")
    if opts.adv_lr is not None and not (opts.adv_lr > 0 and math.isfinite(opts.adv_lr)):
        raise PipelineError(f"--adv_lr must be a positive number, got {opts.adv_lr}")
    if opts.adv_perceptual_weight is not None and not (0 <= opts.adv_perceptual_weight < math.inf):
        raise PipelineError(f"--adv_perceptual_weight must be finite and >= 0, got {opts.adv_perceptual_weight}")
    if not (opts.disc_lr > 0 and math.isfinite(opts.disc_lr)):
        raise PipelineError(f"--disc_lr must be a positive number, got {opts.disc_lr}")
    if _uses_classifier(opts) and _is_audit_classifier(opts.classifier):
        raise PipelineError(f"--classifier {opts.classifier} is the audit classifier, which only scores students (a "
                            f"loss in its space would make its numbers meaningless); pass {DEFAULT_CLASSIFIER}")
    if not (0 < opts.val_fraction < 1):
        raise PipelineError(f"--val_fraction must be in (0, 1), got {opts.val_fraction}")
    if opts.bn_samples < 0:
        raise PipelineError(f"--bn_samples must be >= 0, got {opts.bn_samples}")
    if not (0 <= opts.ema_decay < 1):
        raise PipelineError(f"--ema_decay must be in [0, 1), got {opts.ema_decay}")


def _is_audit_classifier(path: str) -> bool:
    audit = Path(AUDIT_CLASSIFIER)
    return audit.is_file() and Path(path).is_file() and sha256_file(path) == sha256_file(audit)


def _load_init(opts: StudentTrainOptions, teacher, device):
    """The student to continue: from the same teacher, or, when asked, from another teacher of the same architecture
    (e.g. an earlier checkpoint of this one), a warm start that costs a fraction of distilling from the teacher."""
    init = load_student(opts.init_from, device)
    require_finite_checkpoint(init.checkpoint["model"], init.path, "--init_from")  # continued as well as the EMA
    if init.teacher_sha256 == teacher.sha256:
        return init
    if not opts.init_from_other_teacher:
        raise PipelineError(f"--init_from {init.path} was distilled from teacher sha256 {init.teacher_sha256[:12]}, "
                            f"but --ddpm_ckpt {opts.ddpm_ckpt} has sha256 {teacher.sha256[:12]}; pass its teacher, "
                            "or add --init_from_other_teacher to warm-start from it anyway")
    if init.decoder.teacher_config != teacher.config:
        raise PipelineError(f"--init_from {init.path} has the architecture of another teacher "
                            f"({init.decoder.teacher_config.to_dict()}) than --ddpm_ckpt {opts.ddpm_ckpt} "
                            f"({teacher.config.to_dict()}); a warm start needs the same one")
    return init


def _init_context(opts: StudentTrainOptions, init) -> str | None:
    """"added" when --global_context joins a student that had none: it starts as an identity (zero output
    projection), so the continued student begins exactly where --init_from ended."""
    if opts.global_context == "none":
        return None
    return "continued" if init.decoder.global_context == opts.global_context else "added"


def _load_init_weights(student: DirectDecoder, ema: AveragedModel, init, context_added: bool) -> None:
    if not context_added:
        student.load_state_dict(init.checkpoint["model"])
        ema.load_state_dict(init.checkpoint["model_ema"])
        return
    for module, state, prefix in ((student, init.checkpoint["model"], "context."),
                                  (ema, init.checkpoint["model_ema"], "module.context.")):
        missing, unexpected = module.load_state_dict(state, strict=False)
        if unexpected or any(not key.startswith(prefix) for key in missing):
            raise PipelineError(f"--init_from {init.path}: weights do not match the student's architecture "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _data_paths(opts: StudentTrainOptions) -> list[str]:
    return [opts.data_path] if isinstance(opts.data_path, str) else list(opts.data_path)


def _pairs(opts: StudentTrainOptions, dry_run: bool) -> tuple[Path, dict]:
    """The one pairs file to train on and its pairs: --data_path itself, or several merged into
    OUTPUT_DIR/training_data.pt (checked and combined before anything is written; not written by --dry-run; an
    earlier merge of the same files is reused)."""
    paths = _data_paths(opts)
    if len(paths) == 1:
        return Path(paths[0]), load_training_pairs(paths[0])
    merged = Path(opts.output_dir) / "training_data.pt"
    data = read_merged_pairs(paths, merged)
    if data is None:
        data = combine_training_pairs(paths)
        if not dry_run:
            prepare_output_dir(opts.output_dir)
            atomic_save(data, merged)
    return merged, data


def _init_discriminator(opts: StudentTrainOptions, init) -> str:
    """A continued adversarial student keeps its discriminator: a fresh one first has to relearn what the student
    already fools, and the student's images drift while it does (measured: val FD rose every epoch)."""
    if opts.adv_weight == 0:
        return "none"
    state = init.checkpoint.get("discriminator")
    if opts.fresh_discriminator or state is None:
        return "fresh"
    if state.get("width") != opts.disc_width:
        raise PipelineError(f"--init_from {init.path} has a discriminator of width {state.get('width')}, not "
                            f"--disc_width {opts.disc_width}; pass that width, or --fresh_discriminator")
    return "continued"


def _epochs_so_far(ckpt: dict) -> int:
    """Epochs behind a checkpoint, counting the legs it was itself continued from."""
    earlier = (ckpt.get("config") or {}).get("init_from") or {}
    return int(ckpt.get("epoch", 0)) + int(earlier.get("epochs_before", 0))


@dataclass(frozen=True)
class TrainingPhase:
    """A stretch of epochs with one set of losses and its own learning-rate schedule (warm-up + cosine)."""
    name: str
    first_epoch: int
    last_epoch: int            # exclusive
    lr: float
    perceptual_weight: float
    class_weight: float
    adv_weight: float
    disc_warmup_steps: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def training_phases(opts: StudentTrainOptions) -> list[TrainingPhase]:
    """The recipe a run follows, recorded in its checkpoints and printed by --dry-run.

    Without the adversarial term: one regression phase (pixel + perceptual + class terms). With it and
    --adv_start_epoch 0: one adversarial phase with every term from the first step (a continued student). With
    --adv_start_epoch E > 0, the recipe from a teacher: regression for E epochs (the perceptual term pulls a blurred
    student toward the teacher's shapes), then the adversarial and class terms join, the perceptual weight becomes
    --adv_perceptual_weight (measured: with it on, the regression's pull toward the average outweighs the adversarial
    term's sharpening) and the learning rate restarts its warm-up at --adv_lr, while a fresh discriminator first
    learns alone for --disc_warmup_steps steps."""
    if opts.adv_weight == 0:
        return [TrainingPhase("regression", 0, opts.epochs, opts.lr, opts.perceptual_weight, opts.class_weight, 0.0)]
    adversarial = TrainingPhase(
        "adversarial", opts.adv_start_epoch, opts.epochs,
        opts.lr if opts.adv_lr is None or opts.adv_start_epoch == 0 else opts.adv_lr,
        opts.perceptual_weight if opts.adv_perceptual_weight is None else opts.adv_perceptual_weight,
        opts.class_weight, opts.adv_weight, opts.disc_warmup_steps)
    if opts.adv_start_epoch == 0:
        return [adversarial]
    return [TrainingPhase("regression", 0, opts.adv_start_epoch, opts.lr, opts.perceptual_weight, 0.0, 0.0),
            adversarial]


def phase_of(phases: list[TrainingPhase], epoch: int) -> TrainingPhase:
    return next(p for p in phases if p.first_epoch <= epoch < p.last_epoch)


def phased_lr_factor(phases: list[TrainingPhase], steps_per_epoch: int, base_lr: float):
    """LambdaLR factor: each phase its own warm-up + cosine from its own peak, as a multiple of the optimizer's lr.
    A function of the global step alone, so --resume lands on the same rate across a phase boundary."""
    schedules = [(p.first_epoch * steps_per_epoch, p.lr / base_lr,
                  warmup_cosine((p.last_epoch - p.first_epoch) * steps_per_epoch)) for p in phases]

    def factor(step: int) -> float:
        start, scale, schedule = next(s for s in reversed(schedules) if step >= s[0])
        return scale * schedule(step - start)
    return factor


def _uses_classifier(opts: StudentTrainOptions) -> bool:
    return any(p.perceptual_weight > 0 or p.class_weight > 0 for p in training_phases(opts))


class DistillationLoss:
    """Pixel loss (MSE or Huber), plus optional terms in the project classifier's space: a perceptual one (feature
    match to the teacher image) and a class one (the teacher image's class as the target), the latter because a
    student can be close in pixels and still draw another digit. Their weights come from the current phase.
    Returns the total and its parts."""

    def __init__(self, opts: StudentTrainOptions, device):
        self.opts = opts
        self.classifier = None
        self.wants_classes = any(p.class_weight > 0 for p in training_phases(opts))
        if _uses_classifier(opts):
            from ..nets.classifier import load_classifier
            self.classifier = load_classifier(opts.classifier, device)

    @torch.no_grad()
    def teacher_classes(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor | None:
        if self.classifier is None or not self.wants_classes:
            return None
        return torch.cat([self.classifier(images[s:s + batch_size]).argmax(1)
                          for s in range(0, images.shape[0], batch_size)])

    def __call__(self, pred, target, phase: TrainingPhase, target_class=None) -> tuple[torch.Tensor, dict]:
        if self.opts.loss == "mse":
            loss = F.mse_loss(pred, target)
        else:
            loss = F.huber_loss(pred, target, delta=self.opts.huber_delta)
        parts = {"pixel": loss.item()}
        if phase.perceptual_weight > 0 or (phase.class_weight > 0 and target_class is not None):
            feats = self.classifier.features(pred)
            if phase.perceptual_weight > 0:
                perceptual = F.mse_loss(feats, self.classifier.features(target))
                loss = loss + phase.perceptual_weight * perceptual
                parts["perceptual"] = perceptual.item()
            if phase.class_weight > 0 and target_class is not None:
                class_loss = F.cross_entropy(self.classifier.head(feats), target_class)
                loss = loss + phase.class_weight * class_loss
                parts["class"] = class_loss.item()
        return loss, parts


def adaptive_adv_scale(regression: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor,
                       combine: Callable[[list], None] | None = None) -> torch.Tensor:
    """||grad regression|| / ||grad adversarial|| at the last layer (as in VQGAN), so --adv_weight is a share of the
    regression's pull, whatever the scale of the pixel loss and of the discriminator's scores. ``combine`` (torchrun)
    turns this rank's two gradients into the global batch's, in place."""
    g_reg = torch.autograd.grad(regression, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    if combine is not None:
        combine([g_reg, g_adv])
    return (g_reg.norm() / (g_adv.norm() + 1e-4)).clamp(max=1e4).detach()


def _real_images_for_discriminator(opts: StudentTrainOptions, teacher_images: torch.Tensor) -> torch.Tensor:
    from ..data.datasets import load_dataset
    parts = []
    if opts.adv_real in ("dataset", "both"):
        parts.append(load_dataset(opts.adv_dataset).images)
    if opts.adv_real in ("teacher", "both"):
        parts.append(teacher_images.cpu())
    return torch.cat(parts)


@holds_output_locks
def train_student(opts: StudentTrainOptions, resume: bool = False, dry_run: bool = False, *, locks) -> dict:
    """Under torchrun: DistributedDataParallel, --batch_size the global batch split over the ranks (rank 0 alone
    evaluates, checkpoints and writes); see README "More than one GPU or machine"."""
    ranks, device = start_ranks(pick_device(opts.cpu))
    with naming_rank(ranks):
        return _train(opts, resume, dry_run, locks, ranks, device)


def _smallest_step(n_train: int, batch_size: int) -> int:
    return n_train % batch_size or min(batch_size, n_train)


def _train(opts: StudentTrainOptions, resume: bool, dry_run: bool, locks, ranks: Ranks, device) -> dict:
    say = print if ranks.is_main else _silent
    t0 = time.perf_counter()
    if ranks.active and len(_data_paths(opts)) > 1 and not dry_run:
        ranks.main_only(lambda: _pairs(opts, dry_run) and None)  # rank 0 writes the merge; the others read it

    def load():
        _validate(opts)
        configure_precision(device, opts.precision)
        teacher = load_teacher(opts.ddpm_ckpt, device)
        data_path, data = _pairs(opts, dry_run)
        meta = data.get("metadata", {})
        if meta.get("teacher_sha256") != teacher.sha256:
            raise PipelineError(f"{data_path} was generated by teacher sha256 "
                                f"{str(meta.get('teacher_sha256'))[:12]}, but --ddpm_ckpt has {teacher.sha256[:12]}; "
                                "pass the teacher that generated it")
        n = data["noise"].shape[0]
        if n < 2:
            raise PipelineError(f"{data_path} holds {n} pair(s); need at least 2 for a train/validation split")
        init = _load_init(opts, teacher, device) if opts.init_from else None
        return teacher, data_path, data, meta, n, init

    teacher, data_path, data, meta, n, init = ranks.agree(load)
    if init is not None and init.decoder.skips != opts.skips:
        say(f"--init_from {init.path} has skips={init.decoder.skips!r}; its architecture overrides --skips")
        opts = replace(opts, skips=init.decoder.skips)
    if init is not None and init.decoder.global_context != "none" and opts.global_context == "none":
        say(f"--init_from {init.path} has global_context={init.decoder.global_context!r}; kept")
        opts = replace(opts, global_context=init.decoder.global_context)
    train_idx, val_idx = student_split(n, opts.val_fraction, opts.seed)
    per_epoch = math.ceil(len(train_idx) / opts.batch_size)
    total = per_epoch * opts.epochs
    if ranks.active and _smallest_step(len(train_idx), opts.batch_size) < ranks.world:
        ranks.everywhere(_refuse(f"--batch_size {opts.batch_size} over {len(train_idx)} training pairs leaves a step "
                                 f"of {_smallest_step(len(train_idx), opts.batch_size)} pairs, fewer than the "
                                 f"{ranks.world} ranks; choose a --batch_size whose steps all hold at least "
                                 f"{ranks.world} pairs"))
    phases = training_phases(opts)
    resolved = {"options": asdict(opts), "phases": [p.to_dict() for p in phases], "n_pairs": n, "n_train": len(train_idx), "n_val": len(val_idx),
                "steps_per_epoch": per_epoch, "total_steps": total, "device": str(device),
                "teacher": {"path": teacher.path, "sha256": teacher.sha256, "weights": teacher.weights},
                "training_data": {"path": str(data_path), "sha256": sha256_file(data_path) if data_path.is_file()
                                  else None, "metadata": meta},
                "init_from": None if init is None else {"path": init.path, "sha256": init.sha256,
                                                        "epochs_before": _epochs_so_far(init.checkpoint),
                                                        "teacher_sha256": init.teacher_sha256,
                                                        "discriminator": _init_discriminator(opts, init),
                                                        "global_context": _init_context(opts, init)}}
    if ranks.active:
        resolved["world_size"] = ranks.world
        ranks.agree(lambda: ranks.require_same((teacher.sha256, resolved["training_data"]["sha256"]),
                                               "teacher or pairs file (sha256)"))
    if dry_run:
        say(json.dumps(resolved, indent=2, default=str))
        return resolved

    def claim():
        """Rank 0: the output's lock, and the checkpoint --resume continues from."""
        out = prepare_output_dir(opts.output_dir)
        locks.hold(out)
        latest = checkpoint_to_resume(list_epoch_checkpoints(out), resume, out)
        return str(out), None if latest is None else str(latest)

    out, latest = ranks.main_only(claim)
    out = Path(out)
    noise, images = data["noise"].to(device), data["images"].to(device)
    torch.manual_seed(opts.seed)
    student = DirectDecoder.from_teacher(teacher.diffusion.model, teacher.config, opts.skips,
                                         opts.global_context).to(device)
    ema = make_student_ema(student, opts.ema_decay)
    if init is not None:
        _load_init_weights(student, ema, init, resolved["init_from"]["global_context"] == "added")
    optimizer = torch.optim.AdamW(student.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, phased_lr_factor(phases, per_epoch, opts.lr))
    loss_fn = DistillationLoss(opts, device)
    teacher_class = loss_fn.teacher_classes(images)
    selected_by = "val_loss" if opts.adv_weight == 0 else "val_fd"
    val_fd = ValidationFrechet(opts.classifier, opts.adv_dataset, device) \
        if opts.adv_weight > 0 and ranks.is_main else None
    adversarial = None
    if opts.adv_weight > 0:
        from .adversarial import AdversarialTerm
        adversarial = AdversarialTerm(_real_images_for_discriminator(opts, images[train_idx]), opts.disc_width,
                                      opts.disc_lr, opts.disc_shift, device)
        if resolved["init_from"] and resolved["init_from"]["discriminator"] == "continued":
            adversarial.load_state_dict(init.checkpoint["discriminator"], lr=opts.disc_lr)
    start_epoch, best_val = 0, math.inf

    def restore():
        ckpt = load_checkpoint(Path(latest), device, what="checkpoint to resume")
        if ckpt["config"]["total_steps"] != total or ckpt["teacher"]["sha256"] != teacher.sha256:
            raise PipelineError(f"--resume with different data, teacher or length than {Path(latest).name}; "
                                "use the original command")
        restore_training_state(ckpt, student, ema, optimizer, scheduler)
        if adversarial is not None:
            if "discriminator" not in ckpt:
                raise PipelineError(f"{Path(latest).name} was written without the adversarial term; resume it "
                                    "without --adv_weight, or start a new --output_dir")
            adversarial.load_state_dict(ckpt["discriminator"])
        if ckpt["config"].get("phases", resolved["phases"]) != resolved["phases"]:
            raise PipelineError(f"--resume with another recipe than {Path(latest).name} "
                                f"({json.dumps(ckpt['config']['phases'])}); use the original command")
        return int(ckpt["epoch"]), float(ckpt.get("best_score", ckpt.get("best_val_loss")))

    if latest is not None:
        start_epoch, best_val = ranks.agree(restore)  # every rank reads rank 0's checkpoint (a shared filesystem)
        say(f"resumed from {latest} (epoch {start_epoch}/{opts.epochs})")

    def record_start():
        truncate_jsonl(out / "stats.jsonl", "epoch", start_epoch)  # records of an epoch whose checkpoint was never written
        atomic_write_json(resolved | {"versions": software_versions()}, out / "training_options.json")

    ranks.main_only(record_start)
    model = student
    if adversarial is not None:  # rank 0 alone drew the validation classifier's init: the ranks' draws differ
        ranks.copy_from_main_(adversarial.discriminator)
    if ranks.active:  # after any restore: DDP starts every rank from rank 0's weights and buffers
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)

    preview = val_idx[:opts.n_preview]
    stats_path = out / "stats.jsonl"
    say(f"teacher {teacher.path} + {n} pairs loaded to {device} in {time.perf_counter() - t0:.2f}s; "
        f"{len(train_idx)} train / {len(val_idx)} val, {total} steps"
        + (f"; {ranks.world} ranks, {opts.batch_size} pairs per step in all" if ranks.active else ""))
    for epoch in range(start_epoch, opts.epochs):
        epoch_start = time.perf_counter()
        student.train()
        order = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(opts.seed * 7919 + epoch))]
        running, seen = 0.0, 0
        part_sums: dict[str, float] = {}
        # augmentation and real-batch draws of this epoch, replayed identically by --resume
        adv_gen = torch.Generator().manual_seed(opts.seed * 104729 + epoch)
        phase = phase_of(phases, epoch)
        if epoch == phase.first_epoch and epoch > 0:
            say(f"epoch {epoch + 1}: {phase.name} phase ({json.dumps(phase.to_dict())})")
        use_adv = adversarial is not None and phase.adv_weight > 0
        bar = progress_bar(range(per_epoch), desc=f"epoch {epoch + 1}/{opts.epochs}", unit="step", dynamic_ncols=True,
                   leave=False, disable=not ranks.is_main)
        for s in bar:
            idx = order[s * opts.batch_size:(s + 1) * opts.batch_size]
            rows, share, combine = None, 1.0, None
            if ranks.active:  # this rank's rows of the global batch, and its share of the batch's mean
                lo, hi = ranks.split(len(idx))
                rows, share, idx = (lo, hi, len(idx)), (hi - lo) / len(idx), idx[lo:hi]
                combine = functools.partial(ranks.weighted_mean_, weight=share)
            with autocast_for(device, opts.precision):
                pred = model(noise[idx]).float()
                loss, parts = loss_fn(pred, images[idx], phase, None if teacher_class is None else teacher_class[idx])
                phase_step = (epoch - phase.first_epoch) * per_epoch + s
                if use_adv:
                    parts["disc"] = adversarial.discriminator_step(pred, adv_gen, rows, combine)
                if use_adv and phase_step >= phase.disc_warmup_steps:
                    adv_loss = adversarial.generator_loss(pred, adv_gen, rows)
                    scale = adaptive_adv_scale(loss, adv_loss, student.unet.final_conv.weight, combine) \
                        if opts.adv_adaptive else 1.0
                    loss = loss + phase.adv_weight * scale * adv_loss
                    parts["adv"], parts["adv_scale"] = adv_loss.item(), float(scale)
            stopped = (f"stopped in epoch {epoch + 1}. The last good checkpoint is kept in {out}; lower --lr (or "
                       "--disc_lr / --adv_weight) and --resume, or start again")
            values = parts | {"total": loss.item()}
            if ranks.active:  # the global batch's means, as one process computes them
                summed = ranks.sum(torch.tensor([v * share for v in values.values()], dtype=torch.float64,
                                                device=device))
                values = dict(zip(values, summed.tolist()))
                parts = {k: values[k] for k in parts}
            ranks.everywhere(lambda: require_finite_values(values, "loss", stopped))
            (loss * (share * ranks.world) if ranks.active else loss).backward()  # DDP averages over ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), opts.grad_clip)
            ranks.everywhere(lambda: require_finite_values({"gradient norm": grad_norm.item()},
                                                           "the student's gradient", stopped))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ema.update_parameters(student)
            n_step = len(idx) if rows is None else rows[2]
            running += values["total"] * n_step
            seen += n_step
            for k, v in parts.items():
                part_sums[k] = part_sums.get(k, 0.0) + v * n_step
            bar.set_postfix(loss=f"{running / seen:.4f}")
        bar.close()

        def end_of_epoch():
            """Rank 0: BatchNorm statistics, validation, the epoch's files; the other ranks wait."""
            nonlocal best_val
            recalibrate_batchnorm(ema.module, noise[train_idx[:opts.bn_samples]], opts.batch_size)
            val_loss = evaluate_loss(ema.module, noise[val_idx], images[val_idx], opts.batch_size, device,
                                     opts.precision)
            require_finite_values({"val_loss": val_loss}, "the EMA student's validation loss",
                                  f"stopped in epoch {epoch + 1}, before saving it. The last good checkpoint is kept "
                                  f"in {out}; lower --lr and --resume, or start again")
            epoch_no = epoch + 1
            fd = None if val_fd is None else val_fd(ema.module, noise[val_idx])
            record = {"epoch": epoch_no, "phase": phase.name, "train_loss": running / seen, "val_loss": val_loss,
                      **({} if fd is None else {"val_fd": fd}),
                      **{f"train_{k}": v / seen for k, v in part_sums.items()},
                      "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - epoch_start}
            append_jsonl(record, stats_path)
            # an adversarial student moves away from the teacher's pixels on purpose, so it is selected by FD
            score = val_loss if selected_by == "val_loss" else fd
            improved = score < best_val
            best_val = min(best_val, score)
            ckpt = {"kind": "direct_decoder", "model": student.state_dict(), "model_ema": ema.state_dict(),
                    "model_args": student.model_args, "config": resolved, "epoch": epoch_no,
                    "val_loss": val_loss, "best_score": best_val, "selected_by": selected_by,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "teacher": resolved["teacher"],
                    "training_data": resolved["training_data"], "versions": software_versions()}
            if adversarial is not None:
                ckpt["discriminator"] = adversarial.state_dict()
            with torch.inference_mode():
                student_preview = ema.module.eval()(noise[preview]).float().clamp(-1, 1)
            save_image_grid(torch.cat([images[preview], student_preview]), out / f"samples_epoch_{epoch_no:03d}.png",
                            nrow=len(preview))
            if improved:  # what the later stages load; --resume reads the epoch checkpoint
                atomic_save(without_resume_state(ckpt), out / "best_model.pt")
            plot_metric_curves(stats_path, out / "loss.png", keys=("train_loss", "val_loss"), x="epoch", log_y=True)
            # last: --resume continues after the newest epoch checkpoint, so the epoch's other files must be written
            atomic_save(ckpt, out / f"ckpt_epoch_{epoch_no:03d}.pt")
            print(f"epoch {epoch_no}/{opts.epochs}: train {record['train_loss']:.5f}  val {val_loss:.5f}"
                  f"{'' if fd is None else f'  val FD {fd:.2f}'}"
                  f"{'  (best)' if improved else ''}  {record['seconds']:.1f}s")

        ranks.main_only(end_of_epoch)
    best_val = ranks.broadcast(best_val)

    def finish():
        summary = {"output_dir": str(out), f"best_{selected_by}": best_val, "epochs": opts.epochs,
                   "wall_s": time.perf_counter() - t0}
        if opts.evaluate:
            from ..evaluation.evaluate import evaluate_student_checkpoint
            report = evaluate_student_checkpoint(opts.ddpm_ckpt, str(out / "best_model.pt"), data_path,
                                                 out / "evaluation.json", cpu=opts.cpu, classifier_path=opts.classifier)
            summary["evaluation"] = report
        print(f"train_direct_decoder: {opts.epochs} epochs, best {selected_by.replace('_', ' ')} {best_val:.5f}, "
              f"{summary['wall_s']:.0f}s, best model {out / 'best_model.pt'}")
        return summary

    return ranks.main_only(finish)


def _silent(*args, **kwargs) -> None:
    """print on ranks other than 0."""


def _refuse(message: str):
    def fail():
        raise PipelineError(message)
    return fail


def evaluate_only(opts: StudentTrainOptions, decoder_ckpt: str, dry_run: bool = False) -> dict:
    """The end-of-training evaluation as its own command, for any student checkpoint."""
    from ..evaluation.evaluate import evaluate_student_checkpoint
    out = Path(opts.output_dir)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"output directory {out} exists and is a file; choose another --output_dir")
    paths = _data_paths(opts)
    if len(paths) != 1:
        raise PipelineError("--evaluate_only reads one pairs file; for a student trained on several, pass the "
                            "merged OUTPUT_DIR/training_data.pt it was trained on")
    data_path = paths[0]
    if dry_run:
        plan = {"evaluate": decoder_ckpt, "ddpm_ckpt": opts.ddpm_ckpt, "data_path": data_path,
                "output": str(out / "evaluation.json"), "classifier": opts.classifier}
        print(json.dumps(plan, indent=2))
        return plan
    out.mkdir(parents=True, exist_ok=True)
    return evaluate_student_checkpoint(opts.ddpm_ckpt, decoder_ckpt, data_path, out / "evaluation.json",
                                       cpu=opts.cpu, classifier_path=opts.classifier)


class ValidationFrechet:
    """Fréchet distance of the EMA student's validation images to real digits, in the project classifier's space:
    a per-epoch quality signal (and the selection score of adversarial runs). The audit classifier stays unseen."""

    def __init__(self, classifier_path: str, dataset: str, device, n_real: int = 5000):
        from ..nets.classifier import load_classifier
        from ..data.datasets import load_dataset
        self.classifier = load_classifier(classifier_path, device)
        self.real = self._features(load_dataset(dataset).images[:n_real].to(device))

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(x[s:s + 1000]) for s in range(0, x.shape[0], 1000)])

    @torch.no_grad()
    def __call__(self, model, noise: torch.Tensor) -> float:
        from ..evaluation.metrics import frechet_distance
        model.eval()
        images = torch.cat([model(noise[s:s + 500]).float().clamp(-1, 1) for s in range(0, noise.shape[0], 500)])
        return frechet_distance(self._features(images), self.real)


@torch.no_grad()
def evaluate_loss(model, noise, images, batch_size, device, precision) -> float:
    model.eval()
    total = 0.0
    for s in range(0, noise.shape[0], batch_size):
        with autocast_for(device, precision):
            pred = model(noise[s:s + batch_size]).float()
        total += F.mse_loss(pred, images[s:s + batch_size], reduction="sum").item()
    return total / images.numel()
