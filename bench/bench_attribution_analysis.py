"""The analysis questions, on one held-out noise seed of the unhooked student:

1. Which training images are attributed most often, and how concentrated are the top-1 choices? Counts of each
   training image as a generation's top-1 (by the package's attribution, ``DirectDecoderPipeline.generate``, whatever
   its default rule), summarised as the share of picks held by the most-picked 1% and 10% of images, the Gini
   coefficient and the normalised entropy of the counts, and the number of distinct images picked. Beside it, the
   same for pixel nearest neighbours (cosine) on the same generations and for uniform random picks (the floor).
2. Which digits are easiest and hardest to exclude? For each digit, an exclude hook on 10 of its training images
   (seeded choice); judged by the AUDIT classifier: the digit's share of generations and the similarity to the
   excluded images' mean feature, unhooked against hooked, and precision against all real digits (whether the push
   leaves the digit manifold).

    python bench/bench_attribution_analysis.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \
        --decoder_ckpt checkpoints/student_mnist5k.pt --ref_features_path FEATURES.pt --n 2000 --cpu
"""
import json
import time

import torch

from models.data.datasets import load_dataset
from models.evaluation.bench_common import load_pipeline, mean_similarity, pipeline_parser
from models.evaluation.metrics import classifier_outputs, knn_precision_recall
from models.io.errors import run_cli
from models.io.images import save_image_grid
from models.io.paths import AUDIT_CLASSIFIER
from models.io.progress import progress_bar
from models.io.records import append_run_record
from models.nets.classifier import load_classifier
from models.steering.hooks import DEFAULT_HOOK_STYLE, HOOK_STYLES
from models.steering.search import top_k_similar


def concentration(picks: torch.Tensor, n_reference: int) -> dict:
    """How unevenly ``picks`` (top-1 indices) spread over ``n_reference`` images."""
    counts = torch.bincount(picks.cpu(), minlength=n_reference).double()
    ordered = counts.sort(descending=True).values
    top = lambda share: (ordered[:max(1, round(share * n_reference))].sum() / counts.sum()).item()  # noqa: E731
    rising = ordered.flip(0)
    ranks = torch.arange(1, n_reference + 1, dtype=torch.float64)
    gini = ((2 * ranks - n_reference - 1) * rising).sum() / (n_reference * rising.sum())
    p = counts[counts > 0] / counts.sum()
    return {"distinct": int((counts > 0).sum()), "top1pct_share": top(0.01), "top10pct_share": top(0.10),
            "gini": gini.item(), "entropy_norm": (-(p * p.log()).sum() / torch.log(torch.tensor(n_reference))).item(),
            "max_count": int(ordered[0])}


@torch.inference_mode()
def main():
    p = pipeline_parser(__doc__, "bench/results/attribution_analysis.jsonl", n=2000)
    p.add_argument("--seed", type=int, default=2, help="noise seed (held out: figures use 0, the stage's evaluation 1)")
    p.add_argument("--audit_classifier", default=AUDIT_CLASSIFIER, help="the judge (no hook or rule uses it)")
    p.add_argument("--attribute_by", default=None, help="attribution rule passed to DirectDecoderPipeline.generate "
                   "(default: the pipeline's own default)")
    p.add_argument("--n_exclude", type=int, default=500, help="generations per digit in the exclude question")
    p.add_argument("--exclude_size", type=int, default=10, help="training images excluded per digit")
    p.add_argument("--strength", type=float, default=1.0, help="exclude strength")
    p.add_argument("--styles", nargs="+", default=[DEFAULT_HOOK_STYLE, "mean"], choices=list(HOOK_STYLES),
                   help="exclude hook styles")
    p.add_argument("--hubs_png", default="", help="also draw the 16 most attributed training images here")
    a = p.parse_args()
    start = time.perf_counter()
    pipe, _ = load_pipeline(a)
    audit = load_classifier(a.audit_classifier, pipe.device)
    meta = pipe.reference["metadata"]
    dataset = load_dataset(meta["dataset"], meta.get("split", "train"))
    rows = pipe.reference["indices"].cpu()
    real = dataset.images[rows]
    labels = pipe.steering.labels.cpu()
    n_ref = len(labels)

    extra = {} if a.attribute_by is None else {"attribute_by": a.attribute_by}
    out = pipe.generate(a.n, seed=a.seed, top_k=1, **extra)
    picks = out.top_k_indices[:, 0].cpu()
    pixel = top_k_similar(out.images.cpu(), real, 1)[1][:, 0]
    uniform = torch.randint(n_ref, (a.n,), generator=torch.Generator().manual_seed(a.seed))
    gen_feats, gen_logits = classifier_outputs(audit, out.images)
    gen_label = gen_logits.argmax(1)
    counts = torch.bincount(picks, minlength=n_ref)
    most = counts.argsort(descending=True)[:16]
    result = {"n": a.n, "seed": a.seed, "attribute_by": a.attribute_by or "default", "n_reference": n_ref,
              "concentration": {"rule": concentration(picks, n_ref), "pixel_nn": concentration(pixel, n_ref),
                                "uniform": concentration(uniform, n_ref)},
              "most_attributed": [{"index": int(i), "label": int(labels[i]), "count": int(counts[i]),
                                   "same_label_share": (gen_label[picks == i] == labels[i]).float().mean().item()}
                                  for i in most[:10]],
              "picked_label_share": torch.bincount(labels[picks], minlength=10).div(a.n).tolist(),
              "generated_label_share": torch.bincount(gen_label, minlength=10).div(a.n).tolist(),
              "decoder": a.decoder_ckpt, "features": a.ref_features_path}
    real_feats, _ = classifier_outputs(audit, real)
    hub_norm = pipe.steering.features[most.to(pipe.device)].flatten(1).norm(dim=1).mean().item()
    result["feature_norm"] = {"most_attributed_16": hub_norm,
                              "all": pipe.steering.features.flatten(1).norm(dim=1).mean().item()}
    if a.hubs_png:
        save_image_grid(real[most], a.hubs_png, nrow=8)

    noise = pipe.noise(a.n_exclude, a.seed)
    base_feats, base_logits = classifier_outputs(audit, pipe.generate(a.n_exclude, noise=noise, top_k=0).images)
    base_pred = base_logits.argmax(1)
    chooser = torch.Generator().manual_seed(a.seed)
    result["exclude"] = {}
    bar = progress_bar(total=10 * len(a.styles), desc="exclude by digit", unit="setting")
    for digit in range(10):
        members = torch.nonzero(labels == digit).flatten()
        chosen = members[torch.randperm(len(members), generator=chooser)[:a.exclude_size]].tolist()
        targets, _ = classifier_outputs(audit, real[chosen])
        row = {"indices": chosen, "unhooked": {"share": (base_pred == digit).float().mean().item(),
                                               "similarity": mean_similarity(base_feats, targets)}}
        for style in a.styles:
            hook = pipe.exclude(chosen, a.strength, style)
            feats, logits = classifier_outputs(audit, pipe.generate(a.n_exclude, noise=noise, hook=hook,
                                                                    top_k=0).images)
            row[style] = {"share": (logits.argmax(1) == digit).float().mean().item(),
                          "similarity": mean_similarity(feats, targets),
                          "precision_all_digits": knn_precision_recall(real_feats, feats)[0]}
            bar.update(1)
        result["exclude"][digit] = row
    bar.close()
    result["exclude_precision_unhooked"] = knn_precision_recall(real_feats, base_feats)[0]
    result["seconds"] = round(time.perf_counter() - start, 1)
    append_run_record(result, a.record)
    print_tables(result, a.styles)
    print(f"bench_attribution_analysis: {a.n} generations attributed, exclude on 10 digits x {len(a.styles)} "
          f"styles, in {result['seconds']}s -> {a.record}")


def print_tables(r: dict, styles: list) -> None:
    print(f"{'top-1 picks':12s} {'distinct':>8s} {'top 1%':>7s} {'top 10%':>8s} {'Gini':>6s} {'entropy':>8s} "
          f"{'max':>5s}")
    for name, c in r["concentration"].items():
        print(f"{name:12s} {c['distinct']:8d} {c['top1pct_share']:7.1%} {c['top10pct_share']:8.1%} {c['gini']:6.3f} "
              f"{c['entropy_norm']:8.3f} {c['max_count']:5d}")
    print("most attributed: " + json.dumps(r["most_attributed"][:5]))
    print(f"{'digit':>5s} {'unhooked share':>14s} " + " ".join(f"{s + ' share':>14s} {s + ' sim drop':>15s}"
                                                                 for s in styles))
    for digit, row in r["exclude"].items():
        base = row["unhooked"]
        print(f"{digit:>5} {base['share']:14.1%} " + " ".join(
            f"{row[s]['share']:14.1%} {base['similarity'] - row[s]['similarity']:15.3f}" for s in styles))


if __name__ == "__main__":
    run_cli(main, resumable=False)
