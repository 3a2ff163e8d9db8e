"""Configuration of a coordinator: one dataclass, with the defaults as DEFAULT_* constants.

Flags and ``VAS_*`` environment variables are mapped onto it in one place
(src/vas/cli/daemons.py); tests build it directly and call ``vas.coordinator.server.serve``.
"""
from __future__ import annotations

from dataclasses import dataclass

# Shared with the agent and the CLI: defined once, in vas.core.defaults.
from vas.core.defaults import DEFAULT_COORDINATOR_LISTEN, DEFAULT_NODE_TTL, DEFAULT_WRITER_TTL
from vas.core.tls import TlsConfig

#: Deadline in seconds of one call to etcd.
DEFAULT_ETCD_TIMEOUT = 5.0
#: gRPC server worker threads. Each Watch stream holds one while it lives (an agent's
#: wait() keeps one for up to 5 s at a time), so with 32, 42 waiting clients on three
#: agents delayed every other call (ClusterStatus 0.15-0.48 s instead of 4 ms, heartbeats
#: included); an idle thread costs little, a starved heartbeat a node's lease.
DEFAULT_WORKERS = 256
#: Seconds SIGTERM waits for in-flight RPCs before cancelling them (Watch streams
#: are cancelled at once: they never finish on their own).
DEFAULT_SHUTDOWN_GRACE = 5.0
#: Attempts of one read-modify-write transaction before giving up with Unavailable
#: (each failed attempt means another writer changed the same key meanwhile).
DEFAULT_TXN_ATTEMPTS = 64


@dataclass
class CoordinatorConfig:
    """Everything ``serve`` needs to run one coordinator.

    :param etcd: etcd client URL, ``http://HOST:PORT``; several comma-separated
        URLs of IPv4 literals are tried in turn.
    :param listen: host:port for the gRPC API (port 0 = pick one).
    :param node_ttl: default node lease TTL, seconds.
    :param writer_ttl: default writer-lock lease TTL, seconds.
    :param etcd_timeout: deadline of one etcd call, seconds.
    :param workers: gRPC server threads.
    :param shutdown_grace: grace period of the gRPC server stop, seconds.
    :param txn_attempts: attempts of a conflicting read-modify-write before Unavailable.
    :param tls: mutual TLS of the gRPC port (and of the calls to agents); None: plaintext,
        loopback only unless ``insecure``.
    :param insecure: allow a plaintext non-loopback ``listen`` (and metrics listener).
    :param etcd_tls: client certificate, key and CA for an ``https://`` etcd (the
        CLI defaults them to ``tls``).
    :param metrics_port: serve Prometheus metrics on ``/metrics`` at this port of the
        ``listen`` host (0: a free one); None: no metrics listener. With ``tls`` it is
        HTTPS requiring a client certificate from the CA (vas.core.metrics).

    Example::

        serve(CoordinatorConfig(etcd="http://127.0.0.1:2379", listen="127.0.0.1:0"))
    """

    etcd: str
    listen: str = DEFAULT_COORDINATOR_LISTEN
    node_ttl: int = DEFAULT_NODE_TTL
    writer_ttl: int = DEFAULT_WRITER_TTL
    etcd_timeout: float = DEFAULT_ETCD_TIMEOUT
    workers: int = DEFAULT_WORKERS
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    txn_attempts: int = DEFAULT_TXN_ATTEMPTS
    tls: TlsConfig | None = None
    insecure: bool = False
    etcd_tls: TlsConfig | None = None
    metrics_port: int | None = None
