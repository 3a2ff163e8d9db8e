"""vasctl entry point: builds the argument parser from the noun modules and maps errors to exit codes.

Exit codes: 0 success, 1 error (a ``VasError`` or an OS error, printed as one line on
stderr), 2 bad usage (argparse, or an ``InvalidArgument`` raised while parsing flags),
130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from vas.errors import InvalidArgument, VasError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line usage detected after parsing (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    # Imported here so `vasctl --help` stays the only place that loads every noun.
    from vas.cli import daemons, node, seg, space, status, up

    parser = argparse.ArgumentParser(
        prog="vasctl",
        description="Operate a vas cluster: named, permissioned memory segments shared across machines.",
    )
    nouns = parser.add_subparsers(dest="noun", metavar="COMMAND", required=True)
    for module in (up, daemons, seg, space, node, status):
        module.register(nouns)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or EXIT_OK
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"vasctl: error: {exc}\n")
    except InvalidArgument as exc:
        print(f"vasctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if getattr(args, "_usage_phase", False) else EXIT_ERROR
    except VasError as exc:
        print(f"vasctl: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"vasctl: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
