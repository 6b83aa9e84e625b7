"""Export-side sub-commands; torch is imported inside handlers only."""
from __future__ import annotations


def register(subparsers) -> None:
    pass
