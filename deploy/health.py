#!/usr/bin/env python3
"""vas-health: one grpc.health.v1 Check of a vas daemon, for container health checks.

    vas-health HOST:PORT [--server coordinator|node] [--timeout SECONDS]

Exit 0 when the daemon answers SERVING, 1 otherwise (the reason on one stderr line).

Why it exists: the kubelet's own gRPC probe and compose's health checks cannot present a
client certificate, and a daemon under mutual TLS refuses a peer without one before it
reads a request. With $VAS_TLS_CERT, $VAS_TLS_KEY and $VAS_TLS_CA set (the daemon's own
files will do: its certificate is also a client certificate) the check runs over mutual
TLS and verifies the server as ``--server`` names it (``coordinator.vas`` or ``node.vas``);
without them it is plaintext. The container image installs it as /usr/local/bin/vas-health.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vas.core.errors import InvalidArgument
from vas.core.tls import COORDINATOR_HOST, FLAGS, NODE_HOST, TlsConfig, open_channel

SERVER_NAMES = {"coordinator": COORDINATOR_HOST, "node": NODE_HOST}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vas-health", description=__doc__.split("\n")[0])
    parser.add_argument("address", metavar="HOST:PORT", help="the daemon's gRPC address")
    parser.add_argument("--server", choices=sorted(SERVER_NAMES), default="node",
                        help="which daemon answers, for its TLS name (default node)")
    parser.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="deadline of the check (default 3)")
    args = parser.parse_args(argv)
    try:
        tls = TlsConfig.load(*(os.environ.get(env) for _, env in FLAGS))
    except InvalidArgument as exc:
        print(f"vas-health: {exc}", file=sys.stderr)
        return 1
    with open_channel(args.address, tls, SERVER_NAMES[args.server]) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"vas-health: {args.address}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"vas-health: {args.address} is "
              f"{health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
