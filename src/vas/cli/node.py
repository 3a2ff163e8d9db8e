"""``vasctl node``: list the node agents (``ls``) or run one (``serve``, in daemons.py)."""
from __future__ import annotations

import argparse

import sys

from vas.cli import daemons, printers, watch
from vas.cli.main import add_node_option, add_output_option, add_watch_option, connect, examples


def register(nouns: argparse._SubParsersAction) -> None:
    node = nouns.add_parser("node", help="list node agents, or run one",
                            description="List the cluster's node agents, or run one.",
                            epilog=examples("vasctl node ls",
                                            "vasctl node serve --coordinator 127.0.0.1:7300"))
    verbs = node.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("ls", help="list live node agents with their sockets and memory",
                         epilog=examples("vasctl node ls -o json", "vasctl node ls --watch"))
    add_output_option(p)
    add_watch_option(p)
    add_node_option(p)
    p.set_defaults(func=ls)

    daemons.add_node_serve(verbs)


def ls(args) -> int:
    def render(nodes, out):
        printers.print_nodes(nodes, args.output, out)

    with connect(args) as client:
        if args.watch:
            watch.follow(client.nodes, render)
        else:
            render(client.nodes(), sys.stdout)
    return 0
