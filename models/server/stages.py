"""A job's options -> the stage script's command line, checked by that script's own parser before anything starts.

Options are the script's flags without the dashes ({"n_samples": 100, "no_clip": true}). Paths must stay inside the
server's working directory; unset teacher / student / feature paths default to the pair the server serves.
"""
from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..io.errors import PipelineError
from ..io.paths import REPO_ROOT

STAGE_SCRIPTS = {"generate": "generate_training_data.py", "train": "train_direct_decoder.py",
                 "extract": "extract_reference_features.py", "attribute": "attribution_generation.py",
                 "pipeline": "run_pipeline.py"}
# Every free-text option of the stages is a file or directory, except these (a test keeps the two lists complete).
PATH_OPTIONS = {"ckpt", "ddpm_ckpt", "decoder_ckpt", "teacher", "data_path", "output_dir", "output_path",
                "ref_features_path", "classifier", "init_from", "evaluate_only"}
NOT_PATH_OPTIONS = {"adv_dataset", "hook_layer"}
SERVED_PATHS = {"ckpt": "teacher", "ddpm_ckpt": "teacher", "teacher": "teacher", "decoder_ckpt": "student",
                "ref_features_path": "features"}
REFUSED_OPTIONS = {"help"}


class JobOptionError(PipelineError):
    """A job option the stage would refuse, or a path outside the working directory: the request's fault (422)."""


@lru_cache(maxsize=None)
def _script_module(stage: str):
    path = REPO_ROOT / STAGE_SCRIPTS[stage]
    spec = importlib.util.spec_from_file_location(f"_stage_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_parser(stage: str):
    """The stage script's own ArgumentParser, whose usage errors raise JobOptionError instead of exiting."""
    if stage not in STAGE_SCRIPTS:
        raise JobOptionError(f"stage must be one of {sorted(STAGE_SCRIPTS)}, got {stage!r}")
    parser = _script_module(stage).build_parser()

    def refuse(message):
        raise JobOptionError(f"{stage}: {message}")
    parser.error = refuse
    return parser


def stage_options(stage: str) -> dict[str, Any]:
    """Option name (flag without dashes) -> argparse action, for every flag of the stage."""
    return {flag.lstrip("-"): action for action in stage_parser(stage)._actions for flag in action.option_strings
            if flag.lstrip("-") not in REFUSED_OPTIONS}


def confine(value: Any, workdir: Path, name: str) -> Path:
    """``value`` as an absolute path inside ``workdir``; '..', an absolute path elsewhere or a symlink that leads
    out are refused."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise JobOptionError(f"option {name} must be a non-empty path, got {value!r}")
    path = Path(value)
    if ".." in path.parts:
        raise JobOptionError(f"option {name}: '..' is not allowed in paths ({value})")
    root = workdir.resolve()
    resolved = (path if path.is_absolute() else root / path).resolve()
    if not resolved.is_relative_to(root):
        raise JobOptionError(f"option {name}: {value} is outside the server's working directory {root}")
    return resolved


def _flag_value(name: str, action, value: Any) -> list[str]:
    flag = f"--{name}"
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise JobOptionError(f"option {name} is an on/off flag: give true or false, got {value!r}")
        return [flag] if value else []
    values = value if isinstance(value, list) else [value]
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if isinstance(value, list) and not many:
        raise JobOptionError(f"option {name} takes one value, got a list")
    if not values or any(isinstance(v, (dict, list, bool)) or v is None for v in values):
        raise JobOptionError(f"option {name} needs {'values' if many else 'a value'} (numbers or text), "
                             f"got {value!r}")
    return [flag, *map(str, values)]


def build_command(stage: str, options: dict, workdir: Path, served: dict[str, str]) -> list[str]:
    """The full command line of a job; raises JobOptionError (422) for anything the stage would refuse."""
    known = stage_options(stage)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise JobOptionError(f"unknown option(s) for stage {stage}: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
    args: list[str] = []
    given = set()
    for name, value in options.items():
        action = known[name]
        given.add(action.dest)
        if action.dest in PATH_OPTIONS:
            value = ([str(confine(v, workdir, name)) for v in value] if isinstance(value, list)
                     else str(confine(value, workdir, name)))
        args += _flag_value(name, action, value)
    for dest, role in SERVED_PATHS.items():
        flags = [f for f, a in known.items() if a.dest == dest]
        if flags and dest not in given and served.get(role):
            args += [f"--{flags[0]}", str(served[role])]
    stage_parser(stage).parse_args(args)  # the stage's own checks: types, choices, required values
    return [sys.executable, str(REPO_ROOT / STAGE_SCRIPTS[stage]), *args]


def has_resume_flag(stage: str) -> bool:
    return "resume" in stage_options(stage)
