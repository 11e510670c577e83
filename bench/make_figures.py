"""The README's pictures from a teacher/student pair and its reference features, so they always show the shipped
pair: teacher vs student on the same noises, the hook panels (baseline, include, exclude, class) on one set of
noises, and a strip of the class hook at rising strengths (rows: noises, columns: strengths).

    python bench/make_figures.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \
        --decoder_ckpt checkpoints/student_mnist5k.pt --ref_features_path FEATURES.pt --cpu
"""
import torch

from models.evaluation.bench_common import features_provenance, load_pipeline, pipeline_parser
from models.io.errors import run_cli
from models.io.files import atomic_write_json, prepare_output_dir
from models.io.images import save_image_grid
from models.steering.hooks import DEFAULT_HOOK_STYLE, HOOK_STYLES


@torch.inference_mode()
def main():
    p = pipeline_parser(__doc__, None, n=36)
    p.add_argument("--output_dir", default="docs/figures", help="where the PNGs go")
    p.add_argument("--strength", type=float, default=0.5, help="strength of the include and exclude panels")
    p.add_argument("--class_strength", type=float, default=0.75, help="strength of the class panel (where the hook "
                   "reaches its class: BENCHMARKS.md, Hooks)")
    p.add_argument("--hook_style", choices=list(HOOK_STYLES), default=DEFAULT_HOOK_STYLE, help="style of every hook")
    p.add_argument("--strip", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                   help="class-hook strengths of hooks_class_strip.png")
    p.add_argument("--strip_rows", type=int, default=6, help="noises (rows) of hooks_class_strip.png")
    p.add_argument("--label", type=int, default=3, help="class of the class-hook panel")
    p.add_argument("--include", type=int, nargs="+", default=list(range(10)), help="training images to include")
    p.add_argument("--exclude", type=int, nargs="+", default=list(range(100, 110)), help="training images to exclude")
    p.add_argument("--pairs", type=int, default=12, help="teacher/student columns in student_vs_teacher.png")
    a = p.parse_args()
    pipe, classifier = load_pipeline(a)
    out = prepare_output_dir(a.output_dir)

    student = pipe.generate(a.pairs, seed=0)
    teacher = pipe.teacher_images(student.noise).clamp(-1, 1)
    save_image_grid(torch.cat([teacher, student.images]), out / "student_vs_teacher.png", nrow=a.pairs)

    style = a.hook_style
    panels = {"baseline": None, "include": pipe.include(a.include, a.strength, style),
              "exclude": pipe.exclude(a.exclude, a.strength, style),
              f"class_{a.label}": pipe.toward_class(a.label, a.class_strength, style)}
    shares = {}
    for name, hook in panels.items():
        images = pipe.generate(a.n, seed=0, hook=hook).images
        save_image_grid(images, out / f"hooks_{name}.png", nrow=6)
        shares[name] = (classifier(images).argmax(1) == a.label).float().mean().item()
    noise = pipe.noise(a.strip_rows, seed=0)
    columns = [pipe.generate(a.strip_rows, hook=pipe.toward_class(a.label, s, style), noise=noise, top_k=0).images
               for s in a.strip]
    save_image_grid(torch.stack(columns, 1).flatten(0, 1), out / "hooks_class_strip.png", nrow=len(a.strip))
    atomic_write_json({"teacher": pipe.teacher.sha256, "student": pipe.student.sha256, "features": features_provenance(a.ref_features_path, pipe.reference),
                       "n": a.n, "seed": 0, "hook_style": style, "strength": a.strength,
                       "class_strength": a.class_strength, "include": a.include, "exclude": a.exclude,
                       f"share_classified_{a.label}": shares, "strip_strengths": a.strip}, out / "figures.json")
    print(f"make_figures: student_vs_teacher.png, {len(panels)} hook panels and hooks_class_strip.png in {out}; "
          f"class {a.label} share {shares['baseline']:.0%} baseline -> {shares[f'class_{a.label}']:.0%} with the "
          f"{style} hook at {a.class_strength}")


if __name__ == "__main__":
    run_cli(main)
