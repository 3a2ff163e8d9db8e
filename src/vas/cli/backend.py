"""Which backend serves a client command: the local agent, or a coordinator over gRPC.

The rule (docs/cli.md "The agent or the coordinator"), first match wins:

1. ``--coordinator ADDR`` on the command line (a global option, before the command):
   that coordinator, over gRPC (vas.admin); no agent is contacted. Given with
   ``--node`` it is a usage error (two answers to one question).
2. ``--node PATH`` on the command line: that agent, and only it.
3. Otherwise the agent at ``$VAS_NODE`` (else /run/vas/node.sock) when something
   listens there; when nothing does and ``$VAS_COORDINATOR`` is set, that
   coordinator over gRPC.

An agent that is reachable but fails a request is never bypassed: only "nothing
listens on the socket" falls back. ``seg create`` needs an agent (the segment's
memory is the creating agent's), so it refuses an explicit ``--coordinator``.

Over gRPC the command acts as the certificate of ``--tls-*`` names, or without
TLS (loopback clusters only) as the uid/gid of this process: vas/admin.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from vas.core.errors import Unavailable

#: The global option's destination (not "coordinator": ``node serve --coordinator``
#: is that daemon's own option).
DEST = "admin_coordinator"


def add_options(parser: argparse.ArgumentParser) -> None:
    """The global ``--coordinator HOST:PORT`` of client commands."""
    parser.add_argument("--coordinator", dest=DEST, metavar="HOST:PORT", default=None,
                        help="operate on the cluster through this coordinator over gRPC, "
                             "with no local agent (seg get/put stream from/to the segment's "
                             "home); default: the agent at --node/$VAS_NODE, else "
                             "$VAS_COORDINATOR when no agent listens there")


def check(args: argparse.Namespace, usage_error: type[Exception]) -> None:
    """``usage_error`` when the global --coordinator is given to a command that is not a
    client command (the daemons and ``up`` take no backend)."""
    if getattr(args, DEST, None) and not hasattr(args, "node"):
        raise usage_error(
            "the global --coordinator chooses where client commands (seg, space, node ls, "
            "status) are served; `vasctl node serve` takes its own --coordinator after "
            "the command")


def connect(args: argparse.Namespace, *, agent_only: bool = False):
    """The client a command runs on (the rule above): a ``vas.Client`` or a
    ``vas.admin.AdminClient``; both are context managers.

    :param agent_only: the command needs an agent (``seg create``).
    :raises UsageError: --coordinator with --node, or with an ``agent_only`` command.
    :raises Unavailable: neither the agent nor the coordinator can be reached.
    """
    import vas
    from vas.cli.main import UsageError

    explicit = getattr(args, DEST, None)
    node = getattr(args, "node", None)
    if explicit:
        if node:
            raise UsageError("--coordinator and --node name two ways to reach the cluster: "
                             "give one")
        if agent_only:
            raise UsageError(f"`vasctl {args.noun} {args.verb}` needs a node agent (the "
                             "segment's memory is the agent's that creates it): give --node "
                             "or $VAS_NODE, not --coordinator")
        return _admin(explicit, args)
    if node:
        return vas.connect(node)
    try:
        return vas.connect(None)
    except Unavailable as no_agent:
        fallback = os.environ.get("VAS_COORDINATOR")
        # Only "nothing listens there" falls back; a broken agent is reported.
        if agent_only or not fallback or not isinstance(no_agent.__cause__, OSError):
            raise
        try:
            return _admin(fallback, args)
        except Unavailable as no_coordinator:
            raise Unavailable(f"{no_agent}; and {no_coordinator}") from no_coordinator


def _admin(target: str, args: argparse.Namespace):
    from vas.admin import AdminClient
    from vas.cli.main import tls_config

    return AdminClient(target, tls_config(args))


def is_admin(client) -> bool:
    """Whether ``client`` (from ``connect``) talks to a coordinator over gRPC."""
    # Only _admin makes one, and it imports vas.admin: a command served by its local agent
    # must not import it (and grpc with it) to find out.
    admin = sys.modules.get("vas.admin")
    return admin is not None and isinstance(client, admin.AdminClient)
