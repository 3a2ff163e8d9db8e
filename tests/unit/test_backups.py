"""A backup's versions (node/backups.py): staged bytes are applied only at a commit, at a
stage built on them (their commit was lost), or at a promotion to their version."""
from __future__ import annotations

import os

import pytest

from vas.core.errors import CapacityExceeded, InvalidArgument, NotFound, Unavailable
from vas.node.backups import Backups
from vas.node.store import Store

PAGE = 4096
SIZE = 4 * PAGE


@pytest.fixture
def backups():
    held = Backups("n2", Store(3 * SIZE), coordinator=None)
    held.hold("seg", 7, SIZE)
    yield held
    held.free_all()


def content(backups: Backups, segment_id: int = 7) -> bytes:
    return os.pread(backups.get(segment_id).memory.fd, SIZE, 0)


def test_staged_bytes_wait_for_their_commit(backups):
    assert content(backups) == bytes(SIZE) and backups.state(7) == (0, 0)
    backups.stage(7, 0, [(PAGE, b"a" * PAGE)])
    assert backups.state(7) == (0, 1) and content(backups) == bytes(SIZE)  # not applied
    backups.commit(7, 1)
    assert backups.state(7) == (1, 0) and content(backups)[PAGE:2 * PAGE] == b"a" * PAGE
    backups.commit(7, 1)  # again: a no-op
    with pytest.raises(Unavailable, match="no version 2 staged"):
        backups.commit(7, 2)


def test_a_stage_replaces_one_never_published_and_applies_one_whose_commit_was_lost(backups):
    backups.stage(7, 0, [(0, b"x" * PAGE)])   # its publish was fenced: never committed
    backups.stage(7, 0, [(0, b"y" * PAGE)])   # the next sync stages from the same base
    backups.stage(7, 1, [(PAGE, b"z" * PAGE)])  # built on 1: 1 was published, apply it
    assert backups.state(7) == (1, 2)
    assert content(backups)[:2 * PAGE] == b"y" * PAGE + bytes(PAGE)
    with pytest.raises(Unavailable, match="holds version 1, not 5"):
        backups.stage(7, 5, [])


def test_promotion_applies_the_staged_version_and_hands_the_memory_over(backups):
    backups.stage(7, 0, [(0, b"p" * PAGE)])
    with pytest.raises(Unavailable, match="holds version 0, not 3"):
        backups.promote(7, 3, lambda memory: None)
    adopted = []
    backups.promote(7, 1, adopted.append)  # the home published 1 and died before the commit
    assert os.pread(adopted[0].fd, PAGE, 0) == b"p" * PAGE
    with pytest.raises(NotFound):
        backups.state(7)
    adopted[0].release()


def test_hold_is_bounded_by_capacity_and_idempotent(backups):
    backups.hold("seg", 7, SIZE)  # held already
    backups.hold("other", 8, SIZE)
    backups.hold("third", 9, SIZE)
    with pytest.raises(CapacityExceeded):
        backups.hold("fourth", 10, SIZE)
    assert backups.drop("other", 8) and not backups.drop("other", 8)
    with pytest.raises(InvalidArgument, match=r"^range \[12288, 20480\) is outside"):
        backups.stage(7, 0, [(SIZE - PAGE, b"q" * 2 * PAGE)])
