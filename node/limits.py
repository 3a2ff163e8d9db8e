"""Per-uid limits on what local clients may make the agent hold, and per-peer limits on
what remote agents (any TCP peer) may make it serve at once.

Why it exists: every local user shares one agent. Without limits one uid
could take all of it — connections (fds, and formerly a thread each),
attachments (table entries and counts reported to the coordinator), userfaultfd
registrations (fds the fault resolvers poll) — and lock every other user out,
root included. Each kind is counted per uid (the ``SO_PEERCRED`` uid of the
connection), so one uid reaching its limit never affects another uid, and
root's counts are its own. Root has the same limits (many containers run as
root; a runaway root client must not exhaust the agent either): raise the flags
where one uid legitimately needs more.

A request past a limit fails with ``CapacityExceeded`` (``RESOURCE_EXHAUSTED``)
whose one-line message names the uid, the limit and its flag::

    uid 65534 has 256 connections to this agent, the most allowed (--max-connections-per-uid)

The fourth per-uid limit, requests served at once, queues instead of refusing
(node/dispatch.py).

Peers are counted by address (host, without the port: one machine may open many
connections): bulk connections (node/bulk.py) and gRPC page streams, ReadPages and
WritePages (node/service.py), each of which holds a thread and a memfd while it
runs. Past the limit the connection or stream is refused the same way::

    peer 10.0.0.7 has 32 bulk connections to this agent, the most allowed (--max-bulk-per-peer)
"""
from __future__ import annotations

import enum

from vas.core.errors import CapacityExceeded
from vas.node import locks


class Limit(enum.Enum):
    """A limit: (who is counted, what is counted in the words of the message, the flag
    that sets it)."""

    CONNECTIONS = ("uid", "connections to this agent", "--max-connections-per-uid")
    ATTACHMENTS = ("uid", "attachments on this agent", "--max-attachments-per-uid")
    FAULTS = ("uid", "userfaultfds registered with this agent", "--max-faults-per-uid")
    BULK = ("peer", "bulk connections to this agent", "--max-bulk-per-peer")
    STREAMS = ("peer", "page streams (ReadPages, WritePages) open on this agent",
               "--max-streams-per-peer")

    def __init__(self, who: str, words: str, flag: str):
        self.who = who
        self.words = words
        self.flag = flag

    def exceeded(self, key, most: int) -> CapacityExceeded:
        """The error of a uid (or peer) ``key`` that holds ``most`` already."""
        return CapacityExceeded(f"{self.who} {key} has {most} {self.words}, the most allowed "
                                f"({self.flag})")


class Counts:
    """How many of one ``Limit`` each uid (or peer) holds; ``take`` refuses past ``most``.

    Callers pair every successful ``take`` with one ``give``. A leaf lock: taken
    with no other lock held, or inside any (it takes none).
    """

    def __init__(self, limit: Limit, most: int):
        if most < 1:
            raise ValueError(f"{limit.flag} must be >= 1, not {most}")
        self.limit = limit
        self.most = most
        self._counts: dict[object, int] = {}
        self._lock = locks.Lock(f"{limit.who} {limit.name.lower()}", locks.Rank.LIMITS)

    def take(self, key) -> None:
        """Count one more for ``key`` (a uid, or a peer's host); CapacityExceeded if it
        holds ``most`` already."""
        with self._lock:
            held = self._counts.get(key, 0)
            if held >= self.most:
                raise self.limit.exceeded(key, self.most)
            self._counts[key] = held + 1

    def give(self, key) -> None:
        """Count one fewer for ``key`` (one that ``take`` counted)."""
        with self._lock:
            held = self._counts.get(key, 0) - 1
            if held > 0:
                self._counts[key] = held
            else:
                self._counts.pop(key, None)

    def held(self, key) -> int:
        with self._lock:
            return self._counts.get(key, 0)
