"""The home's side of backups (``replicas=k``): bring every backup to each new version.

A sync of a segment with backups runs, in the segment's gate (node/writers.py):

1. ``stage``: the changed chunks (a home writer's: hashed against what the
   backups were last sent, ``HomeSegment.pushed_hashes``; a remote writer's: the
   bytes it sent) go to every backup as version N+1, kept aside there;
2. PublishVersion (the commit point, fenced by the writer's token);
3. ``commit``: each backup applies N+1; only then does sync() return.

A backup that does not answer within ``BACKUP_TIMEOUT`` (plus its bytes at the
send rate), or refuses, is removed from the record (``DropBackup``) before the
sync goes on: a sync never waits for ever and the record never names a copy
that is not there (the segment reads DEGRADED). If even that removal cannot be
made, the sync fails: nothing unbacked is acknowledged. A fenced publish leaves
the backups' staged bytes unapplied; the next stage replaces them.
"""
from __future__ import annotations

import logging

from vas.core.errors import Unavailable, VasError
from vas.proto import types_pb2

log = logging.getLogger(__name__)

#: Seconds a backup has to answer a call (plus its bytes at ``SEND_RATE``).
BACKUP_TIMEOUT = 2.0
#: Bytes per second a backup is given to take a stage.
SEND_RATE = 50e6


class BackupPush:
    """Calls to the backups of this node's home segments (see the module docstring)."""

    def __init__(self, node_id: str, coordinator, peers, node_address):
        self.node_id = node_id
        self.coordinator = coordinator
        self.peers = peers
        self._node_address = node_address  # node id -> gRPC address, None if not registered

    def hold(self, info: types_pb2.SegmentInfo) -> types_pb2.SegmentInfo:
        """Have each backup node of new segment ``info`` make its (all-zero) copy; the
        record without those that could not."""
        for node in list(info.backups):
            try:
                self.peers.hold_backup(self._address(node), info.name, info.id, info.size,
                                       BACKUP_TIMEOUT)
            except VasError as exc:
                info = self._drop(info, node, exc)
        return info

    def stage(self, segment, pieces: list) -> list[tuple[str, str]]:
        """Send ``pieces`` ((offset, bytes-like)) to every backup of home ``segment`` as
        its next version (the caller is in its gate); the (node, address) that took them.
        The others are dropped from the record."""
        with segment.lock:
            info = segment.info
            backups, base = list(info.backups), info.version
        timeout = BACKUP_TIMEOUT + sum(len(data) for _, data in pieces) / SEND_RATE
        staged = []
        for node in backups:
            try:
                address = self._address(node)
                self.peers.stage_backup(address, info.name, info.id, base, pieces, timeout)
                staged.append((node, address))
            except VasError as exc:
                self._drop_from(segment, node, exc)
        return staged

    def commit(self, segment, version: int, staged: list[tuple[str, str]]) -> None:
        """Have the backups that took the stage apply ``version`` (published now)."""
        for node, address in staged:
            try:
                self.peers.commit_backup(address, segment.name, segment.id, version,
                                         BACKUP_TIMEOUT)
            except VasError as exc:
                self._drop_from(segment, node, exc)

    def _address(self, node: str) -> str:
        address = self._node_address(node)
        if address is None:
            raise Unavailable(f"backup node {node} is not registered (down?)")
        return address

    def _drop_from(self, segment, node: str, exc: VasError) -> None:
        with segment.lock:
            info = segment.info
        fresh = self._drop(info, node, exc)
        with segment.lock:
            del segment.info.backups[:]
            segment.info.backups.extend(fresh.backups)
            segment.info.state = fresh.state

    def _drop(self, info: types_pb2.SegmentInfo, node: str, exc: VasError
              ) -> types_pb2.SegmentInfo:
        """Remove ``node`` from the backups of ``info``; the record after. Raises
        Unavailable when the coordinator cannot do it (the caller's sync fails)."""
        log.warning("backup of %s on node %s failed (%s): dropping it, the segment is "
                    "degraded", info.name, node, exc)
        try:
            return self.coordinator.drop_backup(self.node_id, info.name, info.id, node)
        except VasError as drop_exc:
            raise Unavailable(f"backup of segment {info.name} on node {node} failed ({exc}) "
                              f"and cannot be dropped from its record: {drop_exc}") from exc
