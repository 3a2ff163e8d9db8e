"""Defaults that more than one part of vas uses, each defined here once.

The client (vas.client), the CLI (vas.cli), the agent's config (vas.node.config)
and the coordinator's config (vas.coordinator.config) import them from here, so
a client and the agent it talks to cannot disagree on, say, the socket path. A
default only one daemon uses stays in that daemon's config module.
"""
import os
import sys

#: Path of the agent's local Unix socket; clients use it when neither ``node=``
#: nor $VAS_NODE names another.
DEFAULT_SOCKET = "/run/vas/node.sock"
#: Folder of the sockets of the agents that vas.ray starts: the agent of Ray node
#: NODE_ID listens at RAY_SOCKET_DIR/NODE_ID/node.sock, so a process on that node
#: finds it from its Ray node id alone (vas.connect() inside Ray; vas/ray.py).
RAY_SOCKET_DIR = "/tmp/vas-ray"


def ray_socket(ray_node_id: str) -> str:
    """Socket path of the vas agent that vas.ray runs on Ray node ``ray_node_id``."""
    return f"{RAY_SOCKET_DIR}/{ray_node_id}/node.sock"


def ray_node_socket() -> str | None:
    """Inside a Ray process (driver, task or actor) whose Ray node runs an agent of
    vas.ray, that agent's socket; else None (the client's default after $VAS_NODE).
    Never imports ray: a process that has not imported it is not inside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not getattr(ray, "is_initialized", lambda: False)():
        return None
    try:
        path = ray_socket(ray.get_runtime_context().get_node_id())
    except Exception:  # noqa: BLE001  (no Ray node to ask: not inside Ray after all)
        return None
    return path if os.path.exists(path) else None


#: DNS names every coordinator and every agent certificate carries, and that clients
#: check: a node certificate cannot pose as a coordinator, nor the reverse
#: (vas.core.certs issues them, vas.core.tls checks them).
COORDINATOR_HOST = "coordinator.vas"
NODE_HOST = "node.vas"
#: host:port the coordinator serves gRPC on (``vasctl coordinator serve --listen``).
DEFAULT_COORDINATOR_LISTEN = "127.0.0.1:7300"
#: host:port of an agent's Node gRPC service; port 0 picks a free port.
DEFAULT_NODE_LISTEN = "127.0.0.1:0"
#: TCP port of an agent's bulk channel (segment bytes between agents), on the host of its
#: gRPC listen address; 0 picks a free one (``vasctl node serve --bulk-port``).
DEFAULT_BULK_PORT = 0
#: Segment memory capacity of one agent, bytes (1 GiB).
DEFAULT_MEMORY = 1 << 30
#: TTL in seconds of a node's etcd lease: the agent asks for it at registration and
#: heartbeats every ttl/3; the coordinator grants it when RegisterNode asks for 0.
DEFAULT_NODE_TTL = 10
#: TTL in seconds of a writer-lock lease: the agent asks for it and renews it every
#: ttl/3 while the "rw" attachment's connection lives; the coordinator grants it
#: when AcquireWriter asks for 0. A writer silent this long loses the lock.
DEFAULT_WRITER_TTL = 10
#: Seconds a page fault of a lazy mapping may wait while the home fails to deliver
#: its chunk (the agent retries meanwhile); then its pages are poisoned and the
#: faulting thread gets SIGBUS (``vasctl node serve --fault-timeout``).
DEFAULT_FAULT_TIMEOUT = 10.0
#: Deadline in seconds of one unary call an agent makes to the coordinator or to
#: another agent (``vasctl node serve --rpc-timeout``).
DEFAULT_RPC_TIMEOUT = 10.0
#: Threads of an agent serving the requests of local clients (all connections share them).
DEFAULT_LOCAL_WORKERS = 16
#: Workers one uid leaves to the others by default: ``max_requests_per_uid`` is
#: ``local_workers`` minus this (at least 1) unless given.
DEFAULT_WORKERS_LEFT_TO_OTHERS = 2
#: Local connections one uid may hold open at once (more are refused: CapacityExceeded).
DEFAULT_MAX_CONNECTIONS_PER_UID = 256
#: Attachments one uid may hold at once, over all its connections (attaches in flight count).
DEFAULT_MAX_ATTACHMENTS_PER_UID = 4096
#: Userfaultfds (RegisterFaults of lazy attachments) one uid may have the agent hold at once.
DEFAULT_MAX_FAULTS_PER_UID = 256
#: Bulk connections (node/bulk.py) one peer host may hold open to an agent at once:
#: an eager fetch opens 4, a lazy replica keeps up to 4 idle plus one per concurrent
#: fault (``vasctl node serve --max-bulk-per-peer``).
DEFAULT_MAX_BULK_PER_PEER = 32
#: gRPC page streams (ReadPages, WritePages) one peer host may have open on an agent at
#: once (``vasctl node serve --max-streams-per-peer``).
DEFAULT_MAX_STREAMS_PER_PEER = 16
#: Fetchers one relay serves a copy of a segment on to (node/relay.py; ``vasctl node
#: serve --relay-fanout``; 0: every fetcher pulls from the home).
DEFAULT_RELAY_FANOUT = 2
#: Largest gRPC message, bytes, that either daemon sends or accepts: the local protocol
#: allows 4 MiB messages, so a forwarded one must fit with room to spare; a larger one
#: is refused with RESOURCE_EXHAUSTED.
MAX_GRPC_MESSAGE = 8 << 20
#: RPCs a daemon's gRPC server runs or queues at once; more are refused at once with
#: RESOURCE_EXHAUSTED instead of queueing without bound behind busy threads.
MAX_CONCURRENT_RPCS = 1024
