"""Whether steering and attribution work, in numbers that can be checked: class-hook success (also by the audit
classifier), include/exclude effect in a classifier's feature space, and attribution label agreement against a
pixel-space nearest-neighbour baseline; and the attribution grid figure."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from ..diffusion.noise import per_sample_noise
from ..io.files import atomic_write_json
from ..io.records import software_versions
from ..nets.classifier import load_classifier
from ..steering.search import top_k_similar
from ..steering.steering import ATTRIBUTE_BY, Steering
from .plots import save_figure

SWEEP = [round(0.1 * i, 1) for i in range(1, 11)]


def attribution_grid(images, indices, scores, labels, dataset, path: Path, percentiles=None) -> None:
    """Each generation beside its top-k training images, with label, similarity and (given) its percentile among
    the reference set's nearest-neighbour scores."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, k = indices.shape
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.3 * (k + 1), 1.45 * rows), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(images[r, 0].cpu(), cmap="gray", vmin=-1, vmax=1)
        axes[r, 0].set_title("generated", fontsize=7)
        for c in range(k):
            i = int(indices[r, c])
            axes[r, c + 1].imshow(dataset.images[i, 0], cmap="gray", vmin=-1, vmax=1)
            score = f"{float(scores[r, c]):.3f}" + ("" if percentiles is None else f" p{float(percentiles[r, c]):.0f}")
            axes[r, c + 1].set_title(f"#{i} y={int(labels[r, c])}\n{score}", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


@torch.inference_mode()
def evaluate_steering(steer: Steering, dataset, opts, device, path: Path, examples: dict | None = None) -> dict:
    """Class-hook success, include/exclude effect in an independent (classifier) feature space, and attribution
    label agreement, against a pixel-space nearest-neighbour baseline. ``opts``: the stage's AttributionOptions;
    ``examples``: readable top-k (scores, percentiles) of some generations, kept in the report."""
    classifier = load_classifier(opts.classifier, device)
    audit = load_classifier(opts.audit_classifier, device)
    z = per_sample_noise(opts.seed + 1, range(opts.n_eval), device=device)
    ref_images = dataset.images[:len(steer.labels)]

    def cls_features(x):
        return torch.cat([classifier.features(x[i:i + 512].to(device)) for i in range(0, x.shape[0], 512)])

    def sim_to(x_feats, target_feats):
        return F.cosine_similarity(x_feats, target_feats.mean(0, keepdim=True), dim=1).mean().item()

    inc_t, exc_t = cls_features(ref_images[opts.include]), cls_features(ref_images[opts.exclude])
    base_images, base_feats = steer.generate(z)
    base_cls = cls_features(base_images)
    base_pred = classifier(base_images).argmax(1).cpu()
    report = {"n_eval": opts.n_eval, "strengths": SWEEP, "target_class": opts.target_class,
              "hook_style": opts.hook_style, "hook_layer": opts.hook_layer,
              "baseline_share_target_class": (base_pred == opts.target_class).float().mean().item(),
              "class_hook_success": [], "class_hook_success_audit": [], "include_similarity": [], "exclude_similarity": [],
              "baseline_include_similarity": sim_to(base_cls, inc_t),
              "baseline_exclude_similarity": sim_to(base_cls, exc_t)}
    for s in SWEEP:
        imgs, _ = steer.generate(z, steer.toward_class(opts.target_class, s, opts.hook_style,
                                                        layer=opts.hook_layer))
        for key, judge in (("class_hook_success", classifier), ("class_hook_success_audit", audit)):
            report[key].append((judge(imgs).argmax(1).cpu() == opts.target_class).float().mean().item())
        imgs, _ = steer.generate(z, steer.include(opts.include, s, opts.hook_style, layer=opts.hook_layer))
        report["include_similarity"].append(sim_to(cls_features(imgs), inc_t))
        imgs, _ = steer.generate(z, steer.exclude(opts.exclude, s, opts.hook_style, layer=opts.hook_layer))
        report["exclude_similarity"].append(sim_to(cls_features(imgs), exc_t))
    available = {"bottleneck": True, "image": steer.has_image_encoder, "shape": steer.default_attribute_by == "shape"}
    neighbour_labels = {by: steer.attribute_generation(base_images, base_feats, 5, by)[2] for by in ATTRIBUTE_BY
                        if available[by]}
    neighbour_labels["pixel_nn_baseline"] = steer.labels[top_k_similar(base_images.cpu(), ref_images, 5)[1]]

    def agreement(lbls, generation_label):
        top1 = (lbls[:, 0] == generation_label).float().mean().item()
        vote = torch.tensor([Counter(row.tolist()).most_common(1)[0][0] for row in lbls])
        return {"top1": top1, "top5_majority": (vote == generation_label).float().mean().item()}

    audit_pred = audit(base_images).argmax(1).cpu()
    report["attribute_by"] = steer.resolve_attribute_by(opts.attribute_by)
    if examples is not None:
        report["attribution_examples"] = examples
    report["attribution_label_agreement"] = {k: agreement(v, base_pred) for k, v in neighbour_labels.items()}
    report["attribution_label_agreement_audit"] = {k: agreement(v, audit_pred) for k, v in neighbour_labels.items()}
    report["note"] = ("similarities are cosine similarities in the project classifier's feature space (independent "
                      "of the bottleneck the hooks act on); attribution is nearest-neighbour similarity, "
                      "not causal influence; label agreement is a generation's label (by the project "
                      "classifier, and by the audit classifier, which no loss has seen) against its nearest "
                      "training images' labels, with the generation placed by its digit shape ('shape'), its "
                      "bottleneck features ('bottleneck') or its image re-encoded ('image'); a score's percentile "
                      "is its place among the reference images' scores to their nearest other reference image")
    report["versions"] = software_versions()
    atomic_write_json(report, path)
    _print_report(report)
    return report


def _print_report(r: dict) -> None:
    print(f"{'strength':>8} {'class-' + str(r['target_class']) + ' success':>16} {'(audit)':>8} {'incl. sim':>10} "
          f"{'excl. sim':>10}")
    print(f"{'0 (base)':>8} {r['baseline_share_target_class']:>16.2%} {'':>8} {r['baseline_include_similarity']:>10.3f} "
          f"{r['baseline_exclude_similarity']:>10.3f}")
    for s, c, ca, i, e in zip(r["strengths"], r["class_hook_success"], r["class_hook_success_audit"],
                              r["include_similarity"], r["exclude_similarity"]):
        print(f"{s:>8} {c:>16.2%} {ca:>8.1%} {i:>10.3f} {e:>10.3f}")
    for key, judge in (("attribution_label_agreement", "project"), ("attribution_label_agreement_audit", "audit")):
        rules = ", ".join(f"{name} {v['top1']:.1%}" for name, v in r[key].items())
        print(f"attribution top-1 label agreement ({judge} classifier's labels): {rules}")
