"""Train the one-step direct decoder (noise -> teacher image), warm-started from the teacher DDPM."""

from models.io.cli import ArgumentParser, add_common, options_from_args
from models.io.errors import run_cli
from models.nets.student import GLOBAL_CONTEXT, SKIP_MODES
from models.training.student import ADV_REAL, LOSSES, StudentTrainOptions, evaluate_only, train_student


def build_parser() -> ArgumentParser:
    """The command line (also read by serve.py to check a job's options before it starts)."""
    d = StudentTrainOptions()
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ddpm_ckpt", default=d.ddpm_ckpt, help="teacher checkpoint the training data came from")
    p.add_argument("--data_path", nargs="+", default=d.data_path,
                   help="training_data.pt from generate_training_data.py; several files (one teacher and sampler, "
                        "distinct seeds) are merged into OUTPUT_DIR/training_data.pt")
    p.add_argument("--output_dir", default=d.output_dir,
                   help="ckpt_epoch_XXX.pt, best_model.pt, samples_epoch_XXX.png, stats.jsonl, loss.png")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training pairs")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="pairs per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW, warm-up + cosine)")
    p.add_argument("--weight_decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--loss", choices=LOSSES, default=d.loss, help="pixel loss to the teacher image")
    p.add_argument("--huber_delta", type=float, default=d.huber_delta, help="Huber transition point")
    p.add_argument("--perceptual_weight", type=float, default=d.perceptual_weight,
                   help="weight of a feature-matching loss in the project classifier's feature space (0: off)")
    p.add_argument("--classifier", default=d.classifier,
                   help="classifier for the perceptual and class terms, the per-epoch val FD and the evaluation "
                        "(never the audit classifier, which only judges)")
    p.add_argument("--class_weight", type=float, default=d.class_weight,
                   help="weight of a cross-entropy term: --classifier on the student's image against the class it "
                        "gives the teacher's image of the same noise (0: off)")
    p.add_argument("--adv_weight", type=float, default=d.adv_weight,
                   help="weight of the adversarial hinge term from a spectrally normalised discriminator (0: off, "
                        "regression only); with it on, best_model.pt is chosen by val FD instead of val loss")
    p.add_argument("--adv_start_epoch", type=int, default=d.adv_start_epoch,
                   help="with --adv_weight: epochs of regression alone (pixel + perceptual) before the adversarial "
                        "phase, in which the adversarial and class terms join (0: every term from the first step, "
                        "for a continued student; README 'Bring your own teacher' gives the recipe from a teacher)")
    p.add_argument("--adv_lr", type=float, default=d.adv_lr,
                   help="peak learning rate of the adversarial phase, which restarts its warm-up + cosine (default: "
                        "--lr; used only with --adv_start_epoch > 0)")
    p.add_argument("--adv_perceptual_weight", type=float, default=d.adv_perceptual_weight,
                   help="the perceptual term's weight in the adversarial phase (default: --perceptual_weight)")
    p.add_argument("--disc_warmup_steps", type=int, default=d.disc_warmup_steps,
                   help="first steps of the adversarial phase in which the discriminator learns alone, before its "
                        "gradient reaches the student")
    p.add_argument("--adv_real", choices=ADV_REAL, default=d.adv_real,
                   help="the discriminator's real images: --adv_dataset digits, the teacher's training images, or both")
    p.add_argument("--adv_dataset", default=d.adv_dataset,
                   help="dataset of real images for the discriminator and the val FD (offline sources only unless "
                        "already downloaded)")
    p.add_argument("--fixed_adv_weight", dest="adv_adaptive", action="store_false",
                   help="use --adv_weight as it is; by default it is a share of the regression's gradient norm at the "
                        "decoder's last layer (adaptive, as in VQGAN), which needs no retuning across losses")
    p.add_argument("--disc_width", type=int, default=d.disc_width, help="discriminator width (channels of its first layer)")
    p.add_argument("--disc_lr", type=float, default=d.disc_lr, help="discriminator learning rate (Adam, betas 0, 0.99)")
    p.add_argument("--disc_shift", type=int, default=d.disc_shift,
                   help="max random translation in pixels of both real and fake discriminator inputs (0: none)")
    p.add_argument("--ema_decay", type=float, default=d.ema_decay, help="EMA decay per step (with warm-up)")
    p.add_argument("--bn_samples", type=int, default=d.bn_samples,
                   help="training latents over which the EMA model's BatchNorm statistics are recomputed before "
                        "each evaluation and save (0: keep the averaged running statistics)")
    p.add_argument("--grad_clip", type=float, default=d.grad_clip, help="max gradient norm")
    p.add_argument("--val_fraction", type=float, default=d.val_fraction, help="validation share, split fixed by seed")
    p.add_argument("--n_preview", type=int, default=d.n_preview, help="validation pairs in samples_epoch_XXX.png")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the split, data order and initialisation")
    p.add_argument("--skips", choices=SKIP_MODES, default=d.skips,
                   help="zero: the decoder reads only the bottleneck, so hooks there steer the whole image; keep: "
                        "the teacher's skip connections (closer to the teacher, but hooks barely steer)")
    p.add_argument("--global_context", choices=GLOBAL_CONTEXT, default=d.global_context,
                   help="attention: self-attention over the deepest features before the mid block, so one pass sees "
                        "the whole noise; added to an --init_from student as an identity that training then grows")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=d.precision,
                   help="GPU arithmetic (ignored on CPU, which always runs fp32)")
    p.add_argument("--init_from", metavar="CKPT", default=d.init_from,
                   help="start from this student checkpoint's weights and EMA under a new schedule (to train a "
                        "finished student longer or on new pairs from the same teacher); its architecture "
                        "overrides --skips; epochs so far are recorded as epochs_before (default: off)")
    p.add_argument("--init_from_other_teacher", action="store_true",
                   help="let --init_from be a student distilled from another teacher with the same architecture, "
                        "e.g. an earlier checkpoint of --ddpm_ckpt: a warm start for a retrained teacher, cheaper "
                        "than distilling from it; the earlier teacher's sha256 is recorded (default: off, such a "
                        "student is refused)")
    p.add_argument("--fresh_discriminator", action="store_true",
                   help="with --init_from and --adv_weight: start a new discriminator (default: off, the init "
                        "checkpoint's discriminator and its optimizer continue when it has one)")
    p.add_argument("--no_evaluate", dest="evaluate", action="store_false",
                   help="skip the evaluation (evaluation.json) at the end")
    p.add_argument("--evaluate_only", metavar="CKPT", default="",
                   help="no training: evaluate this student checkpoint (e.g. OUTPUT_DIR/best_model.pt) with "
                        "--ddpm_ckpt on the validation split of --data_path, write OUTPUT_DIR/evaluation.json "
                        "(default: off)")
    add_common(p, resume=True)
    return p


def main():
    args = build_parser().parse_args()
    opts = options_from_args(StudentTrainOptions, args)
    if args.evaluate_only:
        evaluate_only(opts, args.evaluate_only, dry_run=args.dry_run)
    else:
        train_student(opts, resume=args.resume, dry_run=args.dry_run)


if __name__ == "__main__":
    run_cli(main)
