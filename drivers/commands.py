"""Driver sub-commands (`edgeact motors ...`); pyserial / python-can are imported inside handlers."""
from __future__ import annotations


def register(subparsers) -> None:
    pass
