"""``serve(config)``: run one node agent until SIGTERM/SIGINT.

Start-up order: lock the ``--data-dir`` when given (node/datadir.py), bind the
gRPC port (the default node id needs the real port; with a data dir the id kept
there wins), verify the segments the data dir holds, the metrics listener when
asked (node/metrics.py), bind the local socket, register with the coordinator
(retrying until it answers; the data dir's segments whose records still name
them are adopted first and told as held), start the background threads, accept
local connections, report SERVING on grpc.health.v1 and print the ready line.

Shutdown (SIGTERM/SIGINT) runs in the reverse spirit: health NOT_SERVING, stop
accepting local connections, stop the background threads, deregister (the node
record and its attachment reports vanish at once), close every local connection
(their writer locks are released as at EOF), stop the gRPC server with a grace
period and the bulk listener, free the segments (the files of a data dir stay), remove
the socket file and close the metrics listener. The process exits 0.
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from vas.core import validate
from vas.core.defaults import MAX_CONCURRENT_RPCS
from vas.core.errors import InvalidArgument, PermissionDenied
from vas.core.identity import PeerKind, peer_of_pem
from vas.core.logs import setup_default_logging
from vas.core.metrics import MetricsServer, RpcMetrics, start_metrics_server
from vas.core.reflection import enable_reflection
from vas.core.signals import setting
from vas.core.sizes import human_size
from vas.core.tls import TlsConfig, add_port, check_listen
from vas.node.agent import Agent
from vas.node.bulk import BulkServer
from vas.node.clients import CHANNEL_OPTIONS
from vas.node.config import NodeConfig
from vas.node.datadir import DataDir, DataDirError
from vas.node.local import LocalServer
from vas.node.localapi import LocalApi
from vas.node.metrics import HeldCollector
from vas.node.service import NodeServicer
from vas.proto import node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)

_NODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["Node"].full_name
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def split_host_port(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; InvalidArgument if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"invalid address {address!r}: expected HOST:PORT")
    return host, int(port)


class NodeServer:
    """One agent's gRPC server, local socket server and ``Agent``, started and stopped together."""

    def __init__(self, config: NodeConfig):
        if config.memory < 0:
            raise InvalidArgument(f"invalid memory {config.memory}: must be >= 0 bytes")
        for name, ttl in (("node ttl (--node-ttl)", config.heartbeat_ttl),
                          ("writer ttl (--writer-ttl)", config.writer_ttl),
                          ("fault timeout (--fault-timeout)", config.fault_timeout),
                          ("rpc timeout (--rpc-timeout)", config.rpc_timeout)):
            validate.check_seconds(ttl, name, minimum=1)
        for flag, value in (("--local-workers", config.local_workers),
                            ("--max-connections-per-uid", config.max_connections_per_uid),
                            ("--max-attachments-per-uid", config.max_attachments_per_uid),
                            ("--max-faults-per-uid", config.max_faults_per_uid),
                            ("--max-requests-per-uid", config.requests_per_uid()),
                            ("--max-bulk-per-peer", config.max_bulk_per_peer),
                            ("--max-streams-per-peer", config.max_streams_per_peer)):
            if value < 1:
                raise InvalidArgument(f"invalid {flag} {value}: must be >= 1")
        if config.relay_fanout < 0:
            raise InvalidArgument(f"invalid --relay-fanout {config.relay_fanout}: must be >= 0")
        self.config = config
        self.address = ""       # host:port the gRPC server listens on (real port)
        self.agent: Agent | None = None
        self.local: LocalServer | None = None
        self.bulk: BulkServer | None = None
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.metrics: MetricsServer | None = None
        self._grpc: grpc.Server | None = None
        # Locked now (one agent per directory), before anything is bound.
        self.data_dir = DataDir.open(config.data_dir) if config.data_dir else None

    def start(self, stop: threading.Event) -> bool:
        """Start everything; False if ``stop`` was set while waiting for the coordinator."""
        config = self.config
        _raise_fd_limit()
        host, _ = split_host_port(config.listen)
        if config.advertise:
            try:
                advertised_host, _ = split_host_port(config.advertise)
            except InvalidArgument as exc:
                raise InvalidArgument(f"--advertise: {exc}") from exc
            if advertised_host.strip("[]") in _WILDCARDS:
                raise InvalidArgument(f"invalid --advertise {config.advertise}: other agents "
                                      "cannot dial a wildcard host; name this machine")
        if not 0 <= config.bulk_port <= 65535:
            raise InvalidArgument(f"invalid --bulk-port {config.bulk_port}: "
                                  "must be 0 (pick one) to 65535")
        check_listen(config.listen, config.tls, config.insecure)
        certified = own_node_id(config.tls)
        if config.node_id and certified and config.node_id != certified:
            raise InvalidArgument(f"--id {config.node_id} differs from the node its certificate "
                                  f"{config.tls.cert} names ({certified})")
        self._grpc = grpc.server(ThreadPoolExecutor(max_workers=8,
                                                    thread_name_prefix="vas-node-grpc"),
                                 options=CHANNEL_OPTIONS,
                                 maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
                                 interceptors=(RpcMetrics(),))
        try:
            port = add_port(self._grpc, config.listen, config.tls)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {config.listen}: {exc}") from exc
        if not port:
            raise OSError(f"cannot listen on {config.listen}")
        self.address = f"{host}:{port}"
        node_id = config.node_id or certified
        if self.data_dir is not None:  # the id its segments are homed on, kept there
            node_id = self.data_dir.node_id(node_id, f"{socket.gethostname()}:{port}")
        node_id = node_id or f"{socket.gethostname()}:{port}"
        advertise = config.advertise or (
            f"{socket.gethostname()}:{port}" if host in _WILDCARDS else self.address)

        self.agent = Agent(config, node_id, advertise, os.path.abspath(config.socket),
                           data_dir=self.data_dir, found=self._found())
        # The bulk listener shares the gRPC host; its port (--bulk-port, else a free one)
        # is told per transfer (OpenBulk), on the advertised host.
        try:
            self.bulk = BulkServer(host, self.agent.bulk_source, config.rpc_timeout,
                                   config.tls.server_context() if config.tls else None,
                                   per_peer=config.max_bulk_per_peer,
                                   transfer=self.agent.pool.transfer, port=config.bulk_port,
                                   relay_source=self.agent.relay_source,
                                   write_sink=self.agent.bulk_write)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"cannot listen on {host}:{config.bulk_port} for the "
                                     f"bulk channel (--bulk-port): {reason}") from exc
        self.agent.bulk_address = f"{advertise.rpartition(':')[0]}:{self.bulk.port}"
        self.agent.replicas.copies.address = self.agent.bulk_address
        self.bulk.start()
        node_pb2_grpc.add_NodeServicer_to_server(
            NodeServicer(self.agent, config.max_streams_per_peer), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        enable_reflection((_NODE_SERVICE, health.SERVICE_NAME), self._grpc)
        for service in ("", _NODE_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._grpc.start()
        if config.metrics_port is not None:
            self.metrics = start_metrics_server(config.listen, config.metrics_port, config.tls,
                                                config.insecure, (HeldCollector(self.agent),))

        self.local = LocalServer(config.socket, LocalApi(self.agent),
                                 workers=config.local_workers,
                                 requests_per_uid=config.requests_per_uid(),
                                 connections_per_uid=config.max_connections_per_uid)
        self.local.bind()
        if not self.agent.register(stop):
            return False
        self.agent.start()
        self.local.start()
        for service in ("", _NODE_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("node %s serving gRPC on %s (advertised %s), bulk channel on %s:%d "
                 "(advertised %s), socket %s, memory %d bytes", node_id, self.address,
                 advertise, host, self.bulk.port, self.agent.bulk_address, self.local.path,
                 config.memory)
        return True

    def stop(self) -> None:
        """Graceful shutdown (see the module docstring); safe after a partial start."""
        self.health.enter_graceful_shutdown()
        if self.local is not None:
            self.local.stop_accepting()
        if self.agent is not None:
            self.agent.stop()
            self.agent.deregister()
        if self.local is not None:
            self.local.close_connections()
        if self._grpc is not None:
            self._grpc.stop(self.config.shutdown_grace).wait()
        if self.bulk is not None:
            self.bulk.close()
        if self.agent is not None:
            self.agent.free_all()
            self.agent.close()
        if self.data_dir is not None:
            self.data_dir.close()
        if self.local is not None:
            self.local.remove_socket_file()
        if self.metrics is not None:
            self.metrics.stop()
        log.info("node stopped")


    def _found(self) -> list:
        """The segments of the data dir, verified (none without one); DataDirError if
        they do not fit in ``--memory``."""
        if self.data_dir is None:
            return []
        found = self.data_dir.stored()
        held = sum(stored.memory.size for stored in found)
        if held > self.config.memory:
            for stored in found:
                stored.memory.close()
            raise DataDirError(f"--data-dir {self.data_dir.path} holds {len(found)} segments "
                               f"of {human_size(held)} in all, more than --memory "
                               f"{human_size(self.config.memory)}")
        return found


def own_node_id(tls: TlsConfig | None) -> str | None:
    """The node id this agent's certificate names; None without TLS. InvalidArgument if
    the certificate is not an agent's (``vas://node/<id>``)."""
    if tls is None:
        return None
    with open(tls.cert, "rb") as pem:
        try:
            peer = peer_of_pem(pem.read())
        except PermissionDenied as exc:
            raise InvalidArgument(f"--tls-cert {tls.cert}: {exc}") from exc
    if peer.kind is not PeerKind.NODE:
        raise InvalidArgument(f"--tls-cert {tls.cert} names {peer}, not a node "
                              "(an agent needs a vas://node/<id> certificate)")
    return peer.name


def _raise_fd_limit() -> None:
    """Each held segment keeps two fds and each client one: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)


def serve(config: NodeConfig, stop: threading.Event | None = None) -> None:
    """Run a node agent until SIGTERM or SIGINT (or ``stop`` is set), then shut down gracefully.

    Prints ``vas node NODE_ID listening on HOST:PORT socket PATH`` on stdout once
    registered and accepting local connections.

    :param config: the agent's configuration.
    :param stop: an event that ends the agent like SIGTERM (for embedding; the
        signal handlers are installed only in the main thread).
    :raises InvalidArgument: for a bad configuration (a plaintext non-loopback listen
        without ``insecure``; an ``--id`` other than the certificate's); its
        ``DataDirError`` for a ``data_dir`` that cannot be created, locked or
        written, holds another node's segments or more than ``memory``.
    :raises OSError: when the gRPC port, the metrics port or the socket path cannot be bound.

    Example::

        serve(NodeConfig(coordinator="127.0.0.1:7300", socket="/run/vas/node.sock"))
    """
    setup_default_logging()
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, setting(stop))
    node = NodeServer(config)
    try:
        if node.start(stop):
            print(f"vas node {node.agent.node_id} listening on {node.address} "
                  f"socket {node.local.path}", flush=True)
            while not stop.wait(1.0):
                pass
            log.info("shutting down")
    finally:
        node.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
