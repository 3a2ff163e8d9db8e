"""ClusterStatus: one read-only transaction over nodes, members, segments and spaces.

Besides the totals it names what needs an operator's eye:

- **down nodes**: members whose node key is gone (their lease lapsed; nodes.py);
- **lost segments**: state LOST (``segments.state_of``): the home is not
  registered (down, or gone) or the record is marked lost. Read replicas never
  serve a segment whose home is gone; backups do, once one is promoted
  (coordinator/promote.py), until then the segment reads lost;
- **degraded segments**: the home is up (state READY) but a node that held a
  replica of this incarnation is down: the segment is served, one of its
  copies went with that node (the replicas recorded in its member record when
  it went down). Removing the node (``vasctl node rm``) clears it.
"""
from __future__ import annotations

from vas.coordinator import keys
from vas.coordinator.etcd import Etcd, range_op
from vas.coordinator.nodes import down_node_of, node_of
from vas.coordinator.segments import Entry, state_of
from vas.proto import coordinator_pb2, types_pb2


def cluster_status(etcd: Etcd) -> coordinator_pb2.ClusterStatusResponse:
    """A summary of the cluster at one etcd revision."""
    response = etcd.txn(success=[
        range_op(keys.NODES, keys.NODES_END),
        range_op(keys.SEGMENTS, keys.prefix_end(keys.SEGMENTS)),
        range_op(keys.SPACES, keys.prefix_end(keys.SPACES), count_only=True),
        range_op(keys.MEMBERS, keys.MEMBERS_END)])
    nodes, segments, spaces, members = (op.response_range for op in response.responses)
    live = [node_of(keys.decode(kv.value)) for kv in nodes.kvs]
    live_ids = {node.id for node in live}
    down, lost_copies = [], set()
    for kv in members.kvs:
        member = keys.decode(kv.value)
        if member["id"] not in live_ids:
            down.append(down_node_of(member))
            lost_copies.update((name, segment_id) for name, segment_id in member["replicas"])
    entries = [Entry.from_kv(kv) for kv in segments.kvs]
    lost, degraded = [], []
    for entry in entries:
        state = state_of(entry.record, live_ids)
        ref = coordinator_pb2.SegmentRef(name=entry.name, id=entry.id)
        if state == types_pb2.SEGMENT_STATE_LOST:
            lost.append(ref)
        elif state == types_pb2.SEGMENT_STATE_DEGRADED or (
                state == types_pb2.SEGMENT_STATE_READY and (entry.name, entry.id) in lost_copies):
            degraded.append(ref)
    return coordinator_pb2.ClusterStatusResponse(
        etcd=etcd.url, revision=response.header.revision, nodes=live,
        segments=len(entries), segment_bytes=sum(e.record["size"] for e in entries),
        spaces=spaces.count, down_nodes=down, lost=lost, degraded=degraded)
