"""ClusterStatus: one read-only transaction over nodes, segments and spaces."""
from __future__ import annotations

from vas.coordinator import keys
from vas.coordinator.etcd import Etcd, range_op
from vas.coordinator.nodes import node_of
from vas.proto import coordinator_pb2


def cluster_status(etcd: Etcd) -> coordinator_pb2.ClusterStatusResponse:
    """A summary of the cluster at one etcd revision."""
    response = etcd.txn(success=[
        range_op(keys.NODES, keys.NODES_END),
        range_op(keys.SEGMENTS, keys.prefix_end(keys.SEGMENTS)),
        range_op(keys.SPACES, keys.prefix_end(keys.SPACES), count_only=True)])
    nodes, segments, spaces = (op.response_range for op in response.responses)
    return coordinator_pb2.ClusterStatusResponse(
        etcd=etcd.url, revision=response.header.revision,
        nodes=[node_of(keys.decode(kv.value)) for kv in nodes.kvs],
        segments=len(segments.kvs),
        segment_bytes=sum(keys.decode(kv.value)["size"] for kv in segments.kvs),
        spaces=spaces.count)
