"""Backups: the full, pinned copies this node keeps of segments homed elsewhere.

A segment created with ``replicas=k`` names k backup nodes in its record
(placed by the coordinator). Unlike the on-demand replicas of node/replicas.py
a backup is never handed to local attaches, never evicted, and never retired
because its home vanished: it is what survives the home. Its life, driven by
the home's agent (the ``BackupPusher`` in node/writers.py) and by a
coordinator's promotion (coordinator/promote.py)::

    HoldBackup (all zeros, version 0: a new segment's bytes)
      -> StageBackup(base N): the changed bytes of N+1 kept aside, not applied
      -> CommitBackup(N+1): applied (the home published N+1 meanwhile)
      -> ... -> PromoteBackup(V): becomes this node's home segment at V
      or ReleaseReplica / a heartbeat re-check finding the record gone: freed

Staged bytes are applied only once the version they make is published: a
fenced publish leaves them staged, and the next stage (of the same base)
replaces them. A stage whose base is the staged version applies that first:
the home published it and its commit did not arrive. So whatever moment the
home dies at, a backup holds the record's version either applied or staged,
and promotion applies it (never a version the record does not have).

Locking: ``_lock`` (rank BACKUPS) guards the table; each backup's ``gate``
(over its own SEGMENT-rank lock) keeps stage, commit and promote of one backup
in turn without holding a lock across the pwrites.
"""
from __future__ import annotations

import logging
import os
import time

from vas.core import validate
from vas.core.errors import NotFound, Unavailable
from vas.node import locks
from vas.node.publish import Staged
from vas.node.segments import Gate
from vas.node.store import Memory
from vas.proto import types_pb2

log = logging.getLogger(__name__)

#: Seconds a stage, commit or promotion waits for the one before it on the same backup.
GATE_TIMEOUT = 30.0
#: A backup whose record was not read for this many seconds is re-checked.
RECHECK_AGE = 30.0
#: Most backups re-checked per heartbeat.
_RECHECK_MAX = 8


class Backup:
    """One backup: its memory, the version applied, the bytes of the next one staged."""

    __slots__ = ("name", "id", "size", "memory", "applied", "staged", "lock", "gate",
                 "checked")

    def __init__(self, name: str, segment_id: int, memory: Memory):
        self.name, self.id, self.size, self.memory = name, segment_id, memory.size, memory
        self.applied = 0
        self.staged: tuple[int, Staged] | None = None  # (version, bytes), at applied + 1
        self.lock = locks.Lock(f"backup {name}", locks.Rank.SEGMENT)
        self.gate = Gate(self.lock)
        self.checked = time.monotonic()  # when its record was last seen (re-checks)

    def staged_version(self) -> int:
        with self.lock:
            return self.staged[0] if self.staged else 0

    def apply_staged(self, version: int) -> bool:
        """Apply the staged bytes if they are ``version`` (the caller is in the gate);
        whether the backup holds ``version`` now."""
        with self.lock:
            if self.applied == version:
                return True
            staged = self.staged
            if staged is None or staged[0] != version:
                return False
        for offset, data in staged[1].pieces:
            _pwrite_all(self.memory.fd, data, offset)
        with self.lock:
            self.applied, self.staged = version, None
        return True


class Backups:
    """The backups held by this node (see the module docstring)."""

    def __init__(self, node_id: str, store, coordinator):
        self.node_id = node_id
        self.store = store
        self.coordinator = coordinator
        self._lock = locks.Lock("backups", locks.Rank.BACKUPS)
        self._by_id: dict[int, Backup] = {}

    def hold(self, name: str, segment_id: int, size: int, version: int = 0) -> None:
        """Make an all-zero backup of segment ``segment_id`` at ``version`` (0: a new
        segment, whose bytes are zeros, a no-op if held already; else one the home fills
        next, replacing any copy held). CapacityExceeded without room."""
        with self._lock:
            held = self._by_id.get(segment_id)
        if held is not None:
            if not version:
                return
            # To be filled again: an old copy (dropped from the record while this node
            # did not answer) is not zeros, and the fill sends only non-zero chunks.
            self.drop(name, segment_id)
        self.store.reserve(size, name)
        try:
            memory = Memory.allocate(name, size)
        except BaseException:
            self.store.unreserve(size)
            raise
        with self._lock:
            if segment_id not in self._by_id:
                backup = self._by_id[segment_id] = Backup(name, segment_id, memory)
                backup.applied = version
                self.store.hold(size)
                memory = None
        if memory is not None:  # a concurrent hold won
            self.store.unreserve(size)
            memory.release()
        log.info("holding a backup of %s (id %d, %d bytes)", name, segment_id, size)

    def get(self, segment_id: int) -> Backup:
        """Backup ``segment_id``; NotFound if none is held."""
        with self._lock:
            backup = self._by_id.get(segment_id)
        if backup is None:
            raise NotFound(f"no backup of segment id {segment_id} is held by node {self.node_id}")
        return backup

    def stage(self, segment_id: int, base: int, pieces) -> None:
        """Keep ``pieces`` ((offset, bytes)) aside as version ``base`` + 1.
        Unavailable when the backup does not hold ``base``."""
        backup = self.get(segment_id)
        staged = Staged(backup.size)
        for offset, data in pieces:
            staged.add(offset, data)
        with backup.gate.passage(GATE_TIMEOUT, f"stage of backup {backup.name}"):
            if not backup.apply_staged(base):
                with backup.lock:
                    applied = backup.applied
                raise Unavailable(f"backup of {backup.name} holds version {applied}, "
                                         f"not {base}")
            with backup.lock:
                backup.staged = (base + 1, staged)

    def fill(self, segment_id: int, version: int, pieces) -> None:
        """Write ``pieces`` of ``version`` into a new backup held at that version (its
        home fills it before the record names it). Unavailable at another version."""
        backup = self.get(segment_id)
        with backup.gate.passage(GATE_TIMEOUT, f"fill of backup {backup.name}"):
            with backup.lock:
                applied = backup.applied
            if applied != version:
                raise Unavailable(f"backup of {backup.name} holds version {applied}, "
                                  f"not {version}")
            for offset, data in pieces:
                validate.check_range(offset, len(data), backup.size)
                _pwrite_all(backup.memory.fd, data, offset)

    def commit(self, segment_id: int, version: int) -> None:
        """Apply the staged ``version``; Unavailable if it is not staged."""
        backup = self.get(segment_id)
        with backup.gate.passage(GATE_TIMEOUT, f"commit of backup {backup.name}"):
            if not backup.apply_staged(version):
                raise Unavailable(f"backup of {backup.name} has no version {version} "
                                         "staged")

    def state(self, segment_id: int) -> tuple[int, int]:
        """(version applied, version staged or 0) of backup ``segment_id``."""
        backup = self.get(segment_id)
        with backup.lock:
            return backup.applied, backup.staged[0] if backup.staged else 0

    def promote(self, segment_id: int, version: int, adopt) -> None:
        """Hand backup ``segment_id``, holding ``version`` (applied from the staged bytes
        if need be), to ``adopt(memory)`` (which makes it a home segment) and forget it;
        its memory and capacity pass with it. All in the backup's gate, so a
        concurrent promotion waits and then finds it gone (NotFound) and adopted.
        Unavailable if it holds another version."""
        backup = self.get(segment_id)
        with backup.gate.passage(GATE_TIMEOUT, f"promotion of backup {backup.name}"):
            with self._lock:
                if self._by_id.get(segment_id) is not backup:
                    raise NotFound(f"the backup of {backup.name} is promoted or released")
            if not backup.apply_staged(version):
                with backup.lock:
                    applied = backup.applied
                raise Unavailable(f"backup of {backup.name} holds version {applied}, "
                                  f"not {version}")
            adopt(backup.memory)
            with self._lock:
                del self._by_id[segment_id]

    def drop(self, name: str, segment_id: int) -> bool:
        """Free backup ``segment_id`` (its segment was deleted or is gone); whether one was held."""
        with self._lock:
            backup = self._by_id.get(segment_id)
            if backup is None or backup.name != name:
                return False
            del self._by_id[segment_id]
        self._free(backup)
        return True

    def _free(self, backup: Backup) -> None:
        self.store.drop(backup.size)
        backup.memory.release()
        log.info("freed the backup of %s (id %d)", backup.name, backup.id)

    def all(self) -> list[Backup]:
        with self._lock:
            return list(self._by_id.values())

    def recheck(self) -> None:
        """Free the backups this node no longer keeps for anyone (the heartbeat's safety
        net behind ReleaseReplica): the record is gone, of another id or deleting,
        or names this node neither backup nor home (the home dropped it while it did
        not answer). At most ``_RECHECK_MAX`` per beat, each unread for ``RECHECK_AGE``."""
        horizon = time.monotonic() - RECHECK_AGE
        due = sorted((b for b in self.all() if b.checked < horizon),
                     key=lambda b: b.checked)[:_RECHECK_MAX]
        for backup in due:
            info = self.coordinator.find_segment(backup.name)
            backup.checked = time.monotonic()
            if not _still_kept(info, backup.id, self.node_id):
                log.info("dropping the backup of %s (id %d): no longer kept for its segment",
                         backup.name, backup.id)
                self.drop(backup.name, backup.id)

    def free_all(self) -> None:
        with self._lock:
            held, self._by_id = list(self._by_id.values()), {}
        for backup in held:
            self._free(backup)


def _still_kept(info, segment_id: int, node_id: str) -> bool:
    """Whether record ``info`` (None: gone) still wants this node's backup of ``segment_id``."""
    if info is None or info.id != segment_id:
        return False
    if info.state == types_pb2.SEGMENT_STATE_DELETING:
        return False
    # LOST is not enough: a home down and not yet replaced reads LOST too, and this copy
    # may be the one to promote (a record marked lost is announced: ReleaseReplica).
    return node_id in info.backups or info.home == node_id  # home: promotion pending


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
