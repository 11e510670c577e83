"""The removal test of attribution: does leaving out a generation's attributed training images change that
generation more than leaving out as many random ones?

From the shipped teacher, short fine-tunes (models/training/removal.py: one epoch with the teacher trainer's
timesteps and noise and its batch order, except that every image any run removes comes last so all runs share the
steps before; the removed rows dropped, BatchNorm frozen), one per removed set:

- for each generation and k: its top-k training images by the pipeline's default rule (DirectDecoderPipeline.
  attribute_images: shape where the features carry it) and, beside it, by pixel cosine (the simplest baseline);
- k random training images, several draws (the same sets serve every generation);
- nothing removed (the control every move is measured from), and nothing removed under another fine-tune seed (how
  far mere fine-tuning noise moves a generation).

A generation is the teacher's image of a held-out noise by the sampler the student's pairs were made with (the
student imitates that map and cannot be re-distilled per removed set here); each fine-tuned teacher regenerates the
same noises. Its move from the control: pixel RMS (in [0, 1] units) and distance in the AUDIT classifier's feature
space, and the relative rise of its denoising loss under the fine-tuned teacher (the model-output function of D-TRAK
and Journey TRAK: leaving out the images a generation drew on should make it harder to denoise). Every run
regenerates every generation, so a generation's move under other generations' top-k removals (the same kind of
set, not attributed to it) is measured too. Finished runs are cached in --work_dir, so an interrupted bench
resumes.

    python bench/bench_counterfactual_attribution.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \
        --decoder_ckpt checkpoints/student_mnist5k.pt --ref_features_path FEATURES.pt --cpu
"""
import json
import time
from pathlib import Path

import torch

from models.data.datasets import load_dataset
from models.diffusion.sampling import SamplerConfig
from models.evaluation.bench_common import features_provenance, load_pipeline, pipeline_parser
from models.evaluation.metrics import classifier_outputs
from models.io.errors import PipelineError, run_cli
from models.io.files import atomic_save
from models.io.paths import AUDIT_CLASSIFIER
from models.io.progress import progress_bar
from models.io.records import append_run_record
from models.nets.classifier import load_classifier
from models.steering.search import top_k_similar
from models.training.removal import RemovalFinetune, RemovalFinetuner, denoising_loss, shared_prefix_steps

MEASURES = ("pixel_rms", "audit_distance", "loss_rise")


def removal_runs(attributed: dict, random_sets: torch.Tensor, ks: list) -> list:
    """(name, removed dataset indices): the control first, random sets, then per generation its attributed sets."""
    runs = [("control", [])]
    runs += [(f"random{r}_k{k}", random_sets[r, :k].tolist()) for r in range(len(random_sets)) for k in ks]
    n = next(iter(attributed.values())).shape[0]
    runs += [(f"{rule}_g{i}_k{k}", attributed[rule][i, :k].tolist())
             for i in range(n) for rule in attributed for k in ks]
    return runs


def measure(model, noise, originals, sampler) -> dict:
    return {"images": sampler.sample(model, noise), "loss": denoising_loss(model, originals)}


class RunCache:
    """Finished runs in ``work_dir``, each under a key naming everything it depends on (an interrupted bench
    resumes; a changed option reruns)."""

    def __init__(self, work_dir: Path, identity: dict):
        self.work_dir, self.identity = work_dir, identity
        work_dir.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, **facts):
        path, key = self.work_dir / f"{name}.pt", self._key(facts)
        if path.exists():
            cached = torch.load(path, weights_only=True)
            if cached.get("key") == key:
                return cached
        return None

    def put(self, name: str, result: dict, **facts) -> dict:
        result = result | {"key": self._key(facts)}
        atomic_save(result, self.work_dir / f"{name}.pt")
        return result

    def _key(self, facts: dict) -> str:
        return json.dumps(self.identity | facts, sort_keys=True)


def moves(run: dict, control: dict, audit) -> dict:
    """Each generation's move from the control run."""
    a_run, _ = classifier_outputs(audit, run["images"])
    a_ctl, _ = classifier_outputs(audit, control["images"])
    return {"pixel_rms": ((run["images"] - control["images"]) / 2).flatten(1).square().mean(1).sqrt(),
            "audit_distance": (a_run - a_ctl).norm(dim=1),
            "loss_rise": (run["loss"] - control["loss"]) / control["loss"]}


def rank_p_value(own: torch.Tensor, rand: torch.Tensor) -> float:
    """One-sided p-value that attributed removals move their generations no more than random ones: if an attributed
    set were just another random set, its move's rank among the draws (how many it exceeds, 0..draws) would be
    uniform and independent across generations; the p-value is the chance their sum reaches the one observed."""
    draws = rand.shape[0]
    observed = int((own > rand).sum())
    counts = torch.zeros(1, dtype=torch.float64)
    counts[0] = 1.0
    for _ in range(len(own)):  # distribution of the sum of len(own) uniform ranks, by convolution
        counts = torch.nn.functional.conv1d(counts.view(1, 1, -1), torch.ones(1, 1, draws + 1, dtype=torch.float64),
                                            padding=draws).view(-1) / (draws + 1)
    return counts[observed:].sum().item()


def summarise(m: dict, rules: list, ks: list, n: int, draws: int) -> dict:
    """Per rule and k, per measure: the attributed removal's move of its own generation, random removals' mean move
    of the same generation, other generations' attributed removals' mean move of it, and how often attributed wins."""
    out = {"noise": {measure: {"control_other_seed_mean": m["control_other_seed"][measure].mean().item(),
                               "control_other_seed_std": m["control_other_seed"][measure].std().item()}
                     for measure in MEASURES}}
    for rule in rules:
        for k in ks:
            row = {}
            for measure in MEASURES:
                own = torch.stack([m[f"{rule}_g{i}_k{k}"][measure][i] for i in range(n)])
                rand = torch.stack([m[f"random{r}_k{k}"][measure] for r in range(draws)])  # [draws, n]
                other = torch.stack([torch.stack([m[f"{rule}_g{j}_k{k}"][measure][i] for j in range(n) if j != i])
                                     .mean() for i in range(n)])  # n >= 2
                row[measure] = {"attributed_mean": own.mean().item(), "attributed_std": own.std().item(),
                                "random_mean": rand.mean().item(), "random_std": rand.mean(0).std().item(),
                                "other_generations_mean": other.mean().item(),
                                "ratio_to_random": (own.mean() / rand.mean()).item(),
                                "share_above_random_mean": (own > rand.mean(0)).float().mean().item(),
                                "share_above_each_random_draw": (own > rand).float().mean().item(),
                                "share_above_other_generations": (own > other).float().mean().item(),
                                "p_value_vs_random": rank_p_value(own, rand),
                                "per_generation": own.tolist(), "random_per_generation": rand.mean(0).tolist()}
            out[f"{rule}_k{k}"] = row
    for k in ks:  # the rule against the pixel baseline, generation by generation
        for rule in (r for r in rules if r != "pixel"):
            out[f"{rule}_k{k}"]["share_above_pixel"] = {
                measure: (torch.tensor(out[f"{rule}_k{k}"][measure]["per_generation"]) >
                          torch.tensor(out[f"pixel_k{k}"][measure]["per_generation"])).float().mean().item()
                for measure in MEASURES}
    return out


def main():
    d = RemovalFinetune()
    p = pipeline_parser(__doc__, "bench/results/counterfactual_attribution.jsonl", n=10)
    p.add_argument("--seed", type=int, default=4, help="noise seed of the generations (held out: the figures use 0, "
                   "the stage's evaluation 1, the hook benches 2, label-free development 3)")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 50], help="training images removed per set")
    p.add_argument("--random_draws", type=int, default=4, help="random removed sets per k")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="fine-tune batch (the teacher's last leg's)")
    p.add_argument("--lr", type=float, default=d.lr, help="fine-tune learning rate (AdamW, constant)")
    p.add_argument("--finetune_seed", type=int, default=d.seed, help="batch order and noise of the fine-tunes")
    p.add_argument("--audit_classifier", default=AUDIT_CLASSIFIER, help="the judge (no rule uses it)")
    p.add_argument("--work_dir", default="runs/counterfactual", help="finished runs are cached here (resumable)")
    a = p.parse_args()
    if a.n < 2 or a.random_draws < 2 or min(a.ks) < 1:
        raise PipelineError("--n and --random_draws must be at least 2, every --ks at least 1")
    start = time.perf_counter()
    pipe, _ = load_pipeline(a)
    audit = load_classifier(a.audit_classifier, pipe.device)
    meta = pipe.reference["metadata"]
    source = pipe.teacher.checkpoint.get("data_source") or meta["dataset"]
    if source != meta["dataset"]:
        raise PipelineError(f"the teacher was trained on {source}, the reference features index {meta['dataset']}")
    dataset = load_dataset(source, "train")
    rows = pipe.reference["indices"].cpu()
    train_images = dataset.images.to(pipe.device)
    teacher = pipe.teacher.diffusion
    sampler = SamplerConfig.from_student(pipe.student.checkpoint).deterministic_map()

    max_k = max(a.ks)
    noise = pipe.noise(a.n, a.seed)
    originals = sampler.sample(teacher, noise)
    _, _, by_rule, _ = pipe.attribute_images(originals, top_k=max_k)
    rule = pipe.steering.resolve_attribute_by(None)
    _, by_pixel = top_k_similar(originals.cpu(), dataset.images[rows], max_k)
    attributed = {rule: rows[by_rule.cpu()], "pixel": rows[by_pixel]}  # dataset indices
    chooser = torch.Generator().manual_seed(a.seed)
    random_sets = torch.stack([torch.randperm(len(dataset), generator=chooser)[:max_k] for _ in range(a.random_draws)])

    opts = RemovalFinetune(a.batch_size, a.lr, a.finetune_seed)
    candidates = sorted(set(random_sets.flatten().tolist()).union(*(s.flatten().tolist() for s in attributed.values())))
    identity = {"teacher": pipe.teacher.sha256, "sampler": sampler.to_dict(), "noise_seed": a.seed, "n": a.n,
                "finetune": opts.to_dict(), "candidates": candidates}
    cache = RunCache(Path(a.work_dir), identity)
    runs = removal_runs(attributed, random_sets, a.ks)
    per_epoch = len(dataset) // a.batch_size
    shared = shared_prefix_steps(len(dataset), a.batch_size, len(candidates))
    bar = progress_bar(total=shared + len(runs) * (per_epoch - shared) + per_epoch, unit="step", dynamic_ncols=True,
                       desc=f"{len(runs) + 1} fine-tunes")
    results, finetuner = {}, None
    for name, removed in runs:
        results[name] = cache.get(name, removed=removed)
        if results[name] is None:
            if finetuner is None:  # the shared steps, once
                finetuner = RemovalFinetuner(teacher, train_images, opts, candidates, progress=bar.update)
            results[name] = cache.put(name, measure(finetuner.run(removed), noise, originals, sampler),
                                      removed=removed)
        else:
            bar.update(per_epoch - shared)
    bar.update(shared if finetuner is None else 0)
    other = RemovalFinetune(a.batch_size, a.lr, a.finetune_seed + 1)
    results["control_other_seed"] = cache.get("control_other_seed", finetune=other.to_dict(), candidates=[])
    if results["control_other_seed"] is None:
        model = RemovalFinetuner(teacher, train_images, other, progress=bar.update).run()
        results["control_other_seed"] = cache.put("control_other_seed", measure(model, noise, originals, sampler),
                                                  finetune=other.to_dict(), candidates=[])
    else:
        bar.update(per_epoch)
    bar.close()
    control = results["control"]
    measured = {name: moves(run, control, audit) for name, run in results.items()}
    summary = summarise(measured, list(attributed), a.ks, a.n, a.random_draws)
    original_move = moves({"images": originals, "loss": denoising_loss(teacher, originals)}, control, audit)
    summary["noise"]["fine_tune_vs_shipped"] = {m: original_move[m].mean().item() for m in MEASURES}
    overlap = {k: [len(set(attributed[rule][i, :k].tolist()) & set(attributed["pixel"][i, :k].tolist())) / k
                   for i in range(a.n)] for k in a.ks}
    audit_labels = classifier_outputs(audit, originals)[1].argmax(1)
    result = {"n": a.n, "seed": a.seed, "ks": a.ks, "random_draws": a.random_draws, "rule": rule,
              "finetune": opts.to_dict(), "sampler": sampler.describe(), "n_runs": len(runs) + 1,
              "n_candidates": len(candidates), "steps_per_epoch": per_epoch, "shared_steps": shared,
              "generation_audit_labels": audit_labels.tolist(),
              "label_share_of_removed": {f"{name}_k{k}": [(dataset.labels[attributed[name][i, :k]] ==
                                                          audit_labels[i].cpu()).float().mean().item()
                                                         for i in range(a.n)] for name in attributed for k in a.ks},
              "rule_pixel_overlap": overlap, "summary": summary, "teacher_sha256": pipe.teacher.sha256,
              "features": features_provenance(a.ref_features_path, pipe.reference),
              "seconds": round(time.perf_counter() - start, 1)}
    append_run_record(result, a.record)
    print_table(summary, list(attributed), a.ks)
    print(f"bench_counterfactual_attribution: {len(runs) + 1} one-epoch fine-tunes ({shared} steps shared), {a.n} "
          f"generations, in "
          f"{result['seconds']}s -> {a.record}")


def print_table(summary: dict, rules: list, ks: list) -> None:
    noise = summary["noise"]
    print("fine-tuning noise (other seed vs control): " + ", ".join(
        f"{m} {noise[m]['control_other_seed_mean']:.4f}" for m in MEASURES))
    print(f"{'removed':14s} " + " ".join(f"{m + ' attr/rand/other':>34s} {'wins':>5s} {'p':>6s}" for m in MEASURES))
    for rule in rules:
        for k in ks:
            row = summary[f"{rule}_k{k}"]
            print(f"{rule + ' k=' + str(k):14s} " + " ".join(
                f"{row[m]['attributed_mean']:10.4f} {row[m]['random_mean']:11.4f} "
                f"{row[m]['other_generations_mean']:11.4f} "
                f"{row[m]['share_above_random_mean']:5.0%} {row[m]['p_value_vs_random']:6.3f}" for m in MEASURES))


if __name__ == "__main__":
    run_cli(main)
