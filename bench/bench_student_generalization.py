"""Is the student short of data or of capacity? Class agreement and pixel MSE with the teacher on pairs it trained
on against pairs it held out, from the same seed and split.

The pairs are regenerated from what the student's checkpoint records (seed, sampler, K, spacing, split): per-sample
seeding makes pair i the same whatever else is generated. A student trained on several merged files has each pair
regenerated from its own file's seed. If agreement on the training pairs is far above the held-out
one, more pairs are the lever; if both are low, the student's map (capacity, optimisation) is.

    python bench/bench_student_generalization.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \
        --decoder_ckpt checkpoints/student_mnist5k.pt --n 500 --cpu
"""
import time

import torch

from models.data.pairs import student_split
from models.diffusion.noise import per_sample_noise
from models.diffusion.sampling import SamplerConfig
from models.evaluation.evaluate import is_confident
from models.io.cli import ArgumentParser, add_cpu_flag
from models.io.device import pick_device
from models.io.errors import PipelineError, run_cli
from models.io.paths import DEFAULT_CLASSIFIER
from models.io.progress import progress_bar
from models.io.records import append_run_record
from models.nets.classifier import load_classifier
from models.nets.student import load_teacher_and_student


def noise_sources(meta: dict, n_pairs: int) -> list[tuple[int, int, int]]:
    """(seed, first merged index, pairs) of each file behind the student's pairs (one row for an unmerged file)."""
    if "merged_from" not in meta:
        return [(int(meta["seed"]), 0, n_pairs)]
    rows, start = [], 0
    for source in meta["merged_from"]:
        rows.append((int(source["seed"]), start, int(source["n"])))
        start += int(source["n"])
    return rows


def seeded_batches(indices, sources, batch_size):
    """Merged indices as (seed, indices within that seed's file) batches."""
    for seed, start, n in sources:
        local = [i - start for i in indices if start <= i < start + n]
        for lo in range(0, len(local), batch_size):
            yield seed, local[lo:lo + batch_size]


def agreement_on(indices, sources, sampler, teacher, student, classifier, device, desc, batch_size=250) -> dict:
    agree, confident, mse = [], [], []
    for seed, idx in progress_bar(list(seeded_batches(indices, sources, batch_size)), desc=desc, unit="batch"):
        z = per_sample_noise(seed, idx, device=device)
        with torch.no_grad():
            target = sampler.sample(teacher.diffusion, z, seed=seed, indices=idx)
            out = student.decoder(z).float().clamp(-1, 1)
            t_logits, s_logits = classifier(target), classifier(out)
        agree.append(t_logits.argmax(1) == s_logits.argmax(1))
        confident.append(is_confident(t_logits))
        mse.append(((out - target) ** 2).flatten(1).mean(1))
    agree, confident, mse = torch.cat(agree), torch.cat(confident), torch.cat(mse)
    return {"n": len(indices), "class_agreement": agree.float().mean().item(),
            "class_agreement_where_teacher_confident": agree[confident].float().mean().item(),
            "share_teacher_confident": confident.float().mean().item(), "mse_to_teacher": mse.mean().item()}


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ddpm_ckpt", required=True, help="teacher checkpoint")
    p.add_argument("--decoder_ckpt", required=True, help="student checkpoint")
    p.add_argument("--n", type=int, default=500, help="pairs on each side (training, held out)")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="project classifier")
    p.add_argument("--record", default="bench/results/student_generalization.jsonl", help="append results here")
    add_cpu_flag(p)
    a = p.parse_args()
    device = pick_device(a.cpu)
    teacher, student = load_teacher_and_student(a.ddpm_ckpt, a.decoder_ckpt, device)
    config = student.checkpoint["config"]
    meta = config["training_data"]["metadata"]
    if meta.get("teacher_sha256") != teacher.sha256:
        raise PipelineError(f"{a.decoder_ckpt}'s last training pairs come from teacher {meta.get('teacher_sha256')}, "
                            f"not {a.ddpm_ckpt}")
    sampler = SamplerConfig.from_student(config)
    n_pairs = int(config["n_pairs"])
    opts = config["options"]
    train_idx, val_idx = student_split(n_pairs, opts["val_fraction"], opts["seed"])
    n = min(a.n, len(val_idx))
    classifier = load_classifier(a.classifier, device)
    start = time.perf_counter()
    sources = noise_sources(meta, n_pairs)
    sides = {name: agreement_on(sorted(int(i) for i in idx[:n]), sources, sampler, teacher, student,
                                classifier, device, name)
             for name, idx in (("trained_on", train_idx), ("held_out", val_idx))}
    result = {"teacher_sha256": teacher.sha256, "student": a.decoder_ckpt, "student_sha256": student.sha256,
              "pairs_seeds": [seed for seed, _, _ in sources], "n_pairs": n_pairs, "sampler": sampler.to_dict(),
              "epochs_on_these_pairs": int(student.checkpoint.get("epoch", 0)),
              "continued_from": (config.get("init_from") or {}).get("path"), **sides,
              "seconds": round(time.perf_counter() - start, 1)}
    append_run_record(result, a.record)
    t, v = sides["trained_on"], sides["held_out"]
    print(f"student generalization ({n} pairs each side): agreement trained-on {t['class_agreement']:.1%} vs held-out "
          f"{v['class_agreement']:.1%}; MSE {t['mse_to_teacher']:.4f} vs {v['mse_to_teacher']:.4f} -> {a.record}")


if __name__ == "__main__":
    run_cli(main, resumable=False)
