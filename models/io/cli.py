"""Flags every stage shares, so each script spells them the same way."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields


def add_cpu_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")


def add_common(parser: argparse.ArgumentParser, resume: bool = False) -> None:
    add_cpu_flag(parser)
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="resolve and print the configuration, check the inputs, and exit without work")
    if resume:
        parser.add_argument("--resume", action="store_true",
                            help="continue from the latest checkpoint in the output directory")


def options_from_args(cls, args: argparse.Namespace):
    values = vars(args)
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for on/off flags, where "(default: True)" on --no_x would mislead, and
    where the help already words its default (an empty path reads better as "off")."""

    def _get_help_string(self, action):
        if action.nargs == 0 or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every option's default in --help, and usage errors as one line with exit code 1.

    Exit code 2 is kept for a missing model or dataset (the fix is to fetch or train it); a mistyped flag is an
    ordinary bad input.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)
