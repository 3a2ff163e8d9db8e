"""``vasctl space``: named sets of segments attached together at their fixed addresses."""
from __future__ import annotations

import argparse

from vas.cli import printers
from vas.cli.main import add_node_option, add_output_option, connect, examples, mode_type, name_type


def register(nouns: argparse._SubParsersAction) -> None:
    space = nouns.add_parser("space", help="manage address spaces (sets of segments)",
                             description="Manage address spaces: named sets of segments.",
                             epilog=examples("vasctl space create model --mode 640",
                                             "vasctl space add model weights"))
    verbs = space.add_subparsers(dest="verb", metavar="VERB", required=True)
    space_name, segment_name = name_type("space"), name_type("segment")

    p = verbs.add_parser("create", help="create an empty space",
                         epilog=examples("vasctl space create model --mode 640"))
    p.add_argument("name", type=space_name)
    p.add_argument("--mode", type=mode_type, default=0o600, help="octal permission bits (default 600)")
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=create)

    p = verbs.add_parser("ls", help="list spaces and their members",
                         epilog=examples("vasctl space ls", "vasctl space ls model -o yaml"))
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX", help="only names starting with this")
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=ls)

    p = verbs.add_parser("add", help="add a segment to a space",
                         epilog=examples("vasctl space add model weights",
                                         "vasctl space add model cache --mode rw"))
    p.add_argument("space", type=space_name)
    p.add_argument("segment", type=segment_name)
    p.add_argument("--mode", choices=("r", "rw"), default="r",
                   help="attach mode used when switching into the space (default r)")
    add_node_option(p)
    p.set_defaults(func=add)

    p = verbs.add_parser("rm", help="remove a member from a space, or the space itself",
                         epilog=examples("vasctl space rm model cache", "vasctl space rm model"))
    p.add_argument("space", type=space_name)
    p.add_argument("segment", nargs="?", default=None, type=segment_name,
                   help="the member to remove; without it the space is deleted (members stay)")
    add_node_option(p)
    p.set_defaults(func=rm)


def create(args) -> int:
    with connect(args) as client:
        info = client.create_space(args.name, mode=args.mode)
    printers.print_space(info, args.output)
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
