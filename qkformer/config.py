"""Command line + YAML recipe -> one argparse namespace.

A recipe file (``configs/*.yml``) sets defaults; flags given on the command line override it.
Keys must be option names (``batch_size``, ``lr``, ...): an unknown key is an error, not ignored.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import yaml

__all__ = ["ConfigError", "parse_with_config", "run_cli"]

REPO = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    pass


def _coerce(action: argparse.Action, value):
    # YAML reads "1e-3" as a string; run such values through the option's own type.
    if action.type is not None and isinstance(value, str) and action.type is not str:
        return action.type(value)
    if action.type is not None and isinstance(value, list) and action.nargs in ("+", "*"):
        return [action.type(v) if isinstance(v, str) else v for v in value]
    return value


def resolve_config_path(path: str) -> Path:
    p = Path(path)
    for candidate in (p, REPO / p, REPO / "configs" / p, REPO / "configs" / f"{p}.yml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path} (looked in ., {REPO}, {REPO / 'configs'})")


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                      default_config: Optional[str] = None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=default_config)
    known, rest = pre.parse_known_args(argv)
    parser.add_argument("-c", "--config", default=default_config,
                        help="YAML recipe; command-line flags override its values")
    if known.config:
        path = resolve_config_path(known.config)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values")
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(set(data) - set(actions))
        if unknown:
            raise ConfigError(f"{path}: unknown config key(s) {unknown}; valid keys are the "
                              f"option names of --help, e.g. {sorted(actions)[:8]}")
        parser.set_defaults(**{k: _coerce(actions[k], v) for k, v in data.items()})
    return parser.parse_args(rest)


R = TypeVar("R")


def run_cli(body: Callable[[], R], from_command_line: bool) -> R:
    """Run a script body: user errors (bad config, missing data, wrong checkpoint) end a command
    line run with a one-line message instead of a traceback; called from Python they propagate.
    The process group, if any, is always torn down."""
    from .distributed import cleanup

    try:
        return body()
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if from_command_line:
            sys.exit(f"error: {e}")
        raise
    finally:
        cleanup()
