"""The agent's kept space records (node/spaces.py ``SpaceCache``): a change moves the change
counter only when something may rely on the old record (it is kept, or being read)."""
from __future__ import annotations

import threading

from vas.node.changes import COUNTER
from vas.node.spaces import SpaceCache
from vas.proto import types_pb2
from waiting import wait_for


class Coordinator:
    """``get_space`` answers a fresh record; with ``hold`` set, only once it is released."""

    def __init__(self):
        self.hold: threading.Event | None = None
        self.reading = threading.Event()
        self.revision = 10  # of the records it answers

    def get_space(self, name: str) -> types_pb2.SpaceInfo:
        self.reading.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        return types_pb2.SpaceInfo(name=name, mode=0o644, revision=self.revision)


def watching_cache() -> tuple[SpaceCache, Coordinator]:
    coordinator = Coordinator()
    cache = SpaceCache(coordinator)
    cache._watched(True)
    return cache, coordinator


def test_a_change_of_a_space_nobody_read_here_moves_nothing():
    cache, _ = watching_cache()
    before = COUNTER.value
    cache.changed("elsewhere/S")
    assert COUNTER.value == before


def test_a_change_of_a_kept_space_drops_it_and_moves_the_counter():
    cache, _ = watching_cache()
    assert cache.get("a/S").name == "a/S"
    assert "a/S" in cache._entries
    before = COUNTER.value
    cache.changed("a/S")
    assert "a/S" not in cache._entries and COUNTER.value > before


def test_any_change_while_a_read_is_under_way_moves_the_counter_and_keeps_nothing():
    cache, coordinator = watching_cache()
    coordinator.hold = threading.Event()
    reader = threading.Thread(target=cache.get, args=("a/S",))
    reader.start()
    try:
        wait_for(coordinator.reading.is_set, "the read to start")
        before = COUNTER.value
        cache.changed("other/T")  # the read's answer may be older than this
        assert COUNTER.value > before
    finally:
        coordinator.hold.set()
        reader.join(10)
    assert "a/S" not in cache._entries  # read across an event: not kept


def test_an_event_the_kept_record_already_holds_changes_nothing():
    cache, _ = watching_cache()
    cache.get("a/S")  # read at revision 10: a change made here, read back by a switch
    before = COUNTER.value
    for seen in (9, 10):  # its own event (10), or an older one still on its way (9)
        cache.changed("a/S", seen)
    assert "a/S" in cache._entries and COUNTER.value == before
    cache.changed("a/S", 11)  # a later change
    assert "a/S" not in cache._entries and COUNTER.value > before
