"""The spaces read through this agent, kept while its watch of the space records says
they did not change: so that ``Client.switch`` reads its space without a coordinator
call (~1-3 ms on the 2-CPU development VM: most of a switch whose members are mapped).

One thread (``run``) holds a coordinator Watch of the space records (``WatchRequest.
spaces``) in slices of ``_WATCH_SLICE`` seconds, each resumed from the revision after
the last one seen, so no change falls between two slices. Every event drops the entry
of the space it names, unless that entry was read at the event's revision or later.
Entries are kept only while a watch is established: when a stream fails, everything is
dropped and nothing is kept until the next one is (then every read goes to the
coordinator). A read that races a change can not keep a stale
record: a record read from the coordinator is kept only if no event came while it was
being read (``_generation``).

Changes made through this agent drop the entry before they are answered, so a process
sees its own changes at once; a change made through another agent (or straight at a
coordinator) is seen here when its event arrives, milliseconds later. Each drop of a
kept record (or any change while a read is under way), and each watch established or
lost, bumps the change counter (node/changes.py) after it: a Revalidate answer reused by
a client holds exactly as long as the kept record would.

Locking: ``_lock`` (a leaf: no other lock is taken under it, no call made).
"""
from __future__ import annotations

import logging
import threading
import time

from vas.core.errors import InvalidArgument, VasError
from vas.node import locks
from vas.node.changes import COUNTER
from vas.proto import coordinator_pb2, types_pb2

log = logging.getLogger(__name__)

#: Seconds one Watch call lasts before it is resumed by the next (the thread sees the
#: agent stop between two).
_WATCH_SLICE = 10.0
#: Seconds before a failed watch is tried again.
_RETRY_SECONDS = 1.0

WatchEvent = coordinator_pb2.WatchEvent


class SpaceCache:
    """The space records read through this agent (see the module docstring)."""

    def __init__(self, coordinator):
        self.coordinator = coordinator
        self._lock = locks.Lock("space cache", locks.Rank.SPACE_CACHE)
        self._entries: dict[str, types_pb2.SpaceInfo] = {}
        self._watching = False   # a watch is established: entries may be kept
        self._generation = 0     # counts the events and watch ends
        self._reading = 0        # reads from the coordinator under way

    def get(self, name: str) -> types_pb2.SpaceInfo:
        """The space ``name`` as of now (NotFound if there is none)."""
        with self._lock:
            info = self._entries.get(name)
            if info is not None:
                return info
            generation, watching = self._generation, self._watching
            self._reading += 1
        try:
            info = self.coordinator.get_space(name)
        finally:
            with self._lock:
                self._reading -= 1
                if (info is not None and watching and self._watching
                        and self._generation == generation):
                    self._entries[name] = info
        return info

    @property
    def watching(self) -> bool:
        """A watch is established: a change of any space is heard (Revalidate answers
        holding a space are reusable only then: node/changes.py)."""
        return self._watching

    def changed(self, name: str, revision: int = 0) -> None:
        """Space ``name`` changed (or is gone) at etcd ``revision`` (0: not known, as
        for a change made through this agent): drop what is kept of it, unless the kept
        record was read at that revision or later (the event of a change this agent
        made, read back by a switch before the event came). The change counter moves
        only if something may have relied on an older record: one was kept, or a read is
        under way (its answer may be older than this change). Any other answer holding
        that space was made before a drop that moved the counter: so a change of a
        space no client here read, anywhere in the cluster, asks no switch on this node
        to look again."""
        with self._lock:
            kept = self._entries.get(name)
            older = kept is not None and (not revision or kept.revision < revision)
            if older:
                del self._entries[name]
            self._generation += 1
            relied_on = older or self._reading > 0
        if relied_on:
            COUNTER.bump()

    def _watched(self, watching: bool) -> None:
        """A watch was established (True) or ended (False, dropping everything)."""
        with self._lock:
            moved = watching != self._watching
            self._watching = watching
            self._generation += 1
            if not watching:
                self._entries.clear()
        if moved:  # not at every slice resumed: it misses no event
            COUNTER.bump()

    def run(self, stop: threading.Event) -> None:
        """Watch the space records until ``stop`` is set (the agent's thread)."""
        revision = 0  # the next revision to watch from (0: now)
        while not stop.is_set():
            try:
                revision = self._watch_slice(revision, stop.wait)
            except VasError as exc:
                self._watched(False)
                if stop.is_set():
                    return
                if isinstance(exc, InvalidArgument):  # compacted: start afresh
                    revision = 0
                else:
                    log.info("watch of the space records failed: %s; retrying", exc)
                stop.wait(_RETRY_SECONDS)

    def _watch_slice(self, revision: int, stop_wait) -> int:
        """One Watch call from ``revision``; the revision to resume from."""
        request = coordinator_pb2.WatchRequest(spaces=True, start_revision=revision)
        started = time.monotonic()
        with self.coordinator.watch(request, _WATCH_SLICE) as events:
            for event in events:
                if event.type == WatchEvent.TYPE_CREATED:  # resumed: the events from
                    revision = revision or event.revision + 1  # `revision` on come next
                    self._watched(True)
                    continue
                self.changed(event.space, event.revision)
                revision = max(revision, event.revision + 1)
        if time.monotonic() - started < _WATCH_SLICE / 2:  # ended early (the coordinator
            self._watched(False)                           # stopping), not at its deadline
            stop_wait(_RETRY_SECONDS)
        return revision
