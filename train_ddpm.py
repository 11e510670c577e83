"""Train a teacher DDPM in the MNISTDiffusion format (upstream recipe), resumable bit-exactly."""

from models.io.cli import ArgumentParser, add_common, options_from_args
from models.io.errors import run_cli
from models.training.teacher import TeacherTrainOptions, train_teacher


def main():
    d = TeacherTrainOptions()
    p = ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default=d.dataset, help="data source: mnist5k (bundled), fashion-mnist, mnist")
    p.add_argument("--download", action="store_true", help="allow downloading --dataset mnist into ./mnist_data")
    p.add_argument("--output_dir", default=d.output_dir, help="checkpoints steps_XXXXXXXX.pt, grids, stats.jsonl")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the data (ignored if --steps > 0)")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps; 0 derives it from --epochs")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the OneCycle schedule")
    p.add_argument("--model_base_dim", dest="base_dim", type=int, default=d.base_dim, help="UNet base channels")
    p.add_argument("--dim_mults", type=int, nargs="+", default=d.dim_mults, help="channel multipliers per stage")
    p.add_argument("--timesteps", type=int, default=d.timesteps, help="diffusion steps T")
    p.add_argument("--model_ema_steps", dest="ema_every", type=int, default=d.ema_every,
                   help="update the EMA every N steps")
    p.add_argument("--model_ema_decay", dest="ema_decay", type=float, default=d.ema_decay,
                   help="EMA decay before upstream's batch-size/epochs adjustment")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds weights, data order, noise (per step)")
    p.add_argument("--save_every", type=int, default=d.save_every, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep_last", type=int, default=d.keep_last, help="checkpoints kept in output_dir")
    p.add_argument("--n_samples", type=int, default=d.n_samples, help="images in the per-epoch sample grid")
    p.add_argument("--sample_steps", type=int, default=d.sample_steps, help="DDIM steps for the sample grid")
    p.add_argument("--log_every", type=int, default=d.log_every, help="append to stats.jsonl every N steps")
    p.add_argument("--init_from", default=d.init_from,
                   help="start from this checkpoint's weights and EMA under a new schedule (to train a finished run "
                        "longer); its architecture overrides the flags; steps so far are recorded as steps_before")
    p.add_argument("--time_embedding_init", choices=("random", "sinusoidal"), default=d.time_embedding_init,
                   help="initial rows of the per-timestep embedding table: random (upstream) or sinusoidal "
                        "(smooth in t; same architecture and checkpoint format)")
    p.add_argument("--freeze_batchnorm", action="store_true",
                   help="train with BatchNorm in eval mode (its running statistics fixed), i.e. the network as "
                        "sampling runs it; for a short leg with --init_from (default: off, upstream)")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads for torch (0: torch's default)")
    add_common(p, resume=True)
    args = p.parse_args()
    train_teacher(options_from_args(TeacherTrainOptions, args), resume=args.resume, dry_run=args.dry_run)


if __name__ == "__main__":
    run_cli(main)
