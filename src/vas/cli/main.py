"""vasctl entry point: builds the argument parser from the noun modules and maps errors to exit codes.

Exit codes: 0 success, 1 error (a ``VasError`` or an OS error, printed as one line on
stderr), 2 bad usage (argparse, including a malformed segment or space name, or a
``UsageError`` raised by a command before it does anything), 130 interrupted.

Every command's help ends with examples (``examples``); ``vasctl completion`` turns the
parser built here into shell completion (completion.py).
"""
from __future__ import annotations

import argparse
import sys

from vas.core.defaults import DEFAULT_SOCKET
from vas.core.errors import InvalidArgument, VasError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line usage detected after parsing (exit code 2)."""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps a paragraph (a description) to the terminal but keeps text that has line
    breaks of its own as written: the examples, one command a line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2) and whose
    help keeps the examples' lines."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# -- argument types and options shared by the noun modules -----------------------

def examples(*commands: str) -> str:
    """The epilog of a command's help: an "Example(s):" section listing ``commands``."""
    title = "Example:" if len(commands) == 1 else "Examples:"
    return "\n  ".join((title, *commands))


def name_type(what: str):
    """argparse type for a segment or space name (``what``): a malformed one is a usage
    error, like any malformed argument."""
    from vas.core import validate

    def check(text: str) -> str:
        try:
            return validate.check_name(text, what)
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return check


def size_type(text: str) -> int:
    """argparse type for sizes: "4096", "64KiB", "1GiB" (bad text is a usage error)."""
    from vas.core.sizes import parse_size

    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def mode_type(text: str) -> int:
    """argparse type for permission bits written as octal digits: "640", "0640", "0o640"."""
    digits = text[2:] if text[:2].lower() == "0o" else text
    if not digits or len(digits) > 4 or any(c not in "01234567" for c in digits) \
            or int(digits, 8) > 0o777:
        raise argparse.ArgumentTypeError(
            f"invalid mode {text!r}: expected octal permission bits like 640 or 0640")
    return int(digits, 8)


def add_node_option(parser: argparse.ArgumentParser) -> None:
    """``--node PATH``: the agent socket a client command talks to."""
    parser.add_argument("--node", metavar="PATH", default=None,
                        help=f"the local agent's Unix socket (default $VAS_NODE, else {DEFAULT_SOCKET})")


def add_output_option(parser: argparse.ArgumentParser) -> None:
    """``-o table|json|yaml`` of listing commands (printers.py writes each)."""
    from vas.cli.printers import FORMATS

    parser.add_argument("-o", "--output", choices=FORMATS, default=FORMATS[0],
                        help=f"output format (default {FORMATS[0]})")


def add_watch_option(parser: argparse.ArgumentParser) -> None:
    """``-w/--watch`` of listings that can follow changes (watch.py)."""
    parser.add_argument("-w", "--watch", action="store_true",
                        help="keep running and print the listing again whenever it changes "
                             "(Ctrl-C stops)")


def add_tls_options(parser: argparse.ArgumentParser, *, here: bool = False) -> None:
    """``--tls-cert/--tls-key/--tls-ca``: mutual TLS on every TCP connection the command
    makes or serves. Global options; ``here`` repeats them on a subcommand (its values,
    when given there, win) so that ``vasctl node serve --tls-cert ...`` works too."""
    default = argparse.SUPPRESS if here else None
    for flag, env, what in (("--tls-cert", "VAS_TLS_CERT", "this process's certificate (PEM)"),
                            ("--tls-key", "VAS_TLS_KEY", "its private key (PEM)"),
                            ("--tls-ca", "VAS_TLS_CA", "the CA that signs every peer's "
                                                       "certificate (PEM)")):
        parser.add_argument(flag, metavar="FILE", default=default,
                            help=f"{what}; all three or none (default ${env})")


def tls_config(args: argparse.Namespace):
    """The TlsConfig of the TLS options (or $VAS_TLS_*), None without; UsageError when
    only some are given or a file cannot be used."""
    import os

    from vas.core.tls import FLAGS, TlsConfig

    paths = [getattr(args, flag[2:].replace("-", "_"), None) or os.environ.get(env)
             for flag, env in FLAGS]
    try:
        return TlsConfig.load(*paths)
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from exc


def connect(args: argparse.Namespace):
    """The client for a command's ``--node``."""
    import vas

    return vas.connect(getattr(args, "node", None))


def build_parser() -> argparse.ArgumentParser:
    # Imported here so `vasctl --help` stays the only place that loads every noun.
    import vas
    from vas.cli import completion, daemons, node, seg, space, status, up

    parser = Parser(
        prog="vasctl",
        # The global --tls-* options must not claim a subcommand's `--tls` as their prefix.
        allow_abbrev=False,
        description="Operate a vas cluster: named, permissioned memory segments shared across machines.",
        epilog=examples("vasctl up --nodes 2", "vasctl seg create frames/0 --size 64MiB",
                        "vasctl seg ls -o json"),
    )
    parser.add_argument("--version", action="version", version=f"vasctl {vas.__version__}")
    add_tls_options(parser)
    nouns = parser.add_subparsers(dest="noun", metavar="COMMAND", required=True)
    for module in (up, daemons, seg, space, node, status, completion):
        module.register(nouns)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "tls_options", True):  # checked by every command but `up`
            tls_config(args)
        return args.func(args) or EXIT_OK
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"vasctl: error: {exc}\n")
    except VasError as exc:
        print(f"vasctl: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader of our output went away (`vasctl seg ls | head`): no message.
        _silence_stdout()
        return EXIT_ERROR
    except OSError as exc:
        print(f"vasctl: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
