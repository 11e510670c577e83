"""Bottleneck features of every training image, in the space the direct decoder's hooks act on."""

from models.data.datasets import SOURCES
from models.io.cli import ArgumentParser, add_common, options_from_args
from models.io.errors import run_cli
from models.stages.features import ATTRIBUTION_RULES, FeatureOptions, extract_reference_features


def build_parser() -> ArgumentParser:
    """The command line (also read by serve.py to check a job's options before it starts)."""
    d = FeatureOptions()
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ddpm_ckpt", default=d.ddpm_ckpt,
                   help="teacher checkpoint (warm-starts the image encoder; runs the DDIM inversion)")
    p.add_argument("--decoder_ckpt", default=d.decoder_ckpt, help="direct-decoder checkpoint")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="images per batch")
    p.add_argument("--output_path", default=d.output_path, help="output file (features, labels, indices, latents)")
    p.add_argument("--dataset", choices=SOURCES, default=d.dataset,
                   help="training images; default: the teacher's data source (mnist for upstream checkpoints)")
    p.add_argument("--split", choices=["train", "test"], default=d.split, help="dataset split")
    p.add_argument("--limit", type=int, default=d.limit, help="use only the first N images (0: all)")
    p.add_argument("--method", choices=["auto", "image_encoder", "ddim_inversion"], default=d.method,
                   help="image_encoder: an encoder trained to return the student's bottleneck for its own images and the "
                        "teacher's images of its training pairs, then one "
                        "pass per image; ddim_inversion: the teacher's DDIM latent, bottleneck read there; auto: "
                        "image_encoder for students trained with --skips zero, else ddim_inversion")
    p.add_argument("--encoder_steps", type=int, default=d.encoder_steps, help="image-encoder training steps")
    p.add_argument("--encoder_batch_size", type=int, default=d.encoder_batch_size,
                   help="images per image-encoder step (student generations and teacher images of training pairs)")
    p.add_argument("--encoder_lr", type=float, default=d.encoder_lr, help="image-encoder peak learning rate")
    p.add_argument("--encoder_pool_size", type=int, default=d.encoder_pool_size,
                   help="student generations made once, in large batches, and reused in shuffled passes by the "
                        "image encoder's training (generating costs more than a training step on the result; capped "
                        "at the generations the training draws); 0: fresh generations every step")
    p.add_argument("--encoder_frozen_blocks", type=int, default=d.encoder_frozen_blocks,
                   help="leading encoder blocks (with the input conv) kept at the teacher's weights while the image "
                        "encoder trains: the full-resolution layers, most of a training step's cost")
    p.add_argument("--encoder_teacher_pairs_fraction", type=float, default=d.encoder_teacher_pairs_fraction,
                   help="share of each image-encoder batch taken from the student's training pairs (the teacher's "
                        "sharp image for a pair's noise, target: the student's bottleneck at that noise), so real "
                        "digits map inside the student's bottleneck range; 0: the student's own images only; used "
                        "when the pairs file recorded in the student checkpoint is still there unchanged")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the image encoder's training latents")
    p.add_argument("--inversion_steps", type=int, default=d.inversion_steps,
                   help="DDIM inversion steps, evenly spaced from t = 0 up to the first timestep of the sampler "
                        "that made the student's training pairs (read from the student checkpoint)")
    p.add_argument("--attribution_rule", choices=ATTRIBUTION_RULES, default=d.attribution_rule,
                   help="the attribution rule these features serve by default: shape (digit shape, pixels compared "
                        "with tolerance for small shifts, rotations and stroke width; stores the reference images, "
                        "a few MB, and needs no training or labels; BENCHMARKS.md, Attribution) or bottleneck "
                        "(cosine of bottleneck features)")
    p.add_argument("--fp16", action="store_true", help="store features as float16 (half the file size)")
    p.add_argument("--no_latents", dest="store_latents", action="store_false",
                   help="do not store the latents (ddim_inversion; the image encoder has none)")
    p.add_argument("--consistency_samples", type=int, default=d.consistency_samples,
                   help="generated samples used to measure that extraction recovers the student's own features")
    p.add_argument("--shard_size", type=int, default=d.shard_size, help="images per resumable shard; 0: 10 batches")
    p.add_argument("--download", action="store_true", help="allow downloading --dataset mnist")
    add_common(p)
    return p


def main():
    args = build_parser().parse_args()
    extract_reference_features(options_from_args(FeatureOptions, args), dry_run=args.dry_run)


if __name__ == "__main__":
    run_cli(main)
