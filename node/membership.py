"""This node in the cluster: its registration and lease, heartbeats, attachment reports.

- ``Membership``: ``RegisterNode`` at start (retried until the coordinator
  answers), ``Heartbeat`` every ttl/3 with memory used and segment count
  (NOT_FOUND: the lease expired, register again), ``DeregisterNode`` at
  shutdown. Each beat also runs the agent's periodic chores (FinishDelete
  retries, lazy re-reads of records).
- Reconciliation: the first registration of a process (its start) says
  ``reconcile`` with the ids of the home segments it holds (none without a
  ``--data-dir``: memory does not survive a restart; with one, those it
  re-adopted from its files), so the coordinator marks every other record homed
  on this node lost before the node is listed again; an agent killed and
  restarted with the same id never shows records ``ready`` that it cannot
  serve. Registering again after a lapsed lease reconciles too, with the ids
  it holds (the process kept its memory, so nothing it holds is marked): etcd
  may have come back from a snapshot in which records homed here name memory
  this process freed since, and those must read ``lost``, not ``ready``.
- ``Reporter``: ``ReportAttachments``, debounced (``report_delay``): attach and
  detach only mark the segment; the first attachment of a replica is reported before
  its attach returns (``report_now``: a delete made after the attach returned must see
  it, or the home would free pages the new reader still needs); one call carries every
  changed count (count 0
  without ``copy`` removes the report; a held replica is reported with
  ``copy`` even unattached, so deletes made elsewhere can name this node).
  The reply names the reported replicas whose segment is already gone (a
  delete that happened before their report could not name this node); those
  are dropped at once. Reports live under the node lease, so a dead agent's
  counts vanish with it, and a new lease starts with none: after registering
  again every home segment with attachments and every replica is reported anew.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from vas.core.errors import NotFound, VasError
from vas.node import locks, metrics
from vas.proto import coordinator_pb2, types_pb2

log = logging.getLogger(__name__)

#: Longest pause between registration attempts, seconds.
_MAX_BACKOFF = 5.0


class Reporter:
    """Debounced attachment counts (see the module docstring).

    ``count(segment)`` gives (count, whether a replica is held) to report for a
    marked segment; ``gone(segment)`` is called for a reported replica whose
    segment the coordinator says is gone. ``lease_id`` is the node's current
    lease (also what proves this agent to CreateSegment).
    """

    def __init__(self, node_id: str, coordinator, delay: float,
                 count: Callable[[object], tuple[int, bool]],
                 gone: Callable[[object], None]):
        self.node_id = node_id
        self.coordinator = coordinator
        self.delay = delay
        self.lease_id = 0
        self._count = count
        self._gone = gone
        self._lock = locks.Lock("reporter", locks.Rank.SESSIONS)
        self._dirty: dict[int, object] = {}  # segment id -> segment to report
        self._wake = threading.Event()
        self._hurry = threading.Event()  # a mark that must not wait out the debounce
        # Cycles (a take of the dirty set and its one call) begun and ended, for
        # ``report_now``: a cycle begun after a mark carries it.
        self._ended = threading.Condition()
        self._cycles_begun = self._cycles_ended = 0

    def mark(self, segment) -> None:
        """``segment``'s count changed: report it soon."""
        with self._lock:
            self._dirty[segment.id] = segment
        if not self._wake.is_set():  # set() takes a lock and notifies: skip if set
            self._wake.set()

    def report_now(self, segment, timeout: float) -> bool:
        """``mark`` ``segment`` and wait (at most ``timeout``) until a call carrying its
        count ended; True if one did (it may have failed: then it is retried later).
        Through the reporter's thread, so that no report sent earlier with an older
        count can land after it."""
        with self._ended:
            ticket = self._cycles_begun
        self.mark(segment)
        self._hurry.set()  # not after the debounce: now
        with self._ended:
            return self._ended.wait_for(lambda: self._cycles_ended > ticket, timeout)

    def mark_all(self, segments: Iterable) -> None:
        """Report every one of ``segments`` that has something to report (after
        registering again: the old lease took the reports with it)."""
        for segment in segments:
            if any(self._count(segment)):
                self.mark(segment)

    def stop(self) -> None:
        self._wake.set()
        self._hurry.set()

    def run(self, stop: threading.Event) -> None:
        while True:
            self._wake.wait()
            self._hurry.wait(self.delay)
            if stop.is_set():
                return
            self._hurry.clear()
            self._wake.clear()
            with self._ended:
                self._cycles_begun += 1
                cycle = self._cycles_begun
            try:
                reported = self._report()
            finally:
                with self._ended:
                    self._cycles_ended = cycle
                    self._ended.notify_all()
            if not reported and stop.wait(1.0):
                return

    def _report(self) -> bool:
        """One call with every count marked since the last; False if it failed (they
        are marked again)."""
        with self._lock:
            dirty, self._dirty = self._dirty, {}
        counts = []
        for segment in dirty.values():
            count, copy = self._count(segment)
            counts.append(coordinator_pb2.AttachmentCount(name=segment.name, id=segment.id,
                                                          count=count, copy=copy))
        if not counts:
            return True
        try:
            gone = self.coordinator.report_attachments(self.node_id, self.lease_id, counts)
        except VasError as exc:
            log.warning("cannot report attachments: %s; retrying", exc)
            with self._lock:
                for segment_id, segment in dirty.items():
                    self._dirty.setdefault(segment_id, segment)
            self._wake.set()
            return False
        for segment_id in gone:
            self._gone(dirty[segment_id])
        return True


class Membership:
    """Registration, heartbeats and deregistration of this node (see the module docstring).

    ``node_info()`` describes the node; ``held()`` lists every held segment and
    replica (re-reported after registering again); ``home_ids()`` the ids of
    the held home segments (told when reconciling); ``registered(response,
    again)`` runs after each registration; ``chores()`` runs at each beat.
    """

    def __init__(self, node_id: str, config, coordinator, reporter: Reporter,
                 node_info: Callable[[], types_pb2.NodeInfo], held: Callable[[], list],
                 home_ids: Callable[[], list[int]],
                 registered: Callable[[coordinator_pb2.RegisterNodeResponse, bool], None],
                 chores: Callable[[], None], cleanup_timeout: Callable[[], float]):
        self.node_id = node_id
        self.config = config
        self.coordinator = coordinator
        self.reporter = reporter
        self._node_info = node_info
        self._held = held
        self._home_ids = home_ids
        self._registered = registered
        self._chores = chores
        self._cleanup_timeout = cleanup_timeout
        self._ttl = config.heartbeat_ttl
        self._reconciled = False  # set by the first registration of this process

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
        again = self._reconciled
        held = self._home_ids()  # first: it may adopt segments (their usage)
        response = self.coordinator.register_node(
            self._node_info(), self.config.heartbeat_ttl, reconcile=True, held=held)
        self._reconciled = True
        self.reporter.lease_id = response.lease_id
        self._ttl = response.ttl_seconds or self.config.heartbeat_ttl
        self.reporter.mark_all(self._held())
        log.info("registered node %s (lease %x, ttl %ds)", self.node_id, response.lease_id,
                 self._ttl)
        if response.lost:
            log.warning("%d segments homed on node %s before this start are lost (their "
                        "memory went with the previous process)", len(response.lost),
                        self.node_id)
        self._registered(response, again)

    def run(self, stop: threading.Event) -> None:
        """The heartbeat thread."""
        interval = self._ttl / 3
        while not stop.wait(interval):
            interval = self._ttl / 3
            info = self._node_info()
            try:
                self.coordinator.heartbeat(self.node_id, self.reporter.lease_id,
                                           info.memory_used, info.segments, info.replicas,
                                           info.replica_bytes)
                metrics.NODE_LEASE_RENEWED.inc()
            except NotFound:
                metrics.NODE_LEASE_FAILED.inc()
                log.warning("node lease of %s expired; registering again", self.node_id)
                try:
                    self._register_once()
                except VasError as exc:
                    log.warning("cannot register again: %s", exc)
                    interval = min(interval, 1.0)
            except VasError as exc:
                metrics.NODE_LEASE_FAILED.inc()
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
