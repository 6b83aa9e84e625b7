"""Shared pieces of the sub-commands: typed argparse values and the console they print to."""
from __future__ import annotations

import argparse
import sys


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
