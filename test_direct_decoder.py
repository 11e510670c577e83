"""Show the direct decoder's output and the effect of each hook type on the same noise, at the bottleneck or a
finer decoder layer."""

from models.io.cli import ArgumentParser, add_common
from models.io.errors import run_cli
from models.io.paths import DEFAULT_CLASSIFIER, DEFAULT_TEACHER
from models.stages.gallery import hook_gallery
from models.steering.hooks import BOTTLENECK, DEFAULT_HOOK_STYLE, HOOK_STYLES


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ddpm_ckpt", default=DEFAULT_TEACHER, help="the student's teacher checkpoint")
    p.add_argument("--decoder_ckpt", default="direct_decoder_results/best_model.pt", help="direct-decoder checkpoint")
    p.add_argument("--n_samples", type=int, default=9, help="images per PNG (>= 3)")
    p.add_argument("--output_dir", default="test_outputs", help="baseline.png, one PNG per hook, hooks_overview.png")
    p.add_argument("--strength", type=float, default=0.5, help="strength of the include/exclude/class hooks")
    p.add_argument("--target_class", type=int, default=3, help="class of the class hook")
    p.add_argument("--hook_style", choices=list(HOOK_STYLES), default=DEFAULT_HOOK_STYLE,
                   help="how the class hook moves each image: toward a class mean (mean), toward its own nearest "
                        "probes of the class (nearest), or by the class direction (shift)")
    p.add_argument("--hook_layer", default=BOTTLENECK,
                   help="where every hook acts: bottleneck (7x7), or a finer decoder layer, up1 (14x14) or up2 (28x28)")
    p.add_argument("--seed", type=int, default=0, help="noise of sample i depends only on (seed, i)")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                   help="project classifier, used to find class means and report class shares")
    add_common(p)
    a = p.parse_args()
    hook_gallery(a.ddpm_ckpt, a.decoder_ckpt, a.n_samples, a.output_dir, a.seed, a.strength, a.target_class, a.cpu,
                 a.classifier, a.dry_run, a.hook_style, a.hook_layer)


if __name__ == "__main__":
    run_cli(main)
