"""Why a class hook can fail: are the reference features of real training images in the range of the student's
own bottleneck? Reports both feature norms, then the class hook's success (project classifier) for the shipped
target (the class's mean reference feature) beside a per-generation target (the class's reference feature nearest
to the generation's own bottleneck, by cosine), on the same noises.

    python bench/bench_class_hook.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \
        --decoder_ckpt runs/final3/student/best_model.pt --ref_features_path runs/final3/reference_features.pt --cpu
"""
import json

import torch
import torch.nn.functional as F

from models.evaluation.bench_common import load_pipeline, pipeline_parser
from models.io.errors import run_cli
from models.io.records import append_run_record


def nearest_member_hook(members: torch.Tensor, strength: float):
    """Toward the member nearest to each generation: every target is one real image's feature, not an average."""
    unit = F.normalize(members.flatten(1).float(), dim=1)

    def hook(h: torch.Tensor) -> torch.Tensor:
        idx = (F.normalize(h.flatten(1).float(), dim=1) @ unit.T).argmax(1)
        return (1 - strength) * h + strength * members[idx].to(h.dtype)
    return hook


@torch.inference_mode()
def main():
    p = pipeline_parser(__doc__, "bench/results/class_hook.jsonl")
    p.add_argument("--label", type=int, default=3, help="target class")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9, 1.0], help="hook strengths")
    a = p.parse_args()
    pipe, classifier = load_pipeline(a)
    ref, labels = pipe.steering.features, pipe.steering.labels
    members = ref[(labels == a.label).to(ref.device)]

    def success(hook) -> float:
        images = pipe.generate(a.n, seed=0, hook=hook).images
        return (classifier(images).argmax(1) == a.label).float().mean().item()

    own = pipe.generate(a.n, seed=0).features
    result = {"student_bottleneck_norm": own.flatten(1).norm(dim=1).mean().item(),
              "reference_feature_norm": ref.flatten(1).float().norm(dim=1).mean().item(),
              "class_mean_norm": members.float().mean(0).norm().item(), "label": a.label, "n": a.n,
              "baseline_success": success(None),
              "class_mean_hook": {s: success(pipe.toward_class(a.label, s)) for s in a.strengths},
              "nearest_member_hook": {s: success(nearest_member_hook(members, s)) for s in a.strengths},
              "decoder": a.decoder_ckpt, "features": a.ref_features_path}
    append_run_record(result, a.record)
    print(json.dumps({k: result[k] for k in ("student_bottleneck_norm", "reference_feature_norm", "class_mean_norm",
                                             "baseline_success", "class_mean_hook", "nearest_member_hook")}))


if __name__ == "__main__":
    run_cli(main, resumable=False)
