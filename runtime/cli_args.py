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


SEED_LIMIT = 2 ** 63        # numpy's and torch's generators take whole numbers from 0 below this


def seed_value(text: str) -> int:
    """A --seed: a whole number from 0 (numpy's generators take no negative seed; torch's none past 2**63 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value}: a seed is a whole number from 0 to 2**63 - 1")
    return value


def results_dir(out: Path, option: str = "--out") -> Path:
    """An output directory that exists and takes files (checked before minutes of work, not after), or a ConfigError
    naming it."""
    from edgeact.runtime.errors import ConfigError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {out}: a file, not a directory; give a directory for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".edgeact-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{option} {out}: cannot write there ({exc.strerror or exc}); give a writable directory") \
            from None
    return out


def writable_file(path: Path, option: str) -> Path:
    """An output file whose folder exists and takes files, checked before the work (results_dir's probe)."""
    from edgeact.runtime.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file path (e.g. {path / 'results.json'})")
    results_dir(path.parent, f"{option} {path}: its folder")
    return path


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
