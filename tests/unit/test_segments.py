"""Life cycles of home segments and replicas, and the publish gate: pure logic, no daemons."""
from __future__ import annotations

import threading

import pytest

from vas.core.errors import Unavailable
from vas.node.segments import (Gate, HomeSegment, HomeState, IllegalMove, Replica, ReplicaState,
                               WriterState)
from vas.node.changes import COUNTER
from vas.node.store import Memory
from vas.proto import types_pb2


def home(name="seg", segment_id=1) -> HomeSegment:
    return HomeSegment(types_pb2.SegmentInfo(name=name, id=segment_id, size=4096),
                       Memory(4096, -1, -1))


def replica(name="seg", segment_id=1) -> Replica:
    return Replica(types_pb2.SegmentInfo(name=name, id=segment_id, size=4096),
                   Memory(4096, -1, -1))


@pytest.mark.parametrize("path", [
    [HomeState.DELETING, HomeState.FREED],
    [HomeState.CLAIMED, HomeState.LIVE, HomeState.CLAIMED, HomeState.DELETING, HomeState.FREED],
])
def test_home_segments_move_along_their_table(path):
    segment = home()
    for state in path:
        segment.move(state)
    assert segment.state is path[-1]


@pytest.mark.parametrize("start, illegal", [
    ([], HomeState.FREED),                                        # never freed while live
    ([HomeState.DELETING], HomeState.LIVE),                       # a delete is one-way
    ([HomeState.DELETING, HomeState.FREED], HomeState.DELETING),  # freed is final
    ([HomeState.DELETING], HomeState.CLAIMED),
])
def test_home_segments_refuse_moves_off_their_table(start, illegal):
    segment = home()
    for state in start:
        segment.move(state)
    with pytest.raises(IllegalMove, match=f"-> {illegal.value}"):
        segment.move(illegal)
    assert segment.state is (start[-1] if start else HomeState.LIVE)


def test_replicas_retire_before_they_are_freed():
    r = replica()
    with pytest.raises(IllegalMove):
        r.move(ReplicaState.FREED)
    r.move(ReplicaState.RETIRED)
    with pytest.raises(IllegalMove):
        r.move(ReplicaState.CURRENT)
    r.move(ReplicaState.FREED)
    assert r.state is ReplicaState.FREED


def test_the_writer_slot_is_freed_only_by_its_holder():
    segment, holder, other = home(), object(), object()
    segment.take_writer_locked(holder)
    segment.free_writer_locked(other)
    assert (segment.writer_state, segment.writer) == (WriterState.HELD, holder)
    segment.free_writer_locked(holder)
    assert (segment.writer_state, segment.writer) == (WriterState.FREE, None)


def test_versions_only_grow():
    segment = home()
    segment.adopt_version_locked(5)
    segment.adopt_version_locked(3)
    assert segment.info.version == 5


def test_the_change_counter_moves_when_the_record_does_not_when_a_reread_finds_it_same():
    """Same, or other only in other nodes' attachments and copies: no move."""
    segment = home()
    before = COUNTER.value
    same = types_pb2.SegmentInfo()
    same.CopyFrom(segment.info)
    segment.info = same
    busy = types_pb2.SegmentInfo()
    busy.CopyFrom(segment.info)
    busy.attachments, busy.attached_nodes[:] = 3, ["node2"]  # other nodes' activity
    segment.info = busy
    assert COUNTER.value == before
    changed = types_pb2.SegmentInfo()
    changed.CopyFrom(segment.info)
    changed.mode = 0o600
    segment.info = changed
    assert COUNTER.value > before


def test_the_gate_lets_one_through_and_times_out_the_next():
    gate = Gate(threading.Lock())
    inside, leave = threading.Event(), threading.Event()

    def first():
        with gate.passage(5.0, "first"):
            inside.set()
            leave.wait(5.0)

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(5.0)
    with pytest.raises(Unavailable, match="sync of x: still busy with earlier work"):
        with gate.passage(0.05, "sync of x"):
            pass
    leave.set()
    thread.join(5.0)
    with gate.passage(1.0, "after"):  # free again once the first left
        pass


def test_the_gate_is_left_when_the_work_fails():
    gate = Gate(threading.Lock())
    with pytest.raises(RuntimeError):
        with gate.passage(1.0, "failing"):
            raise RuntimeError("boom")
    with gate.passage(0.1, "next"):
        pass
