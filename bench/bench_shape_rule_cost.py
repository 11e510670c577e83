"""What the shape attribution rule costs: building its record at extraction (reference views, calibration) for the
whole reference set, and attributing a 16-image request by shape against the bottleneck rule (the server's case).
CPU seconds of this process (time.process_time), so a busy machine inflates them less than wall time.

    python bench/bench_shape_rule_cost.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \\
        --decoder_ckpt checkpoints/student_mnist5k.pt --ref_features_path FEATURES/reference_features.pt --cpu
"""
import time

import torch

from models.data.datasets import load_dataset
from models.evaluation.bench_common import cpu_seconds, load_pipeline, pipeline_parser
from models.io.errors import run_cli
from models.io.records import append_run_record
from models.stages.features import attribution_record


def main():
    p = pipeline_parser(__doc__, "bench/results/shape_rule_cost.jsonl", n=16)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the request (best is kept)")
    a = p.parse_args()
    pipe, _ = load_pipeline(a)
    meta = pipe.reference["metadata"]
    images = load_dataset(meta["dataset"], meta.get("split", "train")).images[pipe.reference["indices"]]
    steering = pipe.steering
    steering.resolve_attribute_by("shape")
    result = {"n_reference": len(images), "n_request": a.n, "threads": torch.get_num_threads(),
              "record_build_cpu_s": cpu_seconds(lambda: attribution_record("shape", images, steering.features.cpu()))}
    out = pipe.generate(a.n, seed=0, top_k=0)
    result["views_build_cpu_s"] = cpu_seconds(lambda: steering.attribute_shape(out.images, 5))  # first call builds
    result["request_cpu_s"] = {
        "generate, no attribution": cpu_seconds(lambda: pipe.generate(a.n, seed=0, top_k=0), a.repeats),
        "top-5 by shape": cpu_seconds(lambda: steering.attribute_shape(out.images, 5), a.repeats),
        "top-5 by bottleneck": cpu_seconds(lambda: steering.attribute(out.features, 5), a.repeats)}
    print(f"shape rule record for {len(images)} images: {result['record_build_cpu_s']:.1f} CPU s; reference views "
          f"at first use: {result['views_build_cpu_s']:.2f} CPU s")
    for name, seconds in result["request_cpu_s"].items():
        print(f"{a.n} images, {name}: {seconds * 1000:.0f} CPU ms")
    result.update({"decoder": a.decoder_ckpt, "features": a.ref_features_path})
    append_run_record(result, a.record)


if __name__ == "__main__":
    run_cli(main, resumable=False)
