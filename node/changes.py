"""The change counter: one number this agent bumps after every change that could make a
Revalidate answer differ, published in a read-only shared page its local clients map.

Why: ``Client.switch`` into a space whose members it keeps mapped asks the agent once
(Revalidate) whether the space and each kept member are still what a fresh read and
attach would give; the round trip and the agent's work were most of such a switch
(~250-330 us of it for 10 members on the 2-CPU development VM). The answer carries the
counter's value read before it was computed (``generation``); while the page still
shows that value, nothing that answer depends on changed, and the client reuses it
with no request (src/vas/spaceview.py).

What bumps it (each after the change is made, before the request or event that made
it is answered, so a Revalidate that read the old value cannot be reused past it):

- a home segment's state moving (deleting, claimed, freed, back to live), its record
  replaced (chmod, chown, a re-read adopted, backups promoted) or a newer version
  published (node/segments.py ``HomeSegment``; a re-read that finds the record as it
  was, but for other nodes' attachments and copies, is no change). A forced delete
  frees the segment (a move) and keeps its revoked "r" attachments: their Revalidate
  answers NotFound;
- the space records kept by the agent: an event of its watch or a change made through
  it that drops a kept record (or comes while a record is being read), the watch
  established or lost (node/spaces.py).

Not covered, so never reusable (``generation`` 0 in the answer): a copy of a segment
homed elsewhere (its record is read from the coordinator at every Revalidate, and
nothing here hears of a publish at its home), and a space read while the watch of the
space records is not established.

The value is written with one aligned 8-byte store (``memoryview`` of format "Q"), which
x86-64 and arm64 make atomic: a reader never sees half of an update. One process-wide
counter (agents sharing a process share it: a superset of bumps only costs round trips).
"""
from __future__ import annotations

import os

from vas.core.validate import PAGE_SIZE
from vas.node import locks
from vas.node.store import Memory


class ChangeCounter:
    """The counter (see the module docstring); its page is made at the first ``page_fd``."""

    def __init__(self):
        self._lock = locks.Lock("change counter", locks.Rank.CHANGE_COUNTER)
        self._value = 1  # 0 says "not reusable" on the wire
        self._memory: Memory | None = None
        self._words: memoryview | None = None

    @property
    def value(self) -> int:
        return self._value

    def bump(self) -> None:
        """Something a Revalidate answer depends on changed (the change is made already)."""
        with self._lock:
            self._value += 1
            if self._words is not None:
                self._words[0] = self._value

    def page_fd(self) -> int:
        """A new read-only fd of the shared page (the caller sends and closes it)."""
        with self._lock:
            if self._memory is None:
                memory = Memory.allocate("change counter", PAGE_SIZE, mapped=True)
                self._words = memoryview(memory.mapping).cast("B")[:8].cast("Q")
                self._words[0] = self._value
                self._memory = memory
            return os.dup(self._memory.ro_fd)


#: The agent's counter (process-wide: see the module docstring).
COUNTER = ChangeCounter()
