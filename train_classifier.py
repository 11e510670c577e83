"""Train the small MNIST classifier whose features score generated digits (Frechet distance, precision/recall)."""
import os
import shlex
import sys
from pathlib import Path

import torch

from models.io.cli import ArgumentParser, add_common
from models.io.device import pick_device
from models.io.errors import run_cli
from models.io.manifest import write_checkpoint_record
from models.nets.classifier import DEFAULT_PATH, train_classifier


def launch_command() -> str:
    """The command as typed, niceness included, so the manifest says how the file was made."""
    python = os.path.relpath(sys.executable)
    words = [python if not python.startswith("..") else "python", *sys.argv]
    niceness = os.nice(0)
    return (f"nice -n {niceness} " if niceness else "") + shlex.join(words)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU ({device.type}, {torch.get_num_threads()} torch threads)"


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="mnist5k", help="data source: mnist5k (bundled), fashion-mnist, mnist")
    p.add_argument("--epochs", type=int, default=12, help="passes over the training split")
    p.add_argument("--batch_size", type=int, default=64, help="images per optimizer step")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the train/held-out split and shifts")
    p.add_argument("--output_path", default=DEFAULT_PATH, help="checkpoint to write; a .json manifest goes beside it")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64],
                   help="conv widths, one per conv+pool stage (the audit classifier uses another architecture)")
    p.add_argument("--feature_dim", type=int, default=128, help="width of the feature layer (FD, perceptual term)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    add_common(p)
    args = p.parse_args()
    device = pick_device(args.cpu)
    summary = train_classifier(args.dataset, args.output_path, epochs=args.epochs, batch_size=args.batch_size,
                               seed=args.seed, device=device, threads=args.threads,
                               channels=tuple(args.channels), feature_dim=args.feature_dim,
                               dry_run=args.dry_run)
    if args.dry_run:
        return
    path = Path(args.output_path)
    write_checkpoint_record(path, {"val_accuracy": summary["val_accuracy"], "n_val": summary["config"]["n_val"],
                                   "command": launch_command(), "wall_s": round(summary["wall_s"], 1),
                                   "machine": machine(device), "config": summary["config"]})
    print(f"train_classifier: held-out accuracy {summary['val_accuracy']:.4f} "
          f"({summary['config']['n_val']} digits), {summary['wall_s']:.0f} s, wrote {path}")


if __name__ == "__main__":
    run_cli(main)
