"""What the benches that measure a trained pipeline (teacher, student, reference features) share: their options and
loading, and how they time CPU work. Their records go through models.io.records.append_run_record."""
import time

import torch
import torch.nn.functional as F

from ..api import DirectDecoderPipeline
from ..io.cli import ArgumentParser, add_cpu_flag
from ..io.device import pick_device
from ..io.files import sha256_file
from ..io.paths import DEFAULT_CLASSIFIER
from ..nets.classifier import load_classifier


def pipeline_parser(doc: str, record: str | None, n: int = 256) -> ArgumentParser:
    """record: the default of --record (where results are appended); None for a bench that keeps no record."""
    p = ArgumentParser(description=doc)
    p.add_argument("--ddpm_ckpt", required=True, help="teacher checkpoint")
    p.add_argument("--decoder_ckpt", required=True, help="student checkpoint")
    p.add_argument("--ref_features_path", required=True, help="extract_reference_features.py output")
    p.add_argument("--n", type=int, default=n, help="generations")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="project classifier")
    if record is not None:
        p.add_argument("--record", default=record, help="append results here")
    add_cpu_flag(p)
    return p


def load_pipeline(args):
    """(pipeline with reference features, project classifier), both on the chosen device."""
    device = pick_device(args.cpu)
    pipe = DirectDecoderPipeline.load(args.ddpm_ckpt, args.decoder_ckpt, args.ref_features_path, device=device)
    return pipe, load_classifier(args.classifier, device)


def cpu_seconds(fn, repeats: int = 1) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in process CPU seconds (another job on the machine barely moves
    it, unlike wall time)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def mean_similarity(feats: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cosine (along dim 1) of ``feats`` to the mean of ``targets``: how like a target set generations are."""
    return F.cosine_similarity(feats, targets.mean(0, keepdim=True), dim=1).mean().item()


ENCODER_FLAGS = (("encoder_steps", "steps"), ("encoder_lr", "lr"), ("encoder_batch_size", "batch_size"),
                 ("encoder_pool_size", "pool_size"), ("encoder_frozen_blocks", "frozen_blocks"),
                 ("encoder_teacher_pairs_fraction", "teacher_pairs_fraction"), ("seed", "seed"))
# the extraction flags behind the image encoder's recorded options: all of them, so that a rebuild command stays
# right when a default changes


def features_provenance(path, reference: dict) -> dict:
    """What a record says about the reference features it used: their sha256 and the command that rebuilds them
    (from their own metadata), not a path that exists only on the machine that ran the bench."""
    meta = reference["metadata"]
    encoder = meta.get("image_encoder") or {}
    rule = meta.get("attribution_rule", "bottleneck")
    command = (f"python extract_reference_features.py --ddpm_ckpt {meta.get('teacher_path', 'TEACHER.pt')} "
               f"--decoder_ckpt {meta.get('student_path', 'STUDENT.pt')} --method {meta.get('method', 'auto')}"
               + "".join(f" --{flag} {encoder[key]}" for flag, key in ENCODER_FLAGS if key in encoder)
               + f" --attribution_rule {rule} --output_path FEATURES.pt")
    return {"sha256": sha256_file(path), "method": meta.get("method"), "encoder_steps": encoder.get("steps"),
            "consistency": (meta.get("consistency") or {}).get("generated_bottleneck_cosine_mean"),
            "attribution_rule": rule, "rebuild": command}
