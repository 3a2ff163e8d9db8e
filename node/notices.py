"""Telling the nodes that hold replicas of a gone segment to drop them.

Replicas stay after their last detach (a later attach costs no transfer), so
without a word from elsewhere a deleted segment's replica on another node
would hold its memory and fds until an attach there re-reads the record, the
node needs the room, or the periodic check (``Replicas.recheck_stale``) finds
the record gone. Agents do not watch the coordinator (a Watch over every
segment cost each agent ~1 ms of CPU per create+delete), and a broadcast to
every node would cost every delete O(nodes) calls. Instead each node reports
the replicas it holds (``AttachmentCount.copy``: the attach key stays at count
0), the call that removes or marks a record returns the nodes that reported
one (``SegmentInfo.copies`` of DeleteSegment, ``FinishDeleteResponse.copies``,
the records RegisterNode marked lost), and the agent that made that call
hands them to ``ReplicaNotices.tell``. Only segments that have replicas cost
anything.

A background thread sends ``Node.ReleaseReplica`` to each named node (one
ListNodes per batch for the addresses), off the caller's path: a delete does
not wait for other nodes, and no lock is held across those calls. A notice
that cannot be delivered (the node is down or cut off) is logged and dropped:
that node's periodic check retires the replica later, and a node that
restarted holds no replicas anyway.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable

from vas.core.errors import VasError

log = logging.getLogger(__name__)

#: Seconds a ReleaseReplica may take: a notice is a courtesy (the periodic check
#: is the guarantee), so a dead node must not hold up the ones behind it.
NOTICE_TIMEOUT = 2.0
#: Most notices waiting; beyond that new ones are dropped (and logged): the
#: periodic checks of the nodes heal them.
MAX_PENDING = 100_000


class ReplicaNotices:
    """The queue of ``(name, id, nodes)`` to tell, and the thread telling them.

    ``drop_here(name, id)`` retires this node's own replica (a node is never
    told over the network about its own copy).

    Example::

        notices = ReplicaNotices("node1", coordinator, peers, replicas.drop)
        threading.Thread(target=notices.run, args=(stop,)).start()
        notices.tell("weights", 1234, ["node2", "node3"])
    """

    def __init__(self, node_id: str, coordinator, peers,
                 drop_here: Callable[[str, int], bool], timeout: float = NOTICE_TIMEOUT):
        self.node_id = node_id
        self.coordinator = coordinator
        self.peers = peers
        self._drop_here = drop_here
        self._timeout = timeout
        self._pending: queue.SimpleQueue = queue.SimpleQueue()

    def tell(self, name: str, segment_id: int, nodes: Iterable[str]) -> None:
        """Tell ``nodes`` soon that segment ``segment_id`` is gone (nothing if none)."""
        nodes = list(nodes)
        if not nodes:
            return
        if self._pending.qsize() >= MAX_PENDING:
            log.warning("too many replica notices pending: not telling %s that segment %s "
                        "(id %d) is gone (their periodic check will)", ", ".join(nodes), name,
                        segment_id)
            return
        self._pending.put((name, segment_id, nodes))

    def stop(self) -> None:
        self._pending.put(None)

    def run(self, stop: threading.Event) -> None:
        """The notice thread: send each batch of queued notices, until ``stop``."""
        while not stop.is_set():
            first = self._pending.get()
            if first is None:
                continue
            batch = [first]
            while True:
                try:
                    notice = self._pending.get_nowait()
                except queue.Empty:
                    break
                if notice is not None:
                    batch.append(notice)
            self._send(batch)

    def _send(self, batch: list[tuple[str, int, list[str]]]) -> None:
        addresses = None
        for name, segment_id, nodes in batch:
            for node in nodes:
                if node == self.node_id:
                    self._drop_here(name, segment_id)
                    continue
                if addresses is None:
                    addresses = self._addresses()
                address = addresses.get(node)
                if address is None:
                    continue  # not registered: it restarts without replicas, or re-checks
                try:
                    self.peers.release_replica(address, name, segment_id, self._timeout)
                except VasError as exc:
                    log.info("cannot tell node %s that segment %s (id %d) is gone: %s (its "
                             "periodic check will retire the replica)", node, name,
                             segment_id, exc)

    def _addresses(self) -> dict[str, str]:
        try:
            return {node.id: node.address for node in self.coordinator.list_nodes().nodes}
        except VasError as exc:
            log.info("cannot list the nodes to tell about deleted segments: %s", exc)
            return {}
