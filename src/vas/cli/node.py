"""``vasctl node``: list the node agents (``ls``), forget a down one (``rm``), or run one
(``serve``, in daemons.py)."""
from __future__ import annotations

import argparse

from vas.cli import daemons, printers
from vas.cli.main import add_node_option, add_output_option, connect


def register(nouns: argparse._SubParsersAction) -> None:
    node = nouns.add_parser("node", help="list node agents, or run one",
                            description="List the cluster's node agents, or run one.")
    verbs = node.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("ls", help="list node agents (live and down) with their sockets and "
                                    "memory")
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=ls)

    p = verbs.add_parser("rm", help="forget a down node (root only)",
                         description="Forget a node whose lease lapsed (state down): it is "
                                     "no longer listed. A live node is refused unless --force.")
    p.add_argument("node_id", metavar="NODE")
    p.add_argument("--force", action="store_true",
                   help="also remove a live node (revokes its lease; a running agent "
                        "registers again at its next heartbeat)")
    add_node_option(p)
    p.set_defaults(func=rm)

    daemons.add_node_serve(verbs)


def ls(args) -> int:
    with connect(args) as client:
        nodes = client.nodes(include_down=True)
    printers.print_nodes(nodes, args.output)
    return 0


def rm(args) -> int:
    with connect(args) as client:
        client.remove_node(args.node_id, force=args.force)
    return 0
