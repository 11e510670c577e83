"""Student evaluation: fidelity to the teacher, sample quality against real images, and speed."""
from __future__ import annotations

import time

import torch

from ..data.datasets import load_dataset
from ..data.pairs import load_training_pairs, noise_seeds, student_split, trained_on
from ..diffusion.noise import per_sample_noise
from ..diffusion.sampling import DEFAULT_DDIM_STEPS, DEFAULT_SPACING, SamplerConfig, teacher_sample
from ..io.device import pick_device
from ..io.errors import PipelineError
from ..io.files import atomic_write_json, sha256_file
from ..io.paths import AUDIT_CLASSIFIER, DEFAULT_CLASSIFIER
from ..io.records import software_versions
from ..nets.classifier import load_classifier
from ..nets.student import load_teacher_and_student
from .metrics import classifier_outputs, quality_from_features

CONFIDENT = 0.9  # the teacher bar's confidence level


def shuffled_real_images(source: str, n: int, seed: int = 0) -> torch.Tensor:
    """Real images in random order: mnist5k is sorted by label, so a prefix would be all zeros."""
    data = load_dataset(source, "train")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.images[order[:n]]


@torch.inference_mode()
def _batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.inference_mode()
def images_per_second(fn, x: torch.Tensor, repeats: int = 2) -> float:
    fn(x)
    best = float("inf")
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return x.shape[0] / best


def evaluate_student_checkpoint(ddpm_ckpt: str, decoder_ckpt: str, data_path: str, output_path,
                                cpu: bool = False, classifier_path: str = DEFAULT_CLASSIFIER,
                                audit_classifier_path: str | None = AUDIT_CLASSIFIER,
                                n_real: int = 5000, speed_batch: int = 64, batch_size: int = 256) -> dict:
    """On the held-out validation pairs: pixel MSE to the teacher, class agreement, Frechet distances to real
    images (project classifier features, and the audit classifier's, which no loss uses), and images/s of student
    vs teacher at the same batch size."""
    device = pick_device(cpu)
    teacher, student = load_teacher_and_student(ddpm_ckpt, decoder_ckpt, device)
    data = load_training_pairs(data_path)
    data_sha256 = sha256_file(data_path)
    val_idx, held_out = _held_out_indices(student.checkpoint, data, data_sha256, data_path)
    noise, teacher_images = data["noise"][val_idx].to(device), data["images"][val_idx].to(device)
    student_images = _batched(lambda z: student.decoder(z).float().clamp(-1, 1), noise, batch_size)
    real = shuffled_real_images(evaluation_source(teacher.checkpoint.get("data_source")), n_real).to(device)
    scores = classifier_scores(load_classifier(classifier_path, device), student_images, teacher_images, real)
    pairs_map = SamplerConfig.from_metadata(data.get("metadata", {})).deterministic_map()
    k, name = pairs_map.steps, pairs_map.name
    z = per_sample_noise(12345, range(speed_batch), device=device)
    t_mid = torch.full((speed_batch,), teacher.config.timesteps // 2, device=device, dtype=torch.long)
    student_ips = images_per_second(student.decoder, z)
    unet_evals_per_s = images_per_second(lambda x: teacher.diffusion.predict_noise(x, t_mid), z)
    report = {
        "n_val": int(len(val_idx)), "held_out": held_out,
        "val_mse_to_teacher": torch.mean((student_images - teacher_images) ** 2).item(),
        **scores,
        "training_data": {"path": str(data_path), "sha256": data_sha256,
                          "is_the_students": data_sha256 == student.checkpoint.get("training_data", {}).get("sha256")},
        "speed": {"batch_size": speed_batch, "device": str(device), "student_images_per_s": student_ips,
                  "teacher_unet_evals_per_s": unet_evals_per_s,
                  f"teacher_{name}{k}_images_per_s": unet_evals_per_s / k,
                  "teacher_ddpm1000_images_per_s": unet_evals_per_s / teacher.config.timesteps,
                  f"speedup_vs_{name}{k}": student_ips / (unet_evals_per_s / k),
                  "speedup_vs_ddpm1000": student_ips / (unet_evals_per_s / teacher.config.timesteps),
                  "note": "teacher images/s = measured UNet evaluations/s divided by the number of steps "
                          "(sampling cost is linear in steps)"},
        "teacher": {"path": ddpm_ckpt, "sha256": teacher.sha256}, "student": {"path": decoder_ckpt,
                                                                             "sha256": student.sha256},
        "classifier": {"path": classifier_path, "sha256": sha256_file(classifier_path)},
        "versions": software_versions(),
    }
    audit = ""
    if audit_classifier_path is not None:
        report["audit"] = classifier_scores(load_classifier(audit_classifier_path, device), student_images,
                                            teacher_images, real)
        report["audit"]["classifier"] = {"path": audit_classifier_path, "sha256": sha256_file(audit_classifier_path)}
        audit = (f"; audit classifier: agreement {report['audit']['class_agreement_student_teacher']:.1%}, "
                 f"FD ratio {report['audit']['fd_ratio_student_over_teacher']:.2f}")
    atomic_write_json(report, output_path)
    fd = report["frechet_distance"]
    print(f"evaluation ({report['n_val']} val pairs): MSE to teacher {report['val_mse_to_teacher']:.4f}, "
          f"class agreement {report['class_agreement_student_teacher']:.1%} ({_confident_summary(report)}), "
          f"FD student {fd['student_vs_real']:.2f} / teacher {fd['teacher_vs_real']:.2f}"
          f" / real {fd['real_half_vs_real_half']:.2f}, student {report['speed'][f'speedup_vs_{name}{k}']:.0f}x faster "
          f"than {'DDIM' if name == 'ddim' else name}-{k}{audit} -> {output_path}")
    return report


def is_confident(logits: torch.Tensor) -> torch.Tensor:
    """Images the classifier gives one class at least CONFIDENT."""
    return logits.softmax(1).amax(1) >= CONFIDENT


def agreement_where_confident(agreeing: torch.Tensor, confident: torch.Tensor) -> dict:
    """Label agreement on the pairs whose reference image is ``confident``: a reference that is an ambiguous
    scribble has no class to agree with, so flips there say little about the image being compared."""
    return {"confidence_at_least": CONFIDENT, "share_of_pairs": confident.float().mean().item(),
            "agreement": agreeing[confident].float().mean().item() if confident.any() else None}


@torch.inference_mode()
def classifier_scores(classifier, student_images: torch.Tensor, teacher_images: torch.Tensor,
                      real: torch.Tensor) -> dict:
    """Class agreement and Frechet distances of student and teacher images in one classifier's feature space (the
    real images' features computed once, for all three comparisons)."""
    real_feats, real_logits = classifier_outputs(classifier, real)
    student_feats, student_logits = classifier_outputs(classifier, student_images)
    teacher_feats, teacher_logits = classifier_outputs(classifier, teacher_images)
    student_q = quality_from_features(student_feats, student_logits, real_feats)
    teacher_q = quality_from_features(teacher_feats, teacher_logits, real_feats)
    half = real.shape[0] // 2
    real_q = quality_from_features(real_feats[:half], real_logits[:half], real_feats[half:])
    agreeing = student_logits.argmax(1) == teacher_logits.argmax(1)
    return {
        "class_agreement_student_teacher": agreeing.float().mean().item(),
        "class_agreement_where_teacher_confident": agreement_where_confident(agreeing, is_confident(teacher_logits)),
        "frechet_distance": {"student_vs_real": student_q["frechet_distance"],
                             "teacher_vs_real": teacher_q["frechet_distance"],
                             "real_half_vs_real_half": real_q["frechet_distance"]},
        "fd_ratio_student_over_teacher": student_q["frechet_distance"] / max(teacher_q["frechet_distance"], 1e-12),
        "quality": {"student": student_q, "teacher": teacher_q, "real_half": real_q},
    }


def _confident_summary(report: dict) -> str:
    c = report["class_agreement_where_teacher_confident"]
    agreement = "-" if c["agreement"] is None else f"{c['agreement']:.1%}"
    return f"{agreement} where the teacher's image has confidence >= {c['confidence_at_least']}, " \
           f"{c['share_of_pairs']:.0%} of pairs"


def _val_indices(student_ckpt: dict, n: int) -> list[int]:
    opts = student_ckpt["config"]["options"]
    return student_split(n, opts["val_fraction"], opts["seed"])[1].tolist()


def _held_out_indices(student_ckpt: dict, data: dict, data_sha256: str, data_path) -> tuple[torch.Tensor, str]:
    """The pairs the student never trained on: the validation split of its own pairs file, or every pair of a file
    with a noise seed it never saw (noise i depends only on (seed, i)). A file that shares noises with the student's
    training pairs without being that file is refused: its pairs would be partly seen, partly not."""
    n = data["noise"].shape[0]
    record = student_ckpt.get("training_data") or {}
    if data_sha256 == record.get("sha256"):
        return torch.as_tensor(_val_indices(student_ckpt, n)), "validation split of the student's pairs"
    if data_sha256 in trained_on(student_ckpt) or noise_seeds(data.get("metadata", {})) & noise_seeds(
            record.get("metadata", {})):
        raise PipelineError(f"{data_path} shares noises with the pairs this student trained on; evaluate it on "
                            f"its own training data ({record.get('path')}) or on pairs of a new --seed")
    return torch.arange(n), "all pairs (a noise seed the student never trained on)"


def evaluation_source(teacher_source: str | None) -> str:
    """Real images to compare against: the teacher's own data where it is offline, else the bundled digits."""
    return "fashion-mnist" if teacher_source == "fashion-mnist" else "mnist5k"


def sample_teacher_images(diffusion, n: int, sampler: str = "ddim", steps: int = DEFAULT_DDIM_STEPS,
                          spacing: str = DEFAULT_SPACING, seed: int = 0, batch_size: int = 250,
                          device="cpu", desc: str = "teacher samples", clip_x0: bool = True) -> torch.Tensor:
    """n teacher images with per-sample noise (seed, i), with a progress bar."""
    from ..io.progress import progress_bar
    parts = []
    for b in progress_bar(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        idx = list(range(b, min(b + batch_size, n)))
        z = per_sample_noise(seed, idx, device=device)
        parts.append(teacher_sample(diffusion, z, sampler, steps, seed=seed, indices=idx, spacing=spacing,
                                    clip_x0=clip_x0).cpu())
    return torch.cat(parts)
