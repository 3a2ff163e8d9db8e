"""``vasctl space``: named sets of segments attached together at their fixed addresses."""
from __future__ import annotations

import argparse

from vas.cli import printers
from vas.cli.main import add_node_option, add_output_option, connect, mode_type


def register(nouns: argparse._SubParsersAction) -> None:
    space = nouns.add_parser("space", help="manage address spaces (sets of segments)",
                             description="Manage address spaces: named sets of segments.")
    verbs = space.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("create", help="create an empty space")
    p.add_argument("name")
    p.add_argument("--mode", type=mode_type, default=0o600, help="octal permission bits (default 600)")
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=create)

    p = verbs.add_parser("ls", help="list spaces and their members")
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX", help="only names starting with this")
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=ls)

    p = verbs.add_parser("add", help="add a segment to a space")
    p.add_argument("space")
    p.add_argument("segment")
    p.add_argument("--mode", choices=("r", "rw"), default="r",
                   help="attach mode used when switching into the space (default r)")
    add_node_option(p)
    p.set_defaults(func=add)

    p = verbs.add_parser("rm", help="remove a member from a space, or the space itself")
    p.add_argument("space")
    p.add_argument("segment", nargs="?", default=None,
                   help="the member to remove; without it the space is deleted (members stay)")
    add_node_option(p)
    p.set_defaults(func=rm)


def create(args) -> int:
    with connect(args) as client:
        info = client.create_space(args.name, mode=args.mode)
    printers.print_spaces([info], args.output)
    return 0


def ls(args) -> int:
    with connect(args) as client:
        spaces = client.list_spaces(args.prefix)
    printers.print_spaces(spaces, args.output)
    return 0


def add(args) -> int:
    with connect(args) as client:
        client.space_add(args.space, args.segment, args.mode)
    return 0


def rm(args) -> int:
    with connect(args) as client:
        if args.segment is None:
            client.delete_space(args.space)
        else:
            client.space_remove(args.space, args.segment)
    return 0
