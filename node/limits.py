"""Per-uid limits on what local clients may make the agent hold.

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
"""
from __future__ import annotations

import enum

from vas.core.errors import CapacityExceeded
from vas.node import locks


class Limit(enum.Enum):
    """A per-uid limit: (what is counted, the words of the message, the flag that sets it)."""

    CONNECTIONS = ("connections to this agent", "--max-connections-per-uid")
    ATTACHMENTS = ("attachments on this agent", "--max-attachments-per-uid")
    FAULTS = ("userfaultfds registered with this agent", "--max-faults-per-uid")

    def __init__(self, words: str, flag: str):
        self.words = words
        self.flag = flag

    def exceeded(self, uid: int, most: int) -> CapacityExceeded:
        """The error of a uid that holds ``most`` already."""
        return CapacityExceeded(f"uid {uid} has {most} {self.words}, the most allowed "
                                f"({self.flag})")


class UidCounts:
    """How many of one ``Limit`` each uid holds; ``take`` refuses past ``most``.

    Callers pair every successful ``take`` with one ``give``. A leaf lock: taken
    with no other lock held, or inside any (it takes none).
    """

    def __init__(self, limit: Limit, most: int):
        if most < 1:
            raise ValueError(f"{limit.flag} must be >= 1, not {most}")
        self.limit = limit
        self.most = most
        self._counts: dict[int, int] = {}
        self._lock = locks.Lock(f"uid {limit.name.lower()}", locks.Rank.LIMITS)

    def take(self, uid: int) -> None:
        """Count one more for ``uid``; CapacityExceeded if it holds ``most`` already."""
        with self._lock:
            held = self._counts.get(uid, 0)
            if held >= self.most:
                raise self.limit.exceeded(uid, self.most)
            self._counts[uid] = held + 1

    def give(self, uid: int) -> None:
        """Count one fewer for ``uid`` (one that ``take`` counted)."""
        with self._lock:
            held = self._counts.get(uid, 0) - 1
            if held > 0:
                self._counts[uid] = held
            else:
                self._counts.pop(uid, None)

    def held(self, uid: int) -> int:
        with self._lock:
            return self._counts.get(uid, 0)
