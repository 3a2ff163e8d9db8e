"""``vasctl seg``: create, list, inspect, change, fill and dump segments."""
from __future__ import annotations

import argparse
import grp
import os
import pwd
import stat
import sys
import time

from vas.cli import printers
from vas.cli.main import (UsageError, add_node_option, add_output_option, connect, mode_type,
                          size_type)
from vas.core import fetch, validate
from vas.core.errors import InvalidArgument
from vas.core.sizes import format_size

#: Bytes moved per read/write call by put and get.
CHUNK = 8 << 20


def register(nouns: argparse._SubParsersAction) -> None:
    seg = nouns.add_parser("seg", help="manage segments", description="Manage segments.")
    verbs = seg.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("create", help="create a segment homed on the local node")
    p.add_argument("name")
    p.add_argument("--size", type=size_type, required=True,
                   help="bytes, e.g. 4096, 64KiB, 1GiB (rounded up to whole pages)")
    p.add_argument("--mode", type=mode_type, default=0o600, help="octal permission bits (default 600)")
    p.add_argument("--replicas", type=int, default=0,
                   help="replica copies on other nodes (default 0; not built yet: K > 0 is "
                        "refused as bad usage)")
    p.add_argument("--ttl", type=float, default=None, metavar="SECONDS",
                   help="remove the segment after this many seconds")
    p.add_argument("--exist-ok", action="store_true", help="succeed if the segment exists already")
    p.add_argument("--meta", action="append", default=[], type=meta_type, metavar="KEY=VALUE",
                   help="metadata kept in the record and shown by `seg stat` (repeatable)")
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=create)

    p = verbs.add_parser("ls", help="list segments")
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX", help="only names starting with this")
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=ls)

    p = verbs.add_parser("stat", help="show one segment")
    p.add_argument("name")
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=stat_)

    p = verbs.add_parser("rm", help="delete a segment (freed at its last detach)")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="revoke attachments at once")
    add_node_option(p)
    p.set_defaults(func=rm)

    p = verbs.add_parser("chmod", help="change a segment's mode")
    p.add_argument("name")
    p.add_argument("mode", type=mode_type, help="octal permission bits, e.g. 640")
    add_node_option(p)
    p.set_defaults(func=chmod)

    p = verbs.add_parser("chown", help="change a segment's owner and group")
    p.add_argument("name")
    p.add_argument("owner", type=owner_type, metavar="UID:GID", help="numbers or names, e.g. 1000:1000 or alice:staff")
    add_node_option(p)
    p.set_defaults(func=chown)

    p = verbs.add_parser("put", help="copy a file into a segment")
    p.add_argument("name")
    p.add_argument("file", metavar="FILE", help="file to copy in; - reads stdin")
    p.add_argument("--offset", type=size_type, default=0, help="byte offset in the segment (default 0)")
    add_node_option(p)
    p.set_defaults(func=put)

    p = verbs.add_parser("get", help="copy a segment's bytes out")
    p.add_argument("name")
    p.add_argument("--offset", type=size_type, default=0, help="byte offset in the segment (default 0)")
    p.add_argument("--length", type=size_type, default=None, help="bytes to copy (default: to the end)")
    p.add_argument("-o", "--output", metavar="FILE", default=None, help="output file (default stdout)")
    add_node_option(p)
    p.set_defaults(func=get)


def owner_type(text: str) -> tuple[int, int]:
    """argparse type for UID:GID, each a number or a user/group name."""
    user, sep, group = text.partition(":")
    if not sep or not user or not group:
        raise argparse.ArgumentTypeError(f"invalid owner {text!r}: expected UID:GID")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"invalid owner {text!r}: no user named {user!r}") from None
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"invalid owner {text!r}: no group named {group!r}") from None
    return uid, gid


def meta_type(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--meta`` as a pair (the key and value are checked with the rest)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"invalid metadata {text!r}: expected KEY=VALUE")
    return key, value


def create(args) -> int:
    # Refuse bad values before reaching for the agent, so the message is about them.
    if args.replicas > 0:  # not built yet: bad usage (exit 2), nothing is created
        try:
            validate.check_no_replicas(args.replicas)
        except InvalidArgument as exc:
            raise UsageError(str(exc)) from exc
    validate.check_name(args.name)
    validate.check_size(args.size)
    meta = dict(args.meta)
    if len(meta) != len(args.meta):
        raise InvalidArgument("invalid metadata: a key is given twice")
    validate.check_meta(meta)
    with connect(args) as client:
        info = client.create(args.name, args.size, mode=args.mode, replicas=args.replicas,
                             ttl=args.ttl, exist_ok=args.exist_ok, meta=meta)
    printers.print_segments([info], args.output)
    return 0


def ls(args) -> int:
    with connect(args) as client:
        segments = client.list(args.prefix)
    printers.print_segments(segments, args.output)
    return 0


def stat_(args) -> int:
    validate.check_name(args.name)
    with connect(args) as client:
        info = client.stat(args.name)
        here = client.local_node.id
    # How an attach from this process would get the pages (fetch="lazy", fixed=False);
    # a lost or deleting segment cannot be attached at all.
    if info.state in ("lost", "deleting"):
        fetch_here = f"none (segment {info.state})"
    else:
        fetch_here = fetch.decide("lazy", home=info.home == here,
                                  support=fetch.probe_fault_support(fixed=False)).value
    printers.print_segment(info, args.output, fetch_here=fetch_here)
    return 0


def rm(args) -> int:
    validate.check_name(args.name)
    with connect(args) as client:
        client.delete(args.name, force=args.force)
    return 0


def chmod(args) -> int:
    validate.check_name(args.name)
    with connect(args) as client:
        client.chmod(args.name, args.mode)
    return 0


def chown(args) -> int:
    validate.check_name(args.name)
    uid, gid = args.owner
    with connect(args) as client:
        client.chown(args.name, uid, gid)
    return 0


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None, enabled: bool | None = None):
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            text = (f"\r{self.label} [{bar:<30}] {format_size(self.done)} / "
                    f"{format_size(self.total)} {frac:4.0%}")
        else:
            text = f"\r{self.label} {format_size(self.done)}"
        sys.stderr.write(text)
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()


def put(args) -> int:
    validate.check_name(args.name)
    from_stdin = args.file == "-"
    source = sys.stdin.buffer if from_stdin else open(args.file, "rb", buffering=0)
    try:
        st = os.fstat(source.fileno())
        known = st.st_size if stat.S_ISREG(st.st_mode) else None
        if known is not None and from_stdin:
            known -= source.seek(0, os.SEEK_CUR) if source.seekable() else 0
        label = "stdin" if from_stdin else args.file
        with connect(args) as client, client.attach(args.name, "rw") as mapping:
            if known is not None and args.offset + known > mapping.size:
                raise InvalidArgument(
                    f"{label} ({known} bytes) does not fit in segment {args.name} of "
                    f"{mapping.size} bytes at offset {args.offset}")
            if args.offset > mapping.size:
                raise InvalidArgument(
                    f"offset {args.offset} is outside segment {args.name} of {mapping.size} bytes")
            progress = Progress(f"put {args.name}", known)
            written = _copy_in(source, mapping, args.offset, label, progress)
            progress.finish()
            # Publish: from another node this is what carries the bytes to the home.
            mapping.sync(ranges=[(args.offset, written)])
    finally:
        if not from_stdin:
            source.close()
    return 0


def _copy_in(source, mapping, offset: int, label: str, progress: Progress) -> int:
    """Read ``source`` straight into the mapped pages from ``offset`` on; bytes copied."""
    buffer = mapping.buffer
    position = offset
    while True:
        room = mapping.size - position
        if room == 0:
            # Full: only fine if the input is exhausted too.
            if source.read(1):
                raise InvalidArgument(f"{label} does not fit in segment {mapping.name} of "
                                      f"{mapping.size} bytes at offset {offset}")
            return position - offset
        with buffer[position:position + min(CHUNK, room)] as target:
            n = source.readinto(target)
        if not n:
            return position - offset
        position += n
        progress.advance(n)


def get(args) -> int:
    validate.check_name(args.name)
    to_stdout = args.output in (None, "-")
    with connect(args) as client, client.attach(args.name, "r") as mapping:
        length = mapping.size - args.offset if args.length is None else args.length
        if args.offset > mapping.size or length < 0 or args.offset + length > mapping.size:
            raise InvalidArgument(
                f"range [{args.offset}, {args.offset + max(length, 0)}) is outside segment "
                f"{args.name} of {mapping.size} bytes")
        out = sys.stdout.buffer if to_stdout else open(args.output, "wb")
        # Draw progress only when it cannot mix with the data on the terminal.
        show = sys.stderr.isatty() and not (to_stdout and sys.stdout.isatty())
        progress = Progress(f"get {args.name}", length, enabled=show)
        try:
            buffer = mapping.buffer
            position, end = args.offset, args.offset + length
            while position < end:
                step = min(CHUNK, end - position)
                with buffer[position:position + step] as part:
                    out.write(part)
                position += step
                progress.advance(step)
            out.flush()
            progress.finish()
        finally:
            if not to_stdout:
                out.close()
    return 0
