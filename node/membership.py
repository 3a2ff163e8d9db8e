"""This node in the cluster: its registration and lease, heartbeats, attachment reports.

- ``Membership``: ``RegisterNode`` at start (retried until the coordinator
  answers), ``Heartbeat`` every ttl/3 with memory used and segment count
  (NOT_FOUND: the lease expired, register again), ``DeregisterNode`` at
  shutdown. Each beat also runs the agent's periodic chores (FinishDelete
  retries, lazy re-reads of records).
- ``Reporter``: ``ReportAttachments``, debounced (``report_delay``): attach and
  detach only mark the segment; one call carries every changed count (0
  removes the report). Reports live under the node lease, so a dead agent's
  counts vanish with it, and a new lease starts with none: after registering
  again every held segment and replica with attachments is reported anew.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from vas.core.errors import NotFound, VasError
from vas.node import locks
from vas.proto import coordinator_pb2, types_pb2

log = logging.getLogger(__name__)

#: Longest pause between registration attempts, seconds.
_MAX_BACKOFF = 5.0


class Reporter:
    """Debounced attachment counts (see the module docstring).

    ``count(segment)`` gives the count to report for a marked segment.
    """

    def __init__(self, node_id: str, coordinator, delay: float,
                 count: Callable[[object], int]):
        self.node_id = node_id
        self.coordinator = coordinator
        self.delay = delay
        self.lease_id = 0
        self._count = count
        self._lock = locks.Lock("reporter", locks.Rank.SESSIONS)
        self._dirty: dict[int, object] = {}  # segment id -> segment to report
        self._wake = threading.Event()

    def mark(self, segment) -> None:
        """``segment``'s count changed: report it soon."""
        with self._lock:
            self._dirty[segment.id] = segment
        if not self._wake.is_set():  # set() takes a lock and notifies: skip if set
            self._wake.set()

    def mark_all(self, segments: Iterable) -> None:
        for segment in segments:
            if segment.attachments:
                self.mark(segment)

    def stop(self) -> None:
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        while True:
            self._wake.wait()
            if stop.wait(self.delay):
                return
            self._wake.clear()
            with self._lock:
                dirty, self._dirty = self._dirty, {}
            counts = [coordinator_pb2.AttachmentCount(name=s.name, id=s.id, count=self._count(s))
                      for s in dirty.values()]
            if not counts:
                continue
            try:
                self.coordinator.report_attachments(self.node_id, self.lease_id, counts)
            except VasError as exc:
                log.warning("cannot report attachments: %s; retrying", exc)
                with self._lock:
                    for segment_id, segment in dirty.items():
                        self._dirty.setdefault(segment_id, segment)
                self._wake.set()
                if stop.wait(1.0):
                    return


class Membership:
    """Registration, heartbeats and deregistration of this node (see the module docstring).

    ``node_info()`` describes the node; ``held()`` lists every held segment and
    replica (re-reported after registering again); ``chores()`` runs at each beat.
    """

    def __init__(self, node_id: str, config, coordinator, reporter: Reporter,
                 node_info: Callable[[], types_pb2.NodeInfo], held: Callable[[], list],
                 chores: Callable[[], None], cleanup_timeout: Callable[[], float]):
        self.node_id = node_id
        self.config = config
        self.coordinator = coordinator
        self.reporter = reporter
        self._node_info = node_info
        self._held = held
        self._chores = chores
        self._cleanup_timeout = cleanup_timeout
        self._ttl = config.heartbeat_ttl

    def register(self, stop: threading.Event) -> bool:
        """Register with the coordinator, retrying until it answers or ``stop`` is set."""
        backoff = 0.1
        while True:
            try:
                self._register_once()
                return True
            except VasError as exc:
                log.warning("cannot register node %s with coordinator %s: %s; retrying",
                            self.node_id, self.coordinator.target, exc)
            if stop.wait(backoff):
                return False
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _register_once(self) -> None:
        response = self.coordinator.register_node(self._node_info(), self.config.heartbeat_ttl)
        self.reporter.lease_id = response.lease_id
        self._ttl = response.ttl_seconds or self.config.heartbeat_ttl
        self.reporter.mark_all(self._held())
        log.info("registered node %s (lease %x, ttl %ds)", self.node_id, response.lease_id,
                 self._ttl)

    def run(self, stop: threading.Event) -> None:
        """The heartbeat thread."""
        interval = self._ttl / 3
        while not stop.wait(interval):
            interval = self._ttl / 3
            info = self._node_info()
            try:
                self.coordinator.heartbeat(self.node_id, self.reporter.lease_id,
                                           info.memory_used, info.segments)
            except NotFound:
                log.warning("node lease of %s expired; registering again", self.node_id)
                try:
                    self._register_once()
                except VasError as exc:
                    log.warning("cannot register again: %s", exc)
                    interval = min(interval, 1.0)
            except VasError as exc:
                log.warning("heartbeat of %s failed: %s", self.node_id, exc)
                interval = min(interval, 1.0)
            self._chores()

    def deregister(self) -> None:
        """Revoke the node lease: the node record and its attachment reports vanish."""
        lease = self.reporter.lease_id
        if not lease:
            return
        try:
            self.coordinator.deregister_node(self.node_id, lease, self._cleanup_timeout())
            log.info("deregistered node %s", self.node_id)
        except VasError as exc:
            log.warning("cannot deregister node %s: %s (its lease expires on its own)",
                        self.node_id, exc)
