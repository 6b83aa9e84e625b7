"""Shared pieces of the sub-commands: typed argparse values and the console they print to."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def console(width: int = 160):
    """A rich console; piped output (tests, logs) gets a wide fixed width so paths and dims do not wrap."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else width, highlight=False)


def write_config_file(path: str | Path, data: dict, overwrite: bool) -> Path:
    """Write a robot config for `--write-config PATH` as JSON, refusing a path it cannot go to as it is: it must be
    named .json to load back (there is no TOML writer here), and an existing file is the user's own edits until
    --overwrite says not."""
    from edgeact.runtime.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--write-config {path} is a folder; give a file path (e.g. {path / 'robot.json'})")
    if path.suffix.lower() != ".json":
        raise ConfigError(f"--write-config {path}: the config is written as JSON; give a .json path "
                          f"(e.g. {path.with_suffix('.json')})")
    if path.exists() and not overwrite:
        raise ConfigError(f"--write-config {path}: already exists; pass --overwrite to replace it, or give another "
                          "path")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
