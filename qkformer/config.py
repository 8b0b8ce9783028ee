"""Command line + YAML recipe -> one argparse namespace.

A recipe sets defaults; flags given on the command line override it. ``--config`` takes a bundled
recipe by name (``cifar10``: package data ``qkformer/configs/cifar10.yml``, so it works from any
folder and from a regular install) or the path of a YAML file of your own. Keys must be option
names (``batch_size``, ``lr``, ...): an unknown key is an error, not ignored.
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, TypeVar

import yaml

__all__ = ["ConfigError", "OneLineErrorParser", "recipe_names", "resolve_config_path", "parse_with_config", "run_cli",
           "error_message"]

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

RECIPES = "configs"  # folder of the bundled recipes inside the package


class ConfigError(ValueError):
    pass


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad option (``--T 1.5``, an unknown flag) is one ``error:`` line (exit
    status 2, argparse's) instead of the usage text followed by the message."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _coerce(action: argparse.Action, value):
    # YAML reads "1e-3" as a string; run such values through the option's own type.
    if action.type is not None and isinstance(value, str) and action.type is not str:
        return action.type(value)
    if action.type is not None and isinstance(value, list) and action.nargs in ("+", "*"):
        return [action.type(v) if isinstance(v, str) else v for v in value]
    return value


def _recipes() -> Traversable:
    return resources.files(__package__).joinpath(RECIPES)


def recipe_names() -> List[str]:
    """Names of the bundled recipes (``cifar10``, ``imagenet``, ...)."""
    return sorted(e.name[:-len(".yml")] for e in _recipes().iterdir() if e.name.endswith(".yml"))


def resolve_config_path(path: str) -> Traversable:
    """A YAML file of the user's (``path`` as given, relative to the working directory), else the
    bundled recipe named ``path`` (with or without ``.yml``)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.name == str(path):  # a bare name (no folder part) may be a bundled recipe
        name = path if path.endswith((".yml", ".yaml")) else f"{path}.yml"
        bundled = _recipes().joinpath(name)
        if bundled.is_file():  # even where a folder of that name exists (the repo's cifar10/)
            return bundled
    if p.is_dir():
        raise ConfigError(f"--config {path} is a folder; give a YAML file or one of the recipes "
                          f"{recipe_names()}")
    raise ConfigError(f"config file not found: {path} (neither a file nor one of the bundled "
                      f"recipes {recipe_names()})")


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                      default_config: Optional[str] = None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=default_config)
    known, rest = pre.parse_known_args(argv)
    parser.add_argument("-c", "--config", default=default_config,
                        help=f"recipe: a bundled one ({', '.join(recipe_names())}) or a YAML "
                             f"file; command-line flags override its values")
    if known.config:
        path = resolve_config_path(known.config)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a valid YAML file ({' '.join(str(e).split())})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values")
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(set(data) - set(actions))
        if unknown:
            raise ConfigError(f"{path}: unknown config key(s) {unknown}; valid keys are the "
                              f"option names of --help, e.g. {sorted(actions)[:8]}")
        values = {}
        for k, v in data.items():
            try:
                values[k] = _coerce(actions[k], v)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path}: bad value for {k}: {v!r} ({e})") from e
        parser.set_defaults(**values)
    return parser.parse_args(rest)


R = TypeVar("R")


def run_cli(body: Callable[[], R], from_command_line: bool) -> R:
    """Run a script body: on the command line every warning is one line (``warning: ...``) and
    every error ends in one line, ``error: ...``, with exit status 1 (Ctrl-C: one line and 130;
    a preempted training run: its own status, see docs/long_runs.md); ``QKFORMER_TRACEBACK=1``
    shows the traceback instead. Called from Python, errors propagate. The process group, if
    any, is always torn down."""
    import os

    from .cli_warnings import one_line_warnings
    from .distributed import cleanup

    if from_command_line:
        one_line_warnings()
    try:
        return body()
    except KeyboardInterrupt:
        if from_command_line:
            print("error: interrupted (Ctrl-C)", file=sys.stderr)
            raise SystemExit(130) from None
        raise
    except Exception as e:  # ConfigError, OSError, TypeError from a misspelt key, RuntimeError ...
        if not from_command_line or os.environ.get("QKFORMER_TRACEBACK"):
            raise
        text = error_message(e)
        if not isinstance(e, (ValueError, OSError)):  # the kind says what failed; one line
            text = " ".join(f"{type(e).__name__}: {text}".split())
        sys.exit(f"error: {text}")
    finally:
        cleanup()


def error_message(e: BaseException) -> str:
    """The user-facing text of ``e``. An error raised in a DataLoader worker arrives re-raised
    with the worker's whole traceback as its message: keep only the original message."""
    text = str(e)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]  # "module.ErrorType: message"
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
