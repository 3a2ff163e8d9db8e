"""``vasctl status``: a summary of the cluster as the local agent's coordinator sees it."""
from __future__ import annotations

import argparse

from vas.cli import printers
from vas.cli.main import add_node_option, add_output_option, connect, examples


def register(nouns: argparse._SubParsersAction) -> None:
    p = nouns.add_parser("status", help="show a summary of the cluster",
                         description="Show etcd, nodes, segment and space totals.",
                         epilog=examples("vasctl status", "vasctl status -o json"))
    add_output_option(p)
    add_node_option(p)
    p.set_defaults(func=status)


def status(args) -> int:
    with connect(args) as client:
        summary = client.status()
    printers.print_status(summary, args.output)
    return 0
