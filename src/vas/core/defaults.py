"""Defaults that more than one part of vas uses, each defined here once.

The client (vas.client), the CLI (vas.cli), the agent's config (vas.node.config)
and the coordinator's config (vas.coordinator.config) import them from here, so
a client and the agent it talks to cannot disagree on, say, the socket path. A
default only one daemon uses stays in that daemon's config module.
"""

#: Path of the agent's local Unix socket; clients use it when neither ``node=``
#: nor $VAS_NODE names another.
DEFAULT_SOCKET = "/run/vas/node.sock"
#: host:port the coordinator serves gRPC on (``vasctl coordinator serve --listen``).
DEFAULT_COORDINATOR_LISTEN = "127.0.0.1:7300"
#: host:port of an agent's Node gRPC service; port 0 picks a free port.
DEFAULT_NODE_LISTEN = "127.0.0.1:0"
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
