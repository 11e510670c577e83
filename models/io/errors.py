"""A failure the user can act on as one "error:" line and an exit code: PipelineError, MissingInputError, and
run_cli, which turns them (and Ctrl-C) into that line for every script."""
from __future__ import annotations

import sys
from typing import Any, Callable

EXIT_ERROR = 1
EXIT_MISSING = 2


class PipelineError(Exception):
    """A failure the user can act on: printed as one line, exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class MissingInputError(PipelineError):
    """A model or dataset that is not there (exit 2); the message names the fix."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_MISSING)


def require_extra(modules: tuple[str, ...], extra: str, make_target: str) -> None:
    """Fails fast, naming the install command, when an optional profile (requirements-EXTRA.txt) is not installed."""
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingInputError(f"this needs {', '.join(missing)} (the '{extra}' extra): run `make {make_target}`, or "
                                f"`pip install -r requirements-{extra}.txt`")


def run_cli(main: Callable[[], Any], resumable: bool = True) -> None:
    """Runs a script's main: a refused input is one "error:" line and its exit code, not a traceback.
    ``resumable=False`` (the benches) drops the hint that rerunning resumes."""
    try:
        main()
    except PipelineError as err:
        _close_progress_bars()
        if not getattr(err, "quiet", False):  # quiet: another torchrun rank printed the line (io/distributed.py)
            print(f"error: {err}", file=sys.stderr)
        _exit(err.exit_code)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted: rerun the same command to resume" if resumable else "interrupted", file=sys.stderr)
        _exit(130)
    _leave_process_group(0)


def _exit(code: int) -> None:
    _leave_process_group(code)
    sys.exit(code)


def _leave_process_group(code: int) -> None:
    """Under torchrun, ends the process here (io/distributed.py ``exit_process``); otherwise returns."""
    distributed = sys.modules.get(__package__ + ".distributed")  # never imported: no process group to leave
    if distributed is not None:
        distributed.exit_process(code)


def _close_progress_bars() -> None:
    """A bar the failure left open would be redrawn after the error line, splitting it; closed first."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
