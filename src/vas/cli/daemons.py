"""``vasctl coordinator serve`` and ``vasctl node serve``: flags and VAS_* variables -> configs.

This is the one place where daemon flags meet their environment-variable defaults (the
TLS files, global options of every command, are resolved by vas.cli.main.tls_config).
"""
from __future__ import annotations

import argparse
import os

from vas.core.defaults import (DEFAULT_BULK_PORT, DEFAULT_COORDINATOR_LISTEN,
                               DEFAULT_FAULT_TIMEOUT, DEFAULT_LOCAL_WORKERS, DEFAULT_RPC_TIMEOUT,
                               DEFAULT_MAX_ATTACHMENTS_PER_UID,
                               DEFAULT_MAX_BULK_PER_PEER, DEFAULT_MAX_CONNECTIONS_PER_UID,
                               DEFAULT_MAX_FAULTS_PER_UID, DEFAULT_MAX_STREAMS_PER_PEER,
                               DEFAULT_MEMORY, DEFAULT_NODE_LISTEN, DEFAULT_SOCKET,
                               DEFAULT_NODE_TTL, DEFAULT_RELAY_FANOUT,
                               DEFAULT_WORKERS_LEFT_TO_OTHERS, DEFAULT_WRITER_TTL)
from vas.core.errors import InvalidArgument
from vas.core.logs import DEFAULT_LOG_FORMAT, DEFAULT_LOG_LEVEL, LOG_FORMATS, LOG_LEVELS
from vas.core.sizes import format_size, parse_size


def register(nouns: argparse._SubParsersAction) -> None:
    from vas.cli.main import examples

    coordinator = nouns.add_parser("coordinator", help="run the coordinator service",
                                   epilog=examples("vasctl coordinator serve --etcd "
                                                   "http://127.0.0.1:2379"))
    verbs = coordinator.add_subparsers(dest="verb", metavar="VERB", required=True)
    serve = verbs.add_parser(
        "serve", help="serve the Coordinator gRPC API over an etcd cluster",
        epilog=examples("vasctl coordinator serve --etcd http://127.0.0.1:2379 "
                        "--listen 127.0.0.1:7300"))
    serve.add_argument("--etcd", default=os.environ.get("VAS_ETCD"),
                       help="etcd URL, e.g. http://127.0.0.1:2379 (default $VAS_ETCD)")
    serve.add_argument("--listen", default=os.environ.get("VAS_LISTEN", DEFAULT_COORDINATOR_LISTEN),
                       help="host:port to serve gRPC on; port 0 picks a free one "
                            f"(default $VAS_LISTEN or {DEFAULT_COORDINATOR_LISTEN})")
    _add_tls_serve_options(serve)
    for flag, env, what in (("--etcd-cert", "VAS_ETCD_CERT", "client certificate"),
                            ("--etcd-key", "VAS_ETCD_KEY", "its private key"),
                            ("--etcd-ca", "VAS_ETCD_CA", "CA of etcd's certificate")):
        serve.add_argument(flag, metavar="FILE", default=os.environ.get(env),
                           help=f"for an https:// etcd: {what} (PEM); all three or none; "
                                f"default ${env}, else the --tls-* files")
    add_metrics_option(serve)
    add_log_options(serve)
    serve.set_defaults(func=serve_coordinator)


def _add_tls_serve_options(serve: argparse.ArgumentParser) -> None:
    """The TLS flags (also global) and --insecure, of a daemon."""
    from vas.cli.main import add_tls_options

    add_tls_options(serve, here=True)
    serve.add_argument("--insecure", action="store_true",
                       default=os.environ.get("VAS_INSECURE") == "1",
                       help="without TLS, listen on a non-loopback address anyway: whoever "
                            "reaches the port is trusted (default: refused; $VAS_INSECURE=1)")



def _port(text: str) -> int:
    """argparse type of a TCP port: 0..65535 (0 picks a free one)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: must be 0..65535")
    return port


def add_metrics_option(serve: argparse.ArgumentParser) -> None:
    """``--metrics-port N`` of a daemon (vas.core.metrics)."""
    default = os.environ.get("VAS_METRICS_PORT") or None
    serve.add_argument("--metrics-port", type=_port, metavar="N", default=default,
                       help="serve Prometheus metrics on http://HOST:N/metrics, HOST being "
                            "--listen's (with the TLS files: HTTPS requiring a client "
                            "certificate from the CA; without: loopback only unless "
                            "--insecure); 0 picks a free port (default $VAS_METRICS_PORT, "
                            "else none)")


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format`` of a daemon, and of ``vasctl up`` (which hands
    them to its daemons)."""
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=os.environ.get("VAS_LOG_LEVEL", DEFAULT_LOG_LEVEL).upper(),
                        help=f"least severe level logged (default $VAS_LOG_LEVEL or "
                             f"{DEFAULT_LOG_LEVEL})")
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        default=os.environ.get("VAS_LOG_FORMAT", DEFAULT_LOG_FORMAT),
                        help="text, or json: one object per line with time, level, logger, "
                             f"message and exception (default $VAS_LOG_FORMAT or "
                             f"{DEFAULT_LOG_FORMAT})")


def setup_logging(args: argparse.Namespace) -> None:
    """The process's logging, from --log-level and --log-format (UsageError for a bad
    $VAS_LOG_LEVEL or $VAS_LOG_FORMAT, which argparse does not check)."""
    from vas.cli.main import UsageError
    from vas.core import logs

    try:
        logs.setup_logging(args.log_level, args.log_format)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def add_node_serve(node_verbs: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the verbs of ``vasctl node`` (the noun itself lives in vas.cli.node)."""
    from vas.cli.main import examples

    serve = node_verbs.add_parser(
        "serve", help="run a node agent",
        epilog=examples("vasctl node serve --coordinator 127.0.0.1:7300 --memory 4GiB "
                        "--socket /run/vas/node.sock",
                        "vasctl node serve --coordinator coord1:7300 --listen 0.0.0.0:7400 "
                        "--advertise worker-17:7400 --bulk-port 7401 --tls-cert node.pem "
                        "--tls-key node-key.pem --tls-ca ca.pem"))
    serve.add_argument("--coordinator", default=os.environ.get("VAS_COORDINATOR"),
                       help="coordinator host:port (default $VAS_COORDINATOR)")
    serve.add_argument("--listen", default=os.environ.get("VAS_NODE_LISTEN", DEFAULT_NODE_LISTEN),
                       help="host:port for the Node gRPC service "
                            f"(default $VAS_NODE_LISTEN or {DEFAULT_NODE_LISTEN})")
    serve.add_argument("--advertise", metavar="HOST:PORT", default=os.environ.get("VAS_ADVERTISE"),
                       help="address other agents dial for this agent's gRPC port; its host "
                            "is also the bulk channel's (default $VAS_ADVERTISE, else the "
                            "--listen address, with this machine's hostname for a wildcard)")
    serve.add_argument("--bulk-port", type=int, metavar="PORT",
                       default=os.environ.get("VAS_BULK_PORT", str(DEFAULT_BULK_PORT)),
                       help="TCP port of the bulk channel (segment bytes between agents), on "
                            "the --listen host; 0 picks a free one "
                            f"(default $VAS_BULK_PORT or {DEFAULT_BULK_PORT})")
    serve.add_argument("--socket", default=os.environ.get("VAS_NODE", DEFAULT_SOCKET),
                       help=f"local Unix socket path (default $VAS_NODE or {DEFAULT_SOCKET})")
    serve.add_argument("--memory", type=parse_size,
                       default=os.environ.get("VAS_MEMORY", str(DEFAULT_MEMORY)),
                       help="segment memory capacity, e.g. 4GiB "
                            f"(default $VAS_MEMORY or {format_size(DEFAULT_MEMORY)})")
    serve.add_argument("--data-dir", default=os.environ.get("VAS_DATA_DIR"),
                       help="directory that keeps this node's segments in files (tmpfs, DAX or "
                            "disk) so that they survive an agent restart; created if missing "
                            "(default $VAS_DATA_DIR)")
    serve.add_argument("--id", dest="node_id", default=os.environ.get("VAS_NODE_ID"),
                       help="node id (default $VAS_NODE_ID or <hostname>:<grpc port>)")
    serve.add_argument("--writer-ttl", type=int, metavar="SECONDS",
                       default=os.environ.get("VAS_WRITER_TTL", str(DEFAULT_WRITER_TTL)),
                       help="lease of a writer lock: a writer silent this long loses it "
                            f"(default $VAS_WRITER_TTL or {DEFAULT_WRITER_TTL})")
    serve.add_argument("--node-ttl", type=int, metavar="SECONDS",
                       default=os.environ.get("VAS_NODE_TTL", str(DEFAULT_NODE_TTL)),
                       help="lease of this node's registration: it heartbeats every third "
                            "of it, and is listed down this long after it stops "
                            f"(default $VAS_NODE_TTL or {DEFAULT_NODE_TTL})")
    serve.add_argument("--fault-timeout", type=float, metavar="SECONDS",
                       default=os.environ.get("VAS_FAULT_TIMEOUT", str(DEFAULT_FAULT_TIMEOUT)),
                       help="longest wait of a page fault of a lazy mapping for a home that "
                            "fails to deliver its chunk; then the faulting thread gets SIGBUS "
                            f"(default $VAS_FAULT_TIMEOUT or {DEFAULT_FAULT_TIMEOUT:g})")
    serve.add_argument("--rpc-timeout", type=float, metavar="SECONDS",
                       default=os.environ.get("VAS_RPC_TIMEOUT", str(DEFAULT_RPC_TIMEOUT)),
                       help="deadline of one call this agent makes to the coordinator or "
                            "another agent (a remote writer's sync() waits this long for its "
                            f"home, plus its bytes' time; default $VAS_RPC_TIMEOUT or "
                            f"{DEFAULT_RPC_TIMEOUT:g})")
    _add_limits(serve)
    serve.add_argument("--relay-fanout", type=int, metavar="N",
                       default=os.environ.get("VAS_RELAY_FANOUT", str(DEFAULT_RELAY_FANOUT)),
                       help="agents fetching a copy of this node's segments serve it on to "
                            "at most N later fetchers each, so the home sends about one copy; "
                            "0: every fetcher pulls from this node (default $VAS_RELAY_FANOUT "
                            f"or {DEFAULT_RELAY_FANOUT})")
    _add_tls_serve_options(serve)
    add_metrics_option(serve)
    add_log_options(serve)
    serve.set_defaults(func=serve_node)


def _add_limits(serve: argparse.ArgumentParser) -> None:
    """The flags of the local worker pool, of the per-uid limits and of the per-peer
    limits (node/limits.py)."""
    serve.add_argument("--local-workers", type=int, metavar="N",
                       default=os.environ.get("VAS_LOCAL_WORKERS", str(DEFAULT_LOCAL_WORKERS)),
                       help="local requests served at once, by N + 1 threads shared by every "
                            f"connection (default $VAS_LOCAL_WORKERS or {DEFAULT_LOCAL_WORKERS})")
    serve.add_argument("--max-requests-per-uid", type=int, metavar="N",
                       default=os.environ.get("VAS_MAX_REQUESTS_PER_UID"),
                       help="local requests of one uid served at once; more wait their turn "
                            "(default $VAS_MAX_REQUESTS_PER_UID or --local-workers minus "
                            f"{DEFAULT_WORKERS_LEFT_TO_OTHERS}, at least 1)")
    for flag, variable, default, what in (
            ("--max-connections-per-uid", "VAS_MAX_CONNECTIONS_PER_UID",
             DEFAULT_MAX_CONNECTIONS_PER_UID, "local connections one uid may hold open"),
            ("--max-attachments-per-uid", "VAS_MAX_ATTACHMENTS_PER_UID",
             DEFAULT_MAX_ATTACHMENTS_PER_UID, "attachments one uid may hold"),
            ("--max-faults-per-uid", "VAS_MAX_FAULTS_PER_UID", DEFAULT_MAX_FAULTS_PER_UID,
             "userfaultfds of lazy attachments one uid may have the agent hold"),
            ("--max-bulk-per-peer", "VAS_MAX_BULK_PER_PEER", DEFAULT_MAX_BULK_PER_PEER,
             "bulk-channel connections one peer host may hold open at once"),
            ("--max-streams-per-peer", "VAS_MAX_STREAMS_PER_PEER",
             DEFAULT_MAX_STREAMS_PER_PEER,
             "ReadPages and WritePages streams one peer host may have open at once")):
        serve.add_argument(flag, type=int, metavar="N",
                           default=os.environ.get(variable, str(default)),
                           help=f"{what}; more are refused (default ${variable} or {default})")


def serve_coordinator(args: argparse.Namespace) -> int:
    from vas.cli.main import UsageError
    from vas.coordinator.config import CoordinatorConfig
    from vas.coordinator.server import serve

    if not args.etcd:
        raise UsageError("--etcd is required (or set $VAS_ETCD)")
    tls = _checked_tls(args)
    setup_logging(args)
    serve(CoordinatorConfig(etcd=args.etcd, listen=args.listen, tls=tls,
                            insecure=args.insecure, etcd_tls=_etcd_tls(args, tls),
                            metrics_port=args.metrics_port))
    _exit_after_shutdown()


def _checked_tls(args: argparse.Namespace):
    """The daemon's TlsConfig; UsageError (exit 2) for a plaintext non-loopback --listen
    without --insecure (serve checks it too, for callers that skip the CLI)."""
    from vas.cli.main import UsageError, tls_config
    from vas.core.tls import check_listen

    tls = tls_config(args)
    try:
        check_listen(args.listen, tls, args.insecure)
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from exc
    return tls


def _etcd_tls(args: argparse.Namespace, tls):
    """The etcd client TLS files: --etcd-cert/--etcd-key/--etcd-ca, else for an
    https:// etcd the --tls-* ones (one CA may sign both); None for http://."""
    from vas.cli.main import UsageError
    from vas.core.tls import TlsConfig

    flags = (("--etcd-cert", "VAS_ETCD_CERT"), ("--etcd-key", "VAS_ETCD_KEY"),
             ("--etcd-ca", "VAS_ETCD_CA"))
    try:
        own = TlsConfig.load(args.etcd_cert, args.etcd_key, args.etcd_ca, flags)
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from exc
    if own is not None or not args.etcd.strip().startswith("https://"):
        return own
    return tls


def serve_node(args: argparse.Namespace) -> int:
    from vas.cli.main import UsageError
    from vas.node.config import NodeConfig
    from vas.node.datadir import DataDirError
    from vas.node.server import serve

    if not args.coordinator:
        raise UsageError("--coordinator is required (or set $VAS_COORDINATOR)")
    tls = _checked_tls(args)
    setup_logging(args)
    config = NodeConfig(coordinator=args.coordinator, listen=args.listen, socket=args.socket,
                        advertise=args.advertise, bulk_port=args.bulk_port,
                        memory=args.memory, data_dir=args.data_dir, node_id=args.node_id,
                        writer_ttl=args.writer_ttl, heartbeat_ttl=args.node_ttl,
                        fault_timeout=args.fault_timeout, rpc_timeout=args.rpc_timeout,
                        local_workers=args.local_workers,
                        max_connections_per_uid=args.max_connections_per_uid,
                        max_attachments_per_uid=args.max_attachments_per_uid,
                        max_faults_per_uid=args.max_faults_per_uid,
                        max_requests_per_uid=args.max_requests_per_uid,
                        max_bulk_per_peer=args.max_bulk_per_peer,
                        max_streams_per_peer=args.max_streams_per_peer,
                        relay_fanout=args.relay_fanout,
                        tls=tls, insecure=args.insecure, metrics_port=args.metrics_port)
    try:
        serve(config)
    except DataDirError as exc:  # a directory it cannot use is bad usage (exit 2)
        raise UsageError(str(exc)) from exc
    _exit_after_shutdown()


def _exit_after_shutdown() -> None:
    """Exit 0 at once after a daemon's clean shutdown, skipping the interpreter's
    teardown: serve() has already stopped every thread, released every lease and freed
    every resource, and tearing down the modules of grpc, protobuf and the rest took
    another 0.2-0.5 s of a 2-CPU machine's time at every stop (tests stop hundreds)."""
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
