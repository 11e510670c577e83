"""Run the whole pipeline (generate -> train -> extract -> attribute) and write a report: the main job."""

from models.io.cli import ArgumentParser
from models.io.errors import run_cli
from models.io.paths import DEFAULT_CLASSIFIER, DEFAULT_TEACHER
from models.stages.pipeline import PRESETS, run_pipeline


def build_parser() -> ArgumentParser:
    """The command line (also read by serve.py to check a job's options before it starts)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="demo: minutes on a 2-core CPU, continuing the shipped student; demo_from_teacher: a new "
                   "student from the teacher alone, regression then the adversarial phase, on 2,000 pairs (under 20 "
                   "min); overnight: the same recipe on 12,000 pairs (hours on a CPU); full: 60,000 pairs for a GPU "
                   "(torchrun); a rerun continues where a stopped one ended; --dry-run prints the recipe")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher DDPM checkpoint")
    p.add_argument("--output_dir", default=None, help="where everything goes (default: the preset's name)")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="project MNIST classifier")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the plan and exit")
    return p


def main():
    a = build_parser().parse_args()
    run_pipeline(a.preset, a.output_dir or a.preset, a.teacher, a.cpu, a.dry_run, a.classifier)


if __name__ == "__main__":
    run_cli(main)
