"""Generate (noise, image) training pairs for the direct decoder from a teacher DDPM's deterministic sampler."""

from models.diffusion.samplers import DPMPP_SPACING_HELP, DPMPP_SPACINGS, SPACINGS
from models.diffusion.sampling import SAMPLERS, SPACING_HELP
from models.io.cli import ArgumentParser, add_common, options_from_args
from models.io.errors import run_cli
from models.stages.generate import GenerateOptions, generate_training_data


def build_parser() -> ArgumentParser:
    """The command line (also read by serve.py to check a job's options before it starts)."""
    d = GenerateOptions()
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default=d.ckpt, help="teacher checkpoint (ours or upstream MNISTDiffusion's)")
    p.add_argument("--n_samples", type=int, default=d.n_samples, help="number of (noise, image) pairs")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="samples per forward pass (no effect on results)")
    p.add_argument("--output_dir", default=d.output_dir, help="writes OUTPUT_DIR/training_data.pt")
    p.add_argument("--sampler", choices=SAMPLERS, default=d.sampler,
                   help="ddim (deterministic when --eta 0), ddpm (upstream's 1000-step ancestral sampler), or "
                        "dpmpp2m / dpmpp3m (DPM-Solver++ multistep, deterministic; same quality at fewer steps, see "
                        "BENCHMARKS.md 'Sampler choice')")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="network evaluations K for ddim and dpmpp (ignored by ddpm, which uses all T)")
    p.add_argument("--spacing", choices=sorted(set(SPACINGS + DPMPP_SPACINGS)), default=d.spacing,
                   help=f"timestep grid (default: trailing for ddim, logsnr for dpmpp). DDIM: {SPACING_HELP}. "
                        f"DPM-Solver++: {DPMPP_SPACING_HELP}")
    p.add_argument("--eta", type=float, default=d.eta,
                   help="DDIM eta: 0 is a deterministic noise->image map (dpmpp needs 0)")
    p.add_argument("--no_clip", dest="clip_x0", action="store_false",
                   help="do not clip the predicted x0 to [-1, 1] at each step (clipping is the default)")
    p.add_argument("--seed", type=int, default=d.seed, help="noise of sample i depends only on (seed, i)")
    p.add_argument("--shard_size", type=int, default=d.shard_size,
                   help="pairs per resumable shard; 0 means 10 batches")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=d.precision,
                   help="GPU arithmetic (ignored on CPU, which always runs fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU; slow start)")
    p.add_argument("--channels_last", action="store_true", help="channels_last memory format")
    add_common(p)
    return p


def main():
    args = build_parser().parse_args()
    generate_training_data(options_from_args(GenerateOptions, args), dry_run=args.dry_run)


if __name__ == "__main__":
    run_cli(main)
