"""Is low attribution label agreement the neighbour rule's fault or the generations'? Top-1 label agreement (the
audit classifier's label of a generation vs its nearest training image's label; the project classifier's labels
beside it) under several neighbour rules, on all generations and on those the audit classifier is confident about
(>= 0.9). Two rules bound what any rule could reach: a class-discriminant (LDA) projection of the bottleneck fitted
on the training images' labels, and the audit classifier's own feature space (the judge's space: not an attribution
rule, a ceiling set by how ambiguous the generations are). Beside it, the same rule on images that are not
the student's: the teacher's DDIM images of the same noises (through the stored image encoder), and the training
images themselves, each against all the others (leave-one-out, against its own label). "Re-encoded" reads the
generated image back through the image encoder, so generation and training images reach the bottleneck space by the
same path. "Shape" is the default rule of features that carry it (models/steering/shape_match.py): blurred pixels
compared over one-pixel shifts of the generation and rotated / thinned / thickened views of each training image.
Top-5: the share of the five nearest training images that carry the generation's label. Percentiles: where a top-1
score falls among the reference set's own nearest-neighbour scores (the generations', and near-copies': training
images shifted by one pixel, whose top-1 should be themselves).

    python bench/bench_attribution_neighbours.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \
        --decoder_ckpt checkpoints/student_mnist5k.pt --ref_features_path FEATURES/reference_features.pt --cpu

The generations are attribution_generation.py's evaluation set (seed 1, the first N latents).
"""
import json

import torch

from models.data.datasets import load_dataset
from models.evaluation.bench_common import load_pipeline, pipeline_parser
from models.io.errors import run_cli
from models.io.paths import AUDIT_CLASSIFIER
from models.nets.classifier import load_classifier
from models.io.records import append_run_record
from models.steering.search import top_k_similar

TOP_K = 5


def nearest_by_l2(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return torch.cdist(query.flatten(1).float(), reference.flatten(1).float()).topk(TOP_K, 1, largest=False)[1]


def nearest_by_cosine(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return top_k_similar(query, reference, TOP_K)[1]


def quartiles(x: torch.Tensor) -> list[float]:
    return [round(v, 1) for v in x.float().quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()]


def lda_projection(reference: torch.Tensor, labels: torch.Tensor, shrinkage: float = 0.3) -> tuple:
    """(mean, projection) of Fisher's discriminant on flattened features, within-class covariance shrunk toward
    its mean variance (3,136 dimensions, 5,000 rows)."""
    x = reference.flatten(1).double()
    mean = x.mean(0)
    x = x - mean
    classes = labels.unique()
    class_means = torch.stack([x[labels == c].mean(0) for c in classes])
    within = x - class_means[torch.searchsorted(classes, labels)]
    cov = within.T @ within / len(x)
    cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    eigval, eigvec = torch.linalg.eigh(cov)
    whiten = eigvec / eigval.clamp_min(1e-12).sqrt()
    between = whiten.T @ (class_means.T @ class_means / len(classes)) @ whiten
    return mean, whiten @ torch.linalg.eigh(between)[1][:, -(len(classes) - 1):]


def leave_one_out_agreement(reference: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of reference rows whose nearest other row (cosine) has the same label: how class-coherent a space is."""
    idx = top_k_similar(reference, reference, 2)[1].cpu()
    other = torch.where(idx[:, 0] == torch.arange(len(idx)), idx[:, 1], idx[:, 0])
    return (labels[other] == labels).float().mean().item()


@torch.inference_mode()
def main():
    p = pipeline_parser(__doc__, "bench/results/attribution_neighbours.jsonl")
    p.add_argument("--audit_classifier", default=AUDIT_CLASSIFIER, help="labels the generations (no loss has seen it)")
    a = p.parse_args()
    pipe, project = load_pipeline(a)
    pipe.steering.resolve_attribute_by("shape")  # refuses features without the shape rule, in one line
    classifier = load_classifier(a.audit_classifier, pipe.device)
    meta = pipe.reference["metadata"]
    real = load_dataset(meta["dataset"], meta.get("split", "train")).images[pipe.reference["indices"]].to(pipe.device)
    out = pipe.generate(a.n, seed=1)
    logits = classifier(out.images)
    label, confident = logits.argmax(1).cpu(), logits.softmax(1).amax(1).cpu() >= 0.9
    project_label = project(out.images).argmax(1).cpu()
    ref, ref_labels = pipe.steering.features.float(), pipe.steering.labels
    mean = ref.mean(0, keepdim=True)
    re_encoded = pipe.attribute_images(out.images, TOP_K, attribute_by="image")
    lda_mean, lda = lda_projection(ref.cpu(), ref_labels)
    lda_ref = ((ref.flatten(1).double().cpu() - lda_mean) @ lda).float()
    audit_space = torch.cat([classifier.features(real[i:i + 1000]) for i in range(0, len(real), 1000)])
    shape = pipe.steering.attribute_shape(out.images, TOP_K)
    rules = {"shape (default)": shape[1],
             "bottleneck cosine": nearest_by_cosine(out.features, ref),
             "bottleneck cosine, centred": nearest_by_cosine(out.features - mean, ref - mean),
             "bottleneck L2": nearest_by_l2(out.features, ref),
             # the generated image read back by the image encoder: the same path as the reference images took
             "bottleneck cosine, re-encoded": re_encoded[2],
             "LDA of bottleneck, re-encoded": nearest_by_cosine(
                 ((re_encoded[0].flatten(1).double().cpu() - lda_mean) @ lda).float(), lda_ref),
             "audit classifier features (ceiling)": nearest_by_cosine(classifier.features(out.images), audit_space),
             "pixel cosine (shipped baseline)": nearest_by_cosine(out.images, real),
             "pixel L2": nearest_by_l2(out.images, real)}
    result = {"n": a.n, "labels_by": "audit classifier", "confident_share": confident.float().mean().item(),
              "audit_project_label_agreement": (label == project_label).float().mean().item(), "top1_agreement": {}}
    print(f"{'neighbour rule':38s} {'all':>6s} {'confident':>10s} {'project labels':>15s} {'top-5':>6s}")
    for name, idx in rules.items():
        idx = idx.cpu()
        hit = (ref_labels[idx[:, 0]] == label).float()
        by_project = (ref_labels[idx[:, 0]] == project_label).float().mean().item()
        top5 = (ref_labels[idx] == label[:, None]).float().mean().item()
        result["top1_agreement"][name] = {"all": hit.mean().item(), "confident": hit[confident].mean().item(),
                                          "all_project_labels": by_project, "top5_share": top5}
        print(f"{name:38s} {hit.mean().item():6.1%} {hit[confident].mean().item():10.1%} {by_project:15.1%} "
              f"{top5:6.1%}")
    # readable scores: top-1 percentiles of the generations and of near-copies of training images
    rows = torch.arange(0, len(real), max(1, len(real) // 200))
    near_copies = torch.roll(real[rows], shifts=1, dims=-1)
    copy_scores, copy_idx, _ = pipe.steering.attribute_shape(near_copies, 1)
    result["top1_percentile_quartiles"] = {
        "generations, shape": quartiles(pipe.steering.percentiles(shape[0][:, 0], "shape")),
        "generations, bottleneck": quartiles(pipe.steering.percentiles(
            top_k_similar(out.features, ref, 1)[0][:, 0].cpu(), "bottleneck")),
        "near-copies (training images shifted one pixel), shape": quartiles(
            pipe.steering.percentiles(copy_scores[:, 0], "shape"))}
    result["near_copies_found_themselves"] = (copy_idx[:, 0] == rows).float().mean().item()
    for name, q in result["top1_percentile_quartiles"].items():
        print(f"top-1 percentile quartiles, {name}: {q}")
    result.update({"decoder": a.decoder_ckpt, "features": a.ref_features_path})
    teacher_view = pipe.teacher_images(out.noise)
    teacher_label = classifier(teacher_view).argmax(1).cpu()
    teacher_rules = {"shape": pipe.steering.attribute_shape(teacher_view, 1)[1][:, 0],
                     "bottleneck cosine, image encoder": pipe.attribute_images(teacher_view, 1, "image")[2][:, 0],
                     "pixel cosine": nearest_by_cosine(teacher_view, real)[:, 0]}
    result["teacher_images_top1_agreement"] = {
        name: (ref_labels[idx.cpu()] == teacher_label).float().mean().item() for name, idx in teacher_rules.items()}
    result["training_images_leave_one_out"] = {"bottleneck cosine": leave_one_out_agreement(ref, ref_labels),
                                               "pixel cosine": leave_one_out_agreement(real, ref_labels)}
    for where in ("teacher_images_top1_agreement", "training_images_leave_one_out"):
        for name, value in result[where].items():
            print(f"{where}: {name:34s} {value:6.1%}")
    append_run_record(result, a.record)
    print(json.dumps({"confident_share": result["confident_share"],
                      "near_copies_found_themselves": result["near_copies_found_themselves"]}))


if __name__ == "__main__":
    run_cli(main, resumable=False)
