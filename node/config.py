"""Configuration of a node agent: one dataclass, with the defaults as DEFAULT_* constants.

Flags and ``VAS_*`` environment variables are mapped onto it in one place
(src/vas/cli/daemons.py); tests build it directly and call ``vas.node.server.serve``.
"""
from __future__ import annotations

from dataclasses import dataclass

# Shared with the client, the CLI and the coordinator: defined once, in vas.core.defaults.
from vas.core.defaults import (DEFAULT_BULK_PORT, DEFAULT_FAULT_TIMEOUT, DEFAULT_LOCAL_WORKERS,
                               DEFAULT_MAX_ATTACHMENTS_PER_UID, DEFAULT_MAX_BULK_PER_PEER,
                               DEFAULT_MAX_CONNECTIONS_PER_UID, DEFAULT_MAX_FAULTS_PER_UID,
                               DEFAULT_MAX_STREAMS_PER_PEER, DEFAULT_MEMORY, DEFAULT_NODE_LISTEN,
                               DEFAULT_NODE_TTL, DEFAULT_RELAY_FANOUT, DEFAULT_RPC_TIMEOUT,
                               DEFAULT_SOCKET, DEFAULT_WORKERS_LEFT_TO_OTHERS,
                               DEFAULT_WRITER_TTL)
from vas.core.tls import TlsConfig

#: Seconds the agent gathers attachment changes before reporting them to the coordinator.
DEFAULT_REPORT_DELAY = 0.05
#: Parallel TCP connections of one replica fetch over the bulk channel.
DEFAULT_FETCH_STREAMS = 4
#: Seconds SIGTERM waits for in-flight gRPC calls before cancelling them.
DEFAULT_SHUTDOWN_GRACE = 5.0

@dataclass
class NodeConfig:
    """Everything ``serve`` needs to run one node agent.

    :param coordinator: host:port of a coordinator.
    :param listen: host:port for the Node gRPC service (port 0 = pick one).
    :param socket: path of the local Unix socket (parent directories are created;
        a stale socket file is replaced; mode 0666, access is checked per caller).
    :param memory: capacity for segment memory, bytes (sum of held segment sizes).
    :param data_dir: directory that keeps the home segments in files (tmpfs, DAX or
        disk), so that they survive an agent restart (node/datadir.py); created if
        missing, one agent at a time; None: memfds, gone with the agent.
    :param node_id: unique node id; default ``"<hostname>:<grpc port>"``, with TLS the
        name its certificate gives (``vas://node/<id>``), which ``node_id`` must match.
        With ``data_dir`` the id is kept there at the first start and later starts
        run as it (another ``node_id`` is refused).
    :param advertise: host:port other agents (and the coordinator's clients) use to
        reach this agent's gRPC port; default the listen address with the real port (the
        hostname when listening on a wildcard). Its host is also the host of the bulk
        channel's address that ``OpenBulk`` answers.
    :param bulk_port: TCP port of the bulk channel (node/bulk.py), on the host of
        ``listen``; 0 picks a free one. A firewall between agents must let both this
        port and the gRPC port through; it is advertised unchanged (a port mapping in
        between must keep the number).
    :param heartbeat_ttl: node lease TTL, seconds.
    :param writer_ttl: writer-lock lease TTL, seconds.
    :param report_delay: attachment-report debounce, seconds.
    :param rpc_timeout: deadline of one outgoing unary gRPC call, seconds.
    :param shutdown_grace: grace period of the gRPC server stop on SIGTERM, seconds.
    :param fetch_streams: TCP connections per replica fetch (bulk channel).
    :param fault_timeout: seconds a page fault of a lazy mapping may wait for its
        chunk while the home fails to deliver it; then the faulting thread gets
        SIGBUS (at once when the home's bytes are known to be gone).
    :param local_workers: threads serving local requests, shared by all connections.
    :param max_connections_per_uid: local connections one uid may hold open at once.
    :param max_attachments_per_uid: attachments one uid may hold at once (all connections).
    :param max_faults_per_uid: userfaultfd registrations (RegisterFaults) one uid may
        have the agent hold at once.
    :param max_requests_per_uid: requests of one uid served at once (more wait their
        turn, in order, without an error); None: ``local_workers`` minus
        ``DEFAULT_WORKERS_LEFT_TO_OTHERS`` (at least 1), so one uid always leaves
        workers to the others (``requests_per_uid()``).
    :param max_bulk_per_peer: bulk connections one peer host may hold open at once.
    :param max_streams_per_peer: ReadPages and WritePages streams one peer host may
        have open at once.
    :param relay_fanout: agents one fetcher of this node's segments serves them on to
        (node/relay.py: the home sends one copy, each relay at most this many); 0: every
        fetcher pulls from the home.
    :param tls: mutual TLS of the gRPC port, the bulk channel and every channel this
        agent opens (its certificate must be an agent's); None: plaintext, loopback only
        unless ``insecure``.
    :param insecure: allow a plaintext non-loopback ``listen`` (and metrics listener).
    :param metrics_port: serve Prometheus metrics on ``/metrics`` at this port of the
        ``listen`` host (0: a free one); None: no metrics listener. With ``tls`` it is
        HTTPS requiring a client certificate from the CA (vas.core.metrics).

    Example::

        serve(NodeConfig(coordinator="127.0.0.1:7300", socket="/tmp/n1.sock", memory=1 << 30))
    """

    coordinator: str
    listen: str = DEFAULT_NODE_LISTEN
    socket: str = DEFAULT_SOCKET
    memory: int = DEFAULT_MEMORY
    data_dir: str | None = None
    node_id: str | None = None
    advertise: str | None = None
    bulk_port: int = DEFAULT_BULK_PORT
    heartbeat_ttl: int = DEFAULT_NODE_TTL
    writer_ttl: int = DEFAULT_WRITER_TTL
    report_delay: float = DEFAULT_REPORT_DELAY
    rpc_timeout: float = DEFAULT_RPC_TIMEOUT
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    fetch_streams: int = DEFAULT_FETCH_STREAMS
    fault_timeout: float = DEFAULT_FAULT_TIMEOUT
    local_workers: int = DEFAULT_LOCAL_WORKERS
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    max_attachments_per_uid: int = DEFAULT_MAX_ATTACHMENTS_PER_UID
    max_faults_per_uid: int = DEFAULT_MAX_FAULTS_PER_UID
    max_requests_per_uid: int | None = None
    max_bulk_per_peer: int = DEFAULT_MAX_BULK_PER_PEER
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER
    relay_fanout: int = DEFAULT_RELAY_FANOUT
    tls: TlsConfig | None = None
    insecure: bool = False
    metrics_port: int | None = None

    def requests_per_uid(self) -> int:
        """Requests of one uid served at once: ``max_requests_per_uid``, by default
        ``local_workers - DEFAULT_WORKERS_LEFT_TO_OTHERS`` (at least 1)."""
        if self.max_requests_per_uid is not None:
            return self.max_requests_per_uid
        return max(1, self.local_workers - DEFAULT_WORKERS_LEFT_TO_OTHERS)
