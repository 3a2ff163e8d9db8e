"""``vasctl seg``: create, list, inspect, change, fill and dump segments."""
from __future__ import annotations

import argparse
import grp
import os
import pwd
import stat
import sys

from vas.cli import printers, watch
from vas.cli.backend import is_admin
from vas.cli.main import (UsageError, add_node_option, add_output_option, add_watch_option,
                          connect, examples, mode_type, name_type, size_type)
from vas.cli.progress import Progress, show_progress
from vas.core import fetch, validate
from vas.core.errors import InvalidArgument
from vas.core.sizes import human_size

#: Bytes moved per read/write call by put and get.
CHUNK = 8 << 20


def register(nouns: argparse._SubParsersAction) -> None:
    seg = nouns.add_parser("seg", help="manage segments", description="Manage segments.",
                           epilog=examples("vasctl seg create frames/0 --size 64MiB --mode 640",
                                           "vasctl seg ls frames/"))
    verbs = seg.add_subparsers(dest="verb", metavar="VERB", required=True)
    segment_name = name_type("segment")

    p = verbs.add_parser("create", help="create a segment homed on the local node",
                         description="Create a segment homed on the local node and print it "
                                     "as `seg stat` does.",
                         epilog=examples("vasctl seg create frames/0 --size 64MiB --mode 640",
                                         "vasctl seg create cache --size 1GiB --ttl 3600 "
                                         "--meta codec=zstd -o json"))
    p.add_argument("name", type=segment_name)
    p.add_argument("--size", type=size_type, required=True,
                   help="bytes, e.g. 4096, 64KiB, 1GiB (rounded up to whole pages)")
    p.add_argument("--mode", type=mode_type, default=0o600, help="octal permission bits (default 600)")
    p.add_argument("--replicas", type=int, default=0,
                   help="backup copies kept on K other nodes: sync waits for them, one is "
                        "promoted if the home dies (default 0)")
    p.add_argument("--ttl", type=float, default=None, metavar="SECONDS",
                   help="remove the segment after this many seconds")
    p.add_argument("--exist-ok", action="store_true", help="succeed if the segment exists already")
    p.add_argument("--meta", action="append", default=[], type=meta_type, metavar="KEY=VALUE",
                   help="metadata kept in the record and shown by `seg stat` (repeatable)")
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=create)

    p = verbs.add_parser("ls", help="list segments",
                         epilog=examples("vasctl seg ls frames/", "vasctl seg ls -o json",
                                         "vasctl seg ls --watch"))
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX", help="only names starting with this")
    add_output_option(p)
    add_watch_option(p)
    add_node_option(p)
    p.set_defaults(func=ls)

    p = verbs.add_parser("stat", help="show one segment",
                         epilog=examples("vasctl seg stat frames/0 -o yaml"))
    p.add_argument("name", type=segment_name)
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=stat_)

    p = verbs.add_parser("rm", help="delete a segment (freed at its last detach)",
                         epilog=examples("vasctl seg rm frames/0"))
    p.add_argument("name", type=segment_name)
    p.add_argument("--force", action="store_true", help="revoke attachments at once")
    add_node_option(p)
    p.set_defaults(func=rm)

    p = verbs.add_parser("chmod", help="change a segment's mode",
                         epilog=examples("vasctl seg chmod frames/0 644"))
    p.add_argument("name", type=segment_name)
    p.add_argument("mode", type=mode_type, help="octal permission bits, e.g. 640")
    add_node_option(p)
    p.set_defaults(func=chmod)

    p = verbs.add_parser("chown", help="change a segment's owner and group",
                         epilog=examples("vasctl seg chown frames/0 alice:staff"))
    p.add_argument("name", type=segment_name)
    p.add_argument("owner", type=owner_type, metavar="UID:GID", help="numbers or names, e.g. 1000:1000 or alice:staff")
    add_node_option(p)
    p.set_defaults(func=chown)

    p = verbs.add_parser("put", help="copy a file into a segment",
                         epilog=examples("vasctl seg put frames/0 frame0.bin",
                                         "tar c data | vasctl seg put archive - --offset 4KiB"))
    p.add_argument("name", type=segment_name)
    p.add_argument("file", metavar="FILE", help="file to copy in; - reads stdin")
    p.add_argument("--offset", type=size_type, default=0, help="byte offset in the segment (default 0)")
    add_node_option(p)
    p.set_defaults(func=put)

    p = verbs.add_parser("get", help="copy a segment's bytes out",
                         epilog=examples("vasctl seg get frames/0 -o frame0.bin",
                                         "vasctl seg get frames/0 --length 16 -o - | xxd"))
    p.add_argument("name", type=segment_name)
    p.add_argument("--offset", type=size_type, default=0, help="byte offset in the segment (default 0)")
    p.add_argument("--length", type=size_type, default=None, help="bytes to copy (default: to the end)")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="output file; - is stdout (default stdout, unless it is a terminal)")
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
    try:
        validate.check_replicas(args.replicas)
    except InvalidArgument as exc:  # bad usage (exit 2), nothing is created
        raise UsageError(str(exc)) from exc
    validate.check_size(args.size)
    meta = dict(args.meta)
    if len(meta) != len(args.meta):
        raise InvalidArgument("invalid metadata: a key is given twice")
    validate.check_meta(meta)
    with connect(args, agent_only=True) as client:
        info = client.create(args.name, args.size, mode=args.mode, replicas=args.replicas,
                             ttl=args.ttl, exist_ok=args.exist_ok, meta=meta)
        printers.print_segment(info, args.output, fetch_here=fetch_here_of(client))
    return 0


def ls(args) -> int:
    with connect(args) as client:
        fetch_here = fetch_here_of(client)

        def render(segments, out):
            printers.print_segments(segments, args.output, out, fetch_here=fetch_here)

        if args.watch:
            watch.follow(lambda: client.list(args.prefix), render)
        else:
            render(client.list(args.prefix), sys.stdout)
    return 0


def stat_(args) -> int:
    with connect(args) as client:
        info = client.stat(args.name)
        printers.print_segment(info, args.output, fetch_here=fetch_here_of(client))
    return 0


def fetch_here_of(client) -> printers.FetchHere:
    """How an attach from this process would get a segment's pages (fetch="lazy",
    fixed=False), by the agent's own rule; a lost or deleting segment cannot be
    attached at all, nor any segment without a local agent (a command served by a
    coordinator)."""
    here = None if is_admin(client) else client.local_node.id
    support = fetch.probe_fault_support(fixed=False) if here is not None else None

    def fetch_here(info) -> str:
        if info.state in ("lost", "deleting"):
            return f"none (segment {info.state})"
        if here is None:
            return "none (no local agent)"
        return fetch.decide("lazy", home=info.home == here, support=support).value

    return fetch_here


def rm(args) -> int:
    with connect(args) as client:
        client.delete(args.name, force=args.force)
    return 0


def chmod(args) -> int:
    with connect(args) as client:
        client.chmod(args.name, args.mode)
    return 0


def chown(args) -> int:
    uid, gid = args.owner
    with connect(args) as client:
        client.chown(args.name, uid, gid)
    return 0


def put(args) -> int:
    from_stdin = args.file == "-"
    source = sys.stdin.buffer if from_stdin else open(args.file, "rb", buffering=0)
    try:
        st = os.fstat(source.fileno())
        known = st.st_size if stat.S_ISREG(st.st_mode) else None
        if known is not None and from_stdin:
            known -= source.seek(0, os.SEEK_CUR) if source.seekable() else 0
        label = "stdin" if from_stdin else args.file
        with connect(args) as client:
            if is_admin(client):
                from vas.cli import transfer  # gRPC streaming: loaded only when used
                transfer.put(client, args.name, source, args.offset, known, label)
            else:
                _put_mapped(client, args, source, known, label)
    finally:
        if not from_stdin:
            source.close()
    return 0


def _put_mapped(client, args, source, known: int | None, label: str) -> None:
    """put through the local agent: straight into an "rw" mapping, then sync."""
    with client.attach(args.name, "rw") as mapping:
        if known is not None and args.offset + known > mapping.size:
            raise InvalidArgument(
                f"{label} of {human_size(known)} does not fit in segment {args.name} of "
                f"{human_size(mapping.size)} at offset {args.offset}")
        if args.offset > mapping.size:
            raise InvalidArgument(f"offset {args.offset} is outside segment {args.name} "
                                  f"of {human_size(mapping.size)}")
        progress = Progress(f"put {args.name}", known)
        written = _copy_in(source, mapping, args.offset, label, progress)
        progress.finish()
        # Publish: from another node this is what carries the bytes to the home.
        mapping.sync(ranges=[(args.offset, written)])


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
                                      f"{human_size(mapping.size)} at offset {offset}")
            return position - offset
        with buffer[position:position + min(CHUNK, room)] as target:
            n = source.readinto(target)
        if not n:
            return position - offset
        position += n
        progress.advance(n)


def get(args) -> int:
    if args.output is None and sys.stdout.isatty():
        raise UsageError("refusing to write a segment's bytes to a terminal: give -o FILE, "
                         "or -o - to write them to stdout anyway")
    with connect(args) as client:
        if is_admin(client):
            from vas.cli import transfer  # gRPC streaming: loaded only when used
            transfer.get(client, args.name, args.offset, args.length, args.output)
        else:
            _get_mapped(client, args)
    return 0


def _get_mapped(client, args) -> None:
    """get through the local agent: straight out of an "r" mapping."""
    to_stdout = args.output in (None, "-")
    with client.attach(args.name, "r") as mapping:
        length = mapping.size - args.offset if args.length is None else args.length
        if args.offset > mapping.size or length < 0 or args.offset + length > mapping.size:
            raise InvalidArgument(
                f"range [{args.offset}, {args.offset + max(length, 0)}) is outside segment "
                f"{args.name} of {human_size(mapping.size)}")
        out = sys.stdout.buffer if to_stdout else open(args.output, "wb")
        progress = Progress(f"get {args.name}", length, enabled=show_progress(to_stdout))
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
