"""Do the steering hooks reach their target without erasing variety? Every hook style (mean, nearest, shift,
shift_nearest; and, measured here only, a per-batch optimal-transport assignment and classifier guidance) on one
held-out noise seed, judged in the AUDIT
classifier's feature space (no hook, loss or rule uses it):

- class hook, each digit 0-9, a few strengths: share of generations that are the digit, k-NN precision and recall
  (k = 3) against the real mnist5k digits of that class, and feature spread (root of the covariance trace) over the
  real digits' spread; beside it the unhooked student's own digits of that class (the first N of a larger draw of the
  same seed that the audit classifier gives that label);
- include, 10 training images: cosine similarity to their mean feature by strength, spread over the unhooked spread;
- exclude, 10 training images: the same similarity (it should fall), precision against all real digits (does the
  push leave the digit manifold?) and the share of the excluded images' majority digit.

    python bench/bench_hook_variety.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \
        --decoder_ckpt checkpoints/student_mnist5k.pt --ref_features_path FEATURES.pt --n 500 --cpu
"""
import copy
import json
import time

import torch
import torch.nn.functional as F

from models.data.datasets import load_dataset
from models.evaluation.bench_common import features_provenance, load_pipeline, mean_similarity, pipeline_parser
from models.evaluation.metrics import classifier_outputs, knn_precision_recall
from models.io.errors import run_cli
from models.io.paths import AUDIT_CLASSIFIER
from models.io.progress import progress_bar
from models.io.records import append_run_record
from models.nets.classifier import load_classifier
from models.steering.hooks import HOOK_STYLES


def ot_hook(members: torch.Tensor, strength: float):
    """Per-batch optimal transport (cosine cost): the batch's generations are matched one to one with members
    (members repeated when the batch is larger), each moved toward its match. Depends on the whole batch, so a
    generation changes with its batch-mates: measured here, not offered as a style."""
    from scipy.optimize import linear_sum_assignment
    unit = F.normalize(members.flatten(1).float(), dim=1)

    def hook(h: torch.Tensor) -> torch.Tensor:
        reps = -(-len(h) // len(members))
        cost = -(F.normalize(h.flatten(1).float(), dim=1) @ unit.T).repeat(1, reps).cpu().numpy()
        rows, cols = linear_sum_assignment(cost)
        target = members[torch.as_tensor(cols[rows.argsort()]) % len(members)].to(h.device, h.dtype)
        return h + strength * (target - h)
    return hook


def _trainable_copy(module):
    module = copy.deepcopy(module)
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor.data = tensor.data.clone()
    return module


def guidance_hook(decoder, classifier, digit: int, strength: float, steps: int = 8, step: float = 0.05):
    """Classifier guidance in the bottleneck: ``steps`` normalised gradient steps on log p(digit | decoded image)
    by the PROJECT classifier, each ``strength * step`` of the features' own norm. Costs a decoder and classifier
    backward pass per step: measured here, not offered as a style."""
    with torch.inference_mode(False):  # weights made under inference mode cannot be saved for backward: copies
        decoder, classifier = _trainable_copy(decoder), _trainable_copy(classifier)

    def hook(h: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            x = h.detach().clone().float()
            size = x.flatten(1).norm(dim=1)[:, None, None, None]
            for _ in range(steps):
                x.requires_grad_(True)
                logp = classifier(decoder.decode(x).clamp(-1, 1)).log_softmax(1)[:, digit].sum()
                grad, = torch.autograd.grad(logp, x)
                unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
                x = (x + strength * step * size * unit).detach()
        return x.to(h.dtype)
    return hook


def spread(feats: torch.Tensor) -> float:
    return torch.cov(feats.double().T).trace().sqrt().item()


@torch.inference_mode()
def main():
    p = pipeline_parser(__doc__, "bench/results/hook_variety.jsonl", n=500)
    p.add_argument("--seed", type=int, default=2, help="noise seed (held out: figures use 0, the stage's evaluation 1)")
    p.add_argument("--audit_classifier", default=AUDIT_CLASSIFIER, help="the judge (no hook or loss uses it)")
    p.add_argument("--styles", nargs="+", default=list(HOOK_STYLES) + ["ot"],
                   help="hook styles; also 'ot': per-batch optimal transport (class and include only), 'guidance': "
                        "the project classifier's gradient in the bottleneck (class only)")
    p.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="class-hook targets")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.75, 1.0], help="class-hook strengths")
    p.add_argument("--baseline_draw", type=int, default=8, help="unhooked generations, in multiples of --n: each "
                   "digit needs about --n of the student's own")
    p.add_argument("--include", type=int, nargs="+", default=list(range(10)), help="training images to include")
    p.add_argument("--exclude", type=int, nargs="+", default=list(range(100, 110)), help="training images to exclude")
    p.add_argument("--set_strengths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0],
                   help="include / exclude strengths")
    a = p.parse_args()
    start = time.perf_counter()
    pipe, project = load_pipeline(a)
    audit = load_classifier(a.audit_classifier, pipe.device)
    steer = pipe.steering
    meta = pipe.reference["metadata"]
    dataset = load_dataset(meta["dataset"], meta.get("split", "train"))
    rows = pipe.reference["indices"].cpu()
    real_feats, _ = classifier_outputs(audit, dataset.images[rows])
    real_labels = dataset.labels[rows]
    decoder = pipe.student.decoder
    noise = pipe.noise(a.n, a.seed)
    h = decoder.bottleneck(noise)  # one encoder pass for every setting: decode(hook(h)) is generate's image bitwise

    def judged(hook):
        return classifier_outputs(audit, decoder.decode(hook(h)).float().clamp(-1, 1))

    def class_hook(style, digit, s):
        if style == "ot":
            return ot_hook(steer.features[(steer.labels == digit).to(steer.features.device)], s)
        if style == "guidance":
            return guidance_hook(decoder, project, digit, s)
        return steer.toward_class(digit, s, style)

    base_noise = pipe.noise(a.n * a.baseline_draw, a.seed)
    base_feats, base_logits = classifier_outputs(audit, pipe.generate(len(base_noise), noise=base_noise,
                                                                      top_k=0).images)
    base_pred = base_logits.argmax(1)
    result = {"n": a.n, "seed": a.seed, "judge": a.audit_classifier, "class": {}, "include": {}, "exclude": {},
              "decoder": a.decoder_ckpt, "features": features_provenance(a.ref_features_path, pipe.reference)}
    settings = [(style, s) for style in a.styles for s in a.strengths]
    bar = progress_bar(total=len(a.digits) * len(settings), desc="class hooks", unit="setting")
    for digit in a.digits:
        real = real_feats[real_labels == digit]
        own = base_feats[base_pred == digit][:a.n]
        precision, recall = knn_precision_recall(real, own)
        row = {"unhooked": {"share": (base_pred[:a.n] == digit).float().mean().item(), "n_own": len(own),
                            "precision": precision, "recall": recall, "spread": spread(own) / spread(real)},
               "real_spread": spread(real)}
        for style, s in settings:
            feats, logits = judged(class_hook(style, digit, s))
            precision, recall = knn_precision_recall(real, feats)
            row[f"{style}@{s}"] = {"share": (logits.argmax(1) == digit).float().mean().item(), "precision": precision,
                                   "recall": recall, "spread": spread(feats) / spread(real)}
            bar.update(1)
        result["class"][digit] = row
    bar.close()

    for kind, indices in (("include", a.include), ("exclude", a.exclude)):
        targets, _ = classifier_outputs(audit, dataset.images[rows[indices]])
        majority = int(real_labels[indices].mode().values)
        base = base_feats[:a.n]
        table = {"indices": indices, "labels": real_labels[indices].tolist(),
                 "unhooked": {"similarity": mean_similarity(base, targets), "spread": spread(base),
                              "precision_all_digits": knn_precision_recall(real_feats, base)[0],
                              "majority_digit_share": (base_pred[:a.n] == majority).float().mean().item()}}
        styles = [st for st in a.styles if st != "guidance" and (kind == "include" or st != "ot")]
        for style in styles:
            for s in a.set_strengths:
                if style == "ot":
                    hook = ot_hook(steer.features[torch.as_tensor(indices)], s)
                else:
                    hook = getattr(steer, kind)(indices, s, style)
                feats, logits = judged(hook)
                table[f"{style}@{s}"] = {"similarity": mean_similarity(feats, targets),
                                         "spread_vs_unhooked": spread(feats) / spread(base),
                                         "precision_all_digits": knn_precision_recall(real_feats, feats)[0],
                                         "majority_digit_share": (logits.argmax(1) == majority).float().mean().item()}
        result[kind] = table
    result["seconds"] = round(time.perf_counter() - start, 1)
    append_run_record(result, a.record)
    print_tables(result)
    print(f"bench_hook_variety: {len(a.digits)} digits x {len(settings)} class settings, include and exclude, "
          f"{a.n} generations each, in {result['seconds']}s -> {a.record}")


def print_tables(r: dict) -> None:
    for digit, row in r["class"].items():
        print(f"class {digit}: real spread {row['real_spread']:.2f}")
        for name, v in row.items():
            if name != "real_spread":
                print(f"  {name:12s} share {v['share']:6.1%}  precision {v['precision']:.3f}  "
                      f"recall {v['recall']:.3f}  spread {v['spread']:.2f}x")
    for kind in ("include", "exclude"):
        t = r[kind]
        print(f"{kind} {t['indices']} (labels {t['labels']})")
        for name, v in t.items():
            if isinstance(v, dict):
                print("  " + f"{name:12s} " + json.dumps({k: round(x, 3) for k, x in v.items()}))


if __name__ == "__main__":
    run_cli(main, resumable=False)
