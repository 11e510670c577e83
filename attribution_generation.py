"""Generate with include / exclude / class hooks in the direct decoder's bottleneck, and attribute each
generation to the training images it most resembles (by digit shape where the reference features carry that rule,
else by bottleneck features)."""

from models.io.cli import ArgumentParser, add_common, options_from_args
from models.io.errors import run_cli
from models.stages.attribution import AttributionOptions, attribution_generation
from models.steering.hooks import HOOK_STYLES
from models.steering.steering import ATTRIBUTE_BY


def build_parser() -> ArgumentParser:
    """The command line (also read by serve.py to check a job's options before it starts)."""
    d = AttributionOptions()
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ddpm_ckpt", default=d.ddpm_ckpt, help="teacher checkpoint")
    p.add_argument("--decoder_ckpt", default=d.decoder_ckpt, help="direct-decoder checkpoint")
    p.add_argument("--ref_features_path", default=d.ref_features_path, help="from extract_reference_features.py")
    p.add_argument("--n_samples", type=int, default=d.n_samples, help="generations per hook")
    p.add_argument("--output_dir", default=d.output_dir, help="PNGs, attribution_results.pt, attribution_report.json")
    p.add_argument("--include", type=int, nargs="+", default=d.include, help="reference indices to pull toward")
    p.add_argument("--exclude", type=int, nargs="+", default=d.exclude, help="reference indices to push away from")
    p.add_argument("--target_class", type=int, default=d.target_class, help="class of the class hook")
    p.add_argument("--strength", type=float, nargs="+", default=d.strength,
                   help="hook strength in [0, 1]; several values make a sweep (the first names the main PNGs)")
    p.add_argument("--hook_style", choices=list(HOOK_STYLES), default=d.hook_style,
                   help="how the class, include and exclude hooks move each generation: toward the mean of the "
                        "targets (mean: generations become alike), toward each one's own nearest targets (nearest), "
                        "or all by the targets' direction from the average digit (shift)")
    p.add_argument("--hook_layer", default=d.hook_layer,
                   help="where the class, include and exclude hooks act: bottleneck (7x7: class and shape), or a finer "
                        "decoder layer, up1 (14x14) or up2 (28x28: stroke detail); reference features there are "
                        "derived from the stored bottleneck ones at first use")
    p.add_argument("--top_k", type=int, default=d.top_k, help="training images reported per generation")
    p.add_argument("--attribute_by", choices=["auto", *ATTRIBUTE_BY], default=d.attribute_by,
                   help="place each generation among the training images by its digit shape (shape: pixels compared "
                        "with tolerance for small shifts, rotations and stroke width), by the bottleneck features "
                        "that made it (bottleneck), or by its image read back through the reference features' image "
                        "encoder (image); auto: the reference features' default rule (shape when they carry it)")
    p.add_argument("--seed", type=int, default=d.seed, help="noise of sample i depends only on (seed, i)")
    p.add_argument("--n_eval", type=int, default=d.n_eval, help="generations per strength in the evaluation")
    p.add_argument("--no_evaluate", dest="evaluate", action="store_false",
                   help="skip the steering and attribution evaluation (attribution_report.json)")
    p.add_argument("--classifier", default=d.classifier, help="project classifier used by the evaluation")
    add_common(p)
    return p


def main():
    args = build_parser().parse_args()
    attribution_generation(options_from_args(AttributionOptions, args), dry_run=args.dry_run)


if __name__ == "__main__":
    run_cli(main)
