"""The one entry point, `edgeact`, and its registry of sub-commands.

Each command module exposes `register(subparsers)` and imports its heavy dependencies
(torch, onnx, serial ...) inside the handler, so `edgeact --help` stays light on a robot.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands; each adds its own parsers.
COMMAND_MODULES = (
    "edgeact.export.commands",
    "edgeact.export.commands_export",
    "edgeact.export.commands_quantize",
    "edgeact.export.commands_depth",
    "edgeact.export.commands_train",
    "edgeact.export.commands_bench",
    "edgeact.drivers.commands",
    "edgeact.drivers.commands_sim",
    "edgeact.runtime.commands",
    "edgeact.runtime.commands_loop",
    "edgeact.runtime.commands_eval",
    "edgeact.runtime.commands_compare",
    "edgeact.calibration.commands",
)


class CommandError(Exception):
    """A failure the user can fix; printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeact",
        description="Export Action Reasoning Models to the edge and run them on a robot.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.handler(args)
    except KeyboardInterrupt as exc:
        from edgeact.runtime.errors import Terminated, interrupt_status

        print("interrupted", file=sys.stderr)
        return interrupt_status(isinstance(exc, Terminated))
    except Exception as exc:  # the boundary: turn errors into one clear line unless --verbose
        if args.verbose or not _is_user_error(exc):
            raise
        print(f"edgeact {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


def _is_user_error(exc: Exception) -> bool:
    from edgeact.runtime.errors import EdgeactError

    # A path the user gave that is taken, a file where a folder is needed, or not theirs to write: say it plainly.
    return isinstance(exc, (CommandError, EdgeactError, FileNotFoundError, FileExistsError, NotADirectoryError,
                            IsADirectoryError, PermissionError))


if __name__ == "__main__":
    sys.exit(main())
