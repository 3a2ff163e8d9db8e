"""Local connections and what they hold: sessions, attachments, writer leases.

A ``Session`` is one client connection: who is calling (SO_PEERCRED) and its
attachments. An ``Attachment`` is one mapping handed out; a "rw" one carries
the cluster-wide writer lock as a ``WriterLease``. Attachment ids are unique
in the agent; a session may only name its own.

Locking: a session's ``attachments`` dict is guarded by ``Sessions.lock``
(rank SESSIONS: taken inside a segment's lock, never around one).
"""
from __future__ import annotations

import enum
import itertools
import select
import time

from vas.core.errors import NotFound
from vas.node import locks
from vas.proto import types_pb2


class LeaseState(enum.Enum):
    HELD = "held"          # renewed while the client shows it is alive
    FENCED = "fenced"      # ended without its writer (not renewed in time, lapsed, force
                           # delete): every sync raises Fenced
    RELEASED = "released"  # given back by its writer (detach, EOF)


class WriterLease:
    """The writer lock a "rw" attachment holds: its fencing token and etcd lease.

    ``renewed`` is when (``time.monotonic()``) the last grant or renewal that
    succeeded was sent: etcd counts the lease's ttl from a moment after that, so
    the lease cannot lapse before ``renewed + ttl``.
    """

    __slots__ = ("name", "token", "lease_id", "state", "renewed")

    def __init__(self, name: str, token: int, lease_id: int, renewed: float = 0.0):
        self.name, self.token, self.lease_id = name, token, lease_id
        self.state = LeaseState.HELD
        self.renewed = renewed or time.monotonic()

    def end(self, state: LeaseState) -> bool:
        """Move a held lease to ``state`` (FENCED or RELEASED); False if it had ended
        already (so only one path releases it at the coordinator)."""
        if self.state is not LeaseState.HELD:
            return False
        self.state = state
        return True


class Session:
    """The state of one local connection: who is calling and what it holds."""

    __slots__ = ("uid", "gid", "pid", "caller", "attachments", "last_seen", "busy", "sock")

    def __init__(self, uid: int, gid: int, pid: int, node_id: str):
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.caller = types_pb2.Caller(uid=uid, gid=gid, pid=pid, node=node_id)
        self.attachments: dict[int, Attachment] = {}
        # Liveness for writer leases: when the client last sent a request, and
        # whether one is being served now (a long attach or wait proves it alive).
        self.last_seen = time.monotonic()
        self.busy = False
        self.sock = None  # the connection (set by the local server), for hung_up()

    def alive_within(self, seconds: float) -> bool:
        """Whether the client showed it was alive in the last ``seconds``."""
        return self.busy or time.monotonic() - self.last_seen <= seconds

    def hung_up(self) -> bool:
        """Whether the client closed its end (checked without reading from it)."""
        if self.sock is None:
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                   for _, events in poller.poll(0))

    def __repr__(self) -> str:
        return f"<Session pid={self.pid} uid={self.uid} gid={self.gid}>"


class Attachment:
    """One local attachment of a home segment or a replica.

    ``guard``: the write-protect registration of a revocable "rw" attachment of a
    home segment (node/revoke.py), else None.
    """

    __slots__ = ("id", "segment", "mode", "session", "lease", "faults", "guard")

    def __init__(self, attachment_id: int, segment, mode: str, session: Session,
                 lease: WriterLease | None = None, guard=None):
        self.id = attachment_id
        self.segment = segment
        self.mode = mode
        self.session = session
        self.lease = lease
        #: The registration of the client's userfaultfd of a lazy attachment
        #: (RegisterFaults; node/faults.py), until the attachment ends.
        self.faults = None
        self.guard = guard


class Sessions:
    """Attachment ids and every session's attachments."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self.lock = locks.Lock("sessions", locks.Rank.SESSIONS)
        self._ids = itertools.count(1)

    def open(self, uid: int, gid: int, pid: int) -> Session:
        return Session(uid, gid, pid, self.node_id)

    def add(self, session: Session, segment, mode: str,
            lease: WriterLease | None = None, guard=None) -> Attachment:
        """Register a new attachment of ``segment`` (the caller holds the segment's lock
        and counts it there)."""
        with self.lock:
            attachment = Attachment(next(self._ids), segment, mode, session, lease, guard)
            session.attachments[attachment.id] = attachment
        return attachment

    def get(self, session: Session, attachment_id: int) -> Attachment:
        """``session``'s attachment ``attachment_id``; NotFound if it has none such."""
        with self.lock:
            attachment = session.attachments.get(attachment_id)
        if attachment is None:
            raise NotFound(f"no attachment {attachment_id} on this connection")
        return attachment

    def take(self, session: Session, attachment_id: int) -> Attachment:
        """Remove and return ``session``'s attachment ``attachment_id`` (NotFound if none)."""
        with self.lock:
            attachment = session.attachments.pop(attachment_id, None)
        if attachment is None:
            raise NotFound(f"no attachment {attachment_id} on this connection")
        return attachment

    def take_all(self, session: Session) -> list[Attachment]:
        """Remove and return every attachment of ``session`` (its connection ended)."""
        with self.lock:
            attachments = list(session.attachments.values())
            session.attachments.clear()
        return attachments
