"""``vasctl node``: list the node agents (``ls``) or run one (``serve``, in daemons.py)."""
from __future__ import annotations

import argparse

from vas.cli import daemons, printers
from vas.cli.main import add_node_option, add_output_option, connect


def register(nouns: argparse._SubParsersAction) -> None:
    node = nouns.add_parser("node", help="list node agents, or run one",
                            description="List the cluster's node agents, or run one.")
    verbs = node.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("ls", help="list live node agents with their sockets and memory")
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=ls)

    daemons.add_node_serve(verbs)


def ls(args) -> int:
    with connect(args) as client:
        nodes = client.nodes()
    printers.print_nodes(nodes, args.output)
    return 0
