"""``vasctl node``: list the node agents (``ls``), forget a down one (``rm``), or run one
(``serve``, in daemons.py)."""
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

    p = verbs.add_parser("ls", help="list node agents (live and down) with their sockets and "
                                    "memory",
                         epilog=examples("vasctl node ls -o json", "vasctl node ls --watch"))
    add_output_option(p)
    add_watch_option(p)
    add_node_option(p)
    p.set_defaults(func=ls)

    p = verbs.add_parser("rm", help="forget a down node (root only)",
                         description="Forget a node whose lease lapsed (state down): it is "
                                     "no longer listed, and the segments homed on it are "
                                     "marked lost. A live node is refused unless --force.",
                         epilog=examples("vasctl node rm node2", "vasctl node rm node2 --force"))
    p.add_argument("node_id", metavar="NODE")
    p.add_argument("--force", action="store_true",
                   help="also remove a live node (revokes its lease; a running agent "
                        "registers again at its next heartbeat)")
    add_node_option(p)
    p.set_defaults(func=rm)

    daemons.add_node_serve(verbs)


def ls(args) -> int:
    def render(nodes, out):
        printers.print_nodes(nodes, args.output, out)

    with connect(args) as client:
        def fetch():
            return client.nodes(include_down=True)

        if args.watch:
            watch.follow(fetch, render)
        else:
            render(fetch(), sys.stdout)
    return 0


def rm(args) -> int:
    with connect(args) as client:
        client.remove_node(args.node_id, force=args.force)
    return 0
