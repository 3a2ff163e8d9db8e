"""Chunk arithmetic of sync/refresh (node/publish.py): hashing, diffs, runs, staging."""
from __future__ import annotations

import doctest

import pytest

from vas.core.errors import InvalidArgument
from vas.node import lazy, publish
from vas.node.publish import CHUNK, RUN, Staged, chunks_of, differing, hashes, runs, stale_runs


def test_doctests():
    assert doctest.testmod(publish).failed == 0


def test_a_changed_byte_changes_only_its_chunks_hash():
    data = bytearray(4 * CHUNK + 100)  # a short last chunk too
    before = hashes(memoryview(data))
    assert len(before) == 8 * 5
    data[2 * CHUNK + 17] = 1
    data[-1] = 2
    assert differing(before, hashes(memoryview(data))) == [2, 4]


def test_differing_needs_equal_lengths():
    with pytest.raises(ValueError):
        differing(bytes(8), bytes(16))


def test_chunks_of_checks_bounds():
    size = 3 * CHUNK
    assert chunks_of([], size) == []
    assert chunks_of([(CHUNK - 1, 2), (0, 0)], size) == [0, 1]
    with pytest.raises(InvalidArgument):
        chunks_of([(size - 1, 2)], size)
    with pytest.raises(InvalidArgument):
        chunks_of([(-1, 1)], size)


def test_runs_merge_neighbours_up_to_the_limit_and_clip_the_last_chunk():
    size = 20 * CHUNK + 10
    assert runs([], size) == []
    merged = runs(list(range(20)) + [20], size)
    assert sum(length for _, length in merged) == size
    assert all(length <= RUN for _, length in merged)
    assert merged[-1][0] + merged[-1][1] == size
    assert runs([1, 3], size) == [(CHUNK, CHUNK), (3 * CHUNK, CHUNK)]


def test_stale_runs_of_a_lazy_replica_cover_only_present_fill_chunks():
    home = bytearray(4 * CHUNK)
    home[0] = home[CHUNK] = home[3 * CHUNK] = 7
    remote = hashes(memoryview(home))
    replica = bytearray(4 * CHUNK)  # stale everywhere but chunk 2
    assert stale_runs(memoryview(replica), remote, None) == [(0, 2 * CHUNK), (3 * CHUNK, CHUNK)]
    fills = CHUNK // lazy.CHUNK
    present = bytearray(4 * fills)
    present[0:fills] = b"\1" * fills  # chunk 0 whole and stale: fetched whole
    # chunk 1: nothing present: skipped (fetched fresh when touched)
    present[2 * fills] = 1             # chunk 2: equal to the home's: skipped
    present[3 * fills] = 1             # chunk 3 stale, one fill chunk present: only it
    runs_ = stale_runs(memoryview(replica), remote, present)
    assert runs_[0] == (0, CHUNK)
    assert (3 * CHUNK, lazy.CHUNK) in runs_
    assert all(length > 0 for _, length in runs_)


def test_staged_bytes_are_bounded_by_the_segment():
    staged = Staged(2 * CHUNK)
    staged.add(0, b"x" * CHUNK)
    staged.add(CHUNK, b"")
    with pytest.raises(InvalidArgument):
        staged.add(2 * CHUNK - 1, b"yy")
    with pytest.raises(InvalidArgument):
        for _ in range(2):
            staged.add(0, b"z" * CHUNK)  # more than the segment holds in all
    assert staged.pieces[0] == (0, b"x" * CHUNK)
