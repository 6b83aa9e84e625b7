"""Shared pieces of the sub-commands: typed argparse values and the console they print to."""
from __future__ import annotations

import argparse
import json
import os
import shutil
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


def json_output_path(path: str | Path, overwrite: bool, option: str, what: str, example: str) -> Path:
    """A JSON file an option writes (`option PATH`), refused where it cannot go as it is: a folder, a name other
    than .json (it would not load back; there is no TOML writer here), or an existing file (the user's own edits)
    without --overwrite."""
    from edgeact.runtime.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file path (e.g. {path / example})")
    if path.suffix.lower() != ".json":
        raise ConfigError(f"{option} {path}: the {what} is written as JSON; give a .json path "
                          f"(e.g. {path.with_suffix('.json')})")
    if path.exists() and not overwrite:
        raise ConfigError(f"{option} {path}: already exists; pass --overwrite to replace it, or give another path")
    return path


def write_json_file(path: Path, data: dict) -> None:
    """Whole or not at all (written aside, then renamed): a crash mid-write must not leave a truncated file. A
    symlink is written through (its target replaced, the link kept)."""
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def write_config_file(path: str | Path, data: dict, overwrite: bool) -> Path:
    """Write a robot config for `--write-config PATH` (json_output_path's rules)."""
    path = json_output_path(path, overwrite, "--write-config", "config", "robot.json")
    write_json_file(path, data)
    return path
