"""Where backups of replicas=k go, and the states their liveness derives (pure logic)."""
from __future__ import annotations

import doctest

import pytest

from vas.coordinator import segments
from vas.coordinator.segments import place_backups, state_of
from vas.core.errors import CapacityExceeded
from vas.proto import types_pb2

MiB = 1 << 20


def node(node_id: str, total: int, used: int) -> dict:
    return {"id": node_id, "memory_total": total, "memory_used": used}


def test_doctests():
    assert doctest.testmod(segments).failed == 0


def test_backups_go_to_the_other_nodes_with_the_most_room():
    nodes = [node("a", 64 * MiB, 0), node("b", 64 * MiB, 40 * MiB), node("c", 64 * MiB, 8 * MiB),
             node("d", 64 * MiB, 60 * MiB)]
    assert place_backups(nodes, "a", 8 * MiB, 1) == ["c"]
    assert place_backups(nodes, "a", 8 * MiB, 2) == ["b", "c"]  # d has 4 MiB: no room
    assert place_backups(nodes, "c", 8 * MiB, 2) == ["a", "b"]
    # Ties go by id, so racing creates see the same order.
    assert place_backups([node("z", 8, 0), node("y", 8, 0), node("h", 8, 0)], "h", 4, 1) == ["y"]


def test_too_few_nodes_with_room_is_capacity_exceeded():
    nodes = [node("a", 64 * MiB, 0), node("b", 64 * MiB, 60 * MiB)]
    with pytest.raises(CapacityExceeded, match=r"^replicas=1: only 0 of the live nodes other "
                                               r"than the home 'a' have 8 MiB free, 1 needed$"):
        place_backups(nodes, "a", 8 * MiB, 1)


@pytest.mark.parametrize("record, live, state", [
    ({"home": "a", "replicas": 1, "backups": ["b"]}, {"a", "b"}, "READY"),
    ({"home": "a", "replicas": 1, "backups": ["b"]}, {"a"}, "DEGRADED"),
    ({"home": "a", "replicas": 2, "backups": ["b"]}, {"a", "b"}, "DEGRADED"),  # one dropped
    ({"home": "a", "replicas": 1, "backups": ["b"]}, {"b"}, "LOST"),  # until b is promoted
    ({"home": "a", "replicas": 0}, {"a"}, "READY"),  # a record without the key
    ({"home": "a", "replicas": 1, "backups": ["b"], "lost": True}, {"a", "b"}, "LOST"),
])
def test_state_of_counts_live_backups(record, live, state):
    assert state_of({"deleting": False, **record}, live) == \
        getattr(types_pb2, f"SEGMENT_STATE_{state}")
