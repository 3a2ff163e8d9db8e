"""The home's side of backups (``replicas=k``): bring every backup to each new version.

A sync of a segment with backups runs, in the segment's gate (node/writers.py):

1. ``stage``: the changed chunks (a home writer's: hashed against what the
   backups were last sent, ``HomeSegment.pushed_hashes``; a remote writer's: the
   bytes it sent) go to every backup as version N+1, kept aside there;
2. PublishVersion (the commit point, fenced by the writer's token);
3. ``commit``: each backup applies N+1; only then does sync() return.

``restore`` replaces backups lost (dropped, promoted, their node down): a new
one is held at the published version, filled with the home's non-zero chunks and
only then added to the record (``AddBackup``), all in the segment's gate.

A backup that does not answer within ``BACKUP_TIMEOUT`` (plus its bytes at the
send rate), or refuses, is removed from the record (``DropBackup``) before the
sync goes on: a sync never waits for ever and the record never names a copy
that is not there (the segment reads DEGRADED). If even that removal cannot be
made, the sync fails: nothing unbacked is acknowledged. A fenced publish, or one
refused on its base version (a late write of a remote writer), leaves the
backups' staged bytes unapplied; the next stage replaces them.
"""
from __future__ import annotations

import logging

from vas.core.errors import Unavailable, VasError
from vas.node.publish import differing, hashes, run_views, zero_hashes
from vas.node.segments import HomeState
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

    def restore(self, segment, nodes: list[types_pb2.NodeInfo]) -> None:
        """Bring home ``segment`` back to ``replicas`` backups: drop the listed ones whose
        node is not live (``nodes``), then fill new ones on the live nodes with the most
        free memory. Also while a home writer is attached (a segment written without
        a break would otherwise never get its copies back, and the next home kill would
        lose it): see ``_fill``."""
        with segment.lock:
            info = segment.info
            if segment.state is not HomeState.LIVE:
                return
        live = {node.id: node for node in nodes}
        for node in [node for node in info.backups if node not in live]:
            self._drop_from(segment, node, Unavailable(f"node {node} is not registered"))
        with segment.lock:
            info = segment.info
        missing = info.replicas - len(info.backups)
        if missing <= 0:
            return
        roomy = sorted((node for node in nodes if node.id != self.node_id
                        and node.id not in info.backups
                        and node.memory_total - node.memory_used >= info.size),
                       key=lambda node: (node.memory_used - node.memory_total, node.id))
        for node in roomy[:missing]:
            try:
                self._fill(segment, node)
            except VasError as exc:
                log.warning("cannot make a new backup of %s on node %s: %s", segment.name,
                            node.id, exc)

    def _fill(self, segment, node: types_pb2.NodeInfo) -> None:
        """Make ``node`` a backup of home ``segment``: hold, fill with the pages' bytes
        (the non-zero chunks), then add it to the record, all in the segment's gate (no
        publish lands meanwhile). A home writer's stores since its last sync are in the
        pages, so they may be in the copy too, as they are in what the home serves; the
        chunks are hashed before they are read, so its next sync sends every chunk it
        changed since and the backup then holds exactly what that sync publishes."""
        timeout = BACKUP_TIMEOUT + segment.size / SEND_RATE
        with segment.gate.passage(timeout, f"new backup of segment {segment.name}"):
            with segment.lock:
                version = segment.info.version
            self.peers.hold_backup(node.address, segment.name, segment.id, segment.size,
                                   BACKUP_TIMEOUT, version)
            fresh = self._fill_pages(segment, node.address, version, timeout)
            info = self.coordinator.add_backup(self.node_id, segment.name, segment.id,
                                               node.id, version)
            with segment.lock:
                segment.pushed_hashes = fresh
            _adopt_backups(segment, info)
        log.info("segment %s: new backup on node %s at version %d", segment.name, node.id,
                 version)

    def _fill_pages(self, segment, address: str, version: int, timeout: float) -> bytes:
        """Send the non-zero chunks of home ``segment``'s pages to the backup at
        ``address`` (a fill of ``version``); the pages' chunk hashes."""
        with segment.pages() as view:
            fresh = hashes(view)
            with run_views(view, differing(zero_hashes(segment.size), fresh)) as pieces:
                self.peers.stage_backup(address, segment.name, segment.id, version,
                                        pieces, timeout, fill=True)
        return fresh

    def _address(self, node: str) -> str:
        address = self._node_address(node)
        if address is None:
            raise Unavailable(f"backup node {node} is not registered (down?)")
        return address

    def _drop_from(self, segment, node: str, exc: VasError) -> None:
        with segment.lock:
            info = segment.info
        _adopt_backups(segment, self._drop(info, node, exc))

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


def _adopt_backups(segment, record: types_pb2.SegmentInfo) -> None:
    """The held record of home ``segment`` with the backups and state of ``record`` (a
    new object: the one before may be being copied into a reply)."""
    with segment.lock:
        info = types_pb2.SegmentInfo()
        info.CopyFrom(segment.info)
        del info.backups[:]
        info.backups.extend(record.backups)
        info.state = record.state
        segment.info = info
