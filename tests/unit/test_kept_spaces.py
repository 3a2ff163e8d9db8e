"""The spaces a Client remembers between switches (vas/spaceview.py ``KeptMembers``): only
at the change counter value they were read at, never an older answer over a newer one."""
from __future__ import annotations

from vas.core.types import SpaceInfo
from vas.spaceview import KeptMembers, SpaceView


def space(name: str, *members: str) -> SpaceInfo:
    return SpaceInfo(name, 0o644, 0, 0, dict.fromkeys(members, "r"), 1.0)


def test_a_space_is_reused_only_at_the_value_it_was_read_at():
    kept = KeptMembers()
    kept.remember_space("A", space("A", "x"), 7)
    kept.remember_space("B", space("B", "y"), 7)
    assert kept.space_at("A", 7) == space("A", "x") and kept.space_at("B", 7) == space("B", "y")
    assert kept.space_at("A", 8) is None and kept.space_at("C", 7) is None

    kept.remember_space("A", space("A", "x", "z"), 0)  # holds at no value: not kept
    assert kept.space_at("A", 7) == space("A", "x")
    kept.remember_space("A", space("A", "z"), 9)  # a newer value forgets the older ones
    assert kept.space_at("A", 9) == space("A", "z") and kept.space_at("B", 9) is None
    kept.remember_space("B", space("B", "old"), 8)  # an answer older than what is kept
    assert kept.space_at("B", 8) is None and kept.space_at("B", 9) is None


def test_each_view_gets_its_own_copy_of_the_space():
    kept = KeptMembers()
    kept.remember_space("A", space("A", "x"), 3)
    first = SpaceView(kept.space_at("A", 3), {})
    first.info.members["mine"] = "rw"  # a view changes its own copy only
    assert first.info.members == {"x": "r", "mine": "rw"}
    assert kept.space_at("A", 3).members == {"x": "r"}
    assert SpaceView(kept.space_at("A", 3), {}).info.members == {"x": "r"}
