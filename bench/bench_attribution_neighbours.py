"""Is low attribution label agreement the neighbour rule's fault or the generations'? Top-1 label agreement (the
classifier's label of a generation vs its nearest training image's label) under several neighbour rules, on all
generations and on those the classifier is confident about (>= 0.9). Beside it, the same rule on images that are not
the student's: the teacher's DDIM images of the same noises (through the stored image encoder), and the training
images themselves, each against all the others (leave-one-out, against its own label). "Re-encoded" reads the
generated image back through the image encoder, so generation and training images reach the bottleneck space by the
same path.

    python bench/bench_attribution_neighbours.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \
        --decoder_ckpt checkpoints/student_mnist5k.pt --ref_features_path FEATURES/reference_features.pt --cpu

The generations are attribution_generation.py's evaluation set (seed 1, the first N latents).
"""
import json

import torch

from models.data.datasets import load_dataset
from models.evaluation.bench_common import load_pipeline, pipeline_parser
from models.io.errors import run_cli
from models.io.records import append_run_record
from models.steering.search import top_k_similar


def nearest_by_l2(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return torch.cdist(query.flatten(1).float(), reference.flatten(1).float()).argmin(1)


def nearest_by_cosine(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return top_k_similar(query, reference, 1)[1][:, 0]


def leave_one_out_agreement(reference: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of reference rows whose nearest other row (cosine) has the same label: how class-coherent a space is."""
    idx = top_k_similar(reference, reference, 2)[1].cpu()
    other = torch.where(idx[:, 0] == torch.arange(len(idx)), idx[:, 1], idx[:, 0])
    return (labels[other] == labels).float().mean().item()


@torch.inference_mode()
def main():
    a = pipeline_parser(__doc__, "bench/results/attribution_neighbours.jsonl").parse_args()
    pipe, classifier = load_pipeline(a)
    meta = pipe.reference["metadata"]
    real = load_dataset(meta["dataset"], meta.get("split", "train")).images[pipe.reference["indices"]].to(pipe.device)
    out = pipe.generate(a.n, seed=1)
    logits = classifier(out.images)
    label, confident = logits.argmax(1).cpu(), logits.softmax(1).amax(1).cpu() >= 0.9
    ref, ref_labels = pipe.steering.features.float(), pipe.steering.labels
    mean = ref.mean(0, keepdim=True)
    rules = {"bottleneck cosine (shipped)": nearest_by_cosine(out.features, ref),
             "bottleneck cosine, centred": nearest_by_cosine(out.features - mean, ref - mean),
             "bottleneck L2": nearest_by_l2(out.features, ref),
             # the generated image read back by the image encoder: the same path as the reference images took
             "bottleneck cosine, re-encoded": pipe.attribute_images(out.images, 1)[2][:, 0],
             "pixel cosine (shipped baseline)": nearest_by_cosine(out.images, real),
             "pixel L2": nearest_by_l2(out.images, real)}
    result = {"n": a.n, "confident_share": confident.float().mean().item(), "top1_agreement": {}}
    print(f"{'neighbour rule':34s} {'all':>6s} {'confident':>10s}")
    for name, idx in rules.items():
        hit = (ref_labels[idx.cpu()] == label).float()
        result["top1_agreement"][name] = {"all": hit.mean().item(), "confident": hit[confident].mean().item()}
        print(f"{name:34s} {hit.mean().item():6.1%} {hit[confident].mean().item():10.1%}")
    result.update({"decoder": a.decoder_ckpt, "features": a.ref_features_path})
    teacher_view = pipe.teacher_images(out.noise)
    teacher_label = classifier(teacher_view).argmax(1).cpu()
    teacher_rules = {"bottleneck cosine, image encoder": pipe.attribute_images(teacher_view, 1)[2][:, 0],
                     "pixel cosine": nearest_by_cosine(teacher_view, real)}
    result["teacher_images_top1_agreement"] = {
        name: (ref_labels[idx.cpu()] == teacher_label).float().mean().item() for name, idx in teacher_rules.items()}
    result["training_images_leave_one_out"] = {"bottleneck cosine": leave_one_out_agreement(ref, ref_labels),
                                               "pixel cosine": leave_one_out_agreement(real, ref_labels)}
    for where in ("teacher_images_top1_agreement", "training_images_leave_one_out"):
        for name, value in result[where].items():
            print(f"{where}: {name:34s} {value:6.1%}")
    append_run_record(result, a.record)
    print(json.dumps({"confident_share": result["confident_share"]}))


if __name__ == "__main__":
    run_cli(main, resumable=False)
