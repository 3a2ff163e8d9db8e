"""vas/written.py: a remote writer's written-page tracking on a real memfd mapping of
this process (the cluster path is in tests/integration/test_publish.py)."""
import os
import random

import pytest

from vas import _native
from vas.core import fetch
from vas.written import GRAIN, WrittenPages, _merged

PS = _native.PAGE_SIZE
SIZE = 8 * GRAIN + 3 * PS  # a tail shorter than a grain


@pytest.fixture
def mapping():
    fd = _native.memfd_create("written-test")
    _native.fallocate(fd, 0, SIZE)
    m = _native.mmap(fd, SIZE, writable=True)
    yield fd, m
    m.close()
    os.close(fd)


@pytest.fixture
def tracker(mapping):
    _, m = mapping
    written = WrittenPages.start(m.address, SIZE)
    if written is None:
        pytest.skip("this kernel cannot track writes (Linux 6.7: WP_ASYNC, PAGEMAP_SCAN)")
    yield written
    written.close()


def grains(ranges):
    return {g for offset, length in ranges for g in range(offset // GRAIN,
                                                          -(-(offset + length) // GRAIN))}


def test_random_stores_found_once_each(mapping, tracker):
    _, m = mapping
    view = memoryview(m)
    rng = random.Random(7)
    for _ in range(5):
        touched = set()
        for _ in range(rng.randrange(1, 12)):
            at = rng.choice([rng.randrange(SIZE), rng.randrange(9) * GRAIN - 1,
                             rng.randrange(8) * GRAIN])
            at = min(max(at, 0), SIZE - 1)
            view[at] = rng.randrange(256)  # single bytes, grain edges included
            touched.add(at // GRAIN)
        ranges, tracked = tracker.take()
        assert tracked and grains(ranges) == touched
        assert all(0 <= o and o + n <= SIZE for o, n in ranges)
        assert tracker.take() == ([], True)
    view.release()


def test_noted_and_restored_ranges_come_back(mapping, tracker):
    fd, m = mapping
    os.pwrite(fd, b"x" * 5, 3 * GRAIN + 10)  # past the page tables: noted by write()
    tracker.note(3 * GRAIN + 10, 5)
    ranges, tracked = tracker.take()
    assert tracked and ranges == [(3 * GRAIN, GRAIN)]
    tracker.restore(ranges, tracked)  # that sync failed
    memoryview(m)[SIZE - 1] = 1
    assert tracker.take() == ([(3 * GRAIN, GRAIN), (8 * GRAIN, 3 * PS)], True)
    assert tracker.take() == ([], True)


def test_fork_stops_tracking(mapping, tracker):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    memoryview(mapping[1])[0] = 1
    assert tracker.take() == ([], False)  # every later sync hashes
    assert tracker.take() == ([], False)


def test_disabled_means_hashing(mapping, monkeypatch):
    monkeypatch.setenv(fetch.DISABLE_USERFAULTFD_ENV, "1")
    monkeypatch.setattr(fetch, "_write_tracking_ok", None)
    assert WrittenPages.start(mapping[1].address, SIZE) is None


def test_merged():
    assert _merged([], GRAIN, 4 * GRAIN) == []
    assert _merged([(GRAIN - 1, 2), (3 * GRAIN, 0), (2 * GRAIN, 1)], GRAIN, 4 * GRAIN) == \
        [(0, 3 * GRAIN)]
    assert _merged([(3 * GRAIN + 5, 1)], GRAIN, 3 * GRAIN + 100) == [(3 * GRAIN, 100)]


def test_mostly_written_backs_off_to_hashing(mapping, tracker):
    """A scan finding most pages written leaves them unprotected and the next syncs
    hash (1, then 2 while it repeats); the last hashing sync protects again, and one
    that fails makes the next hash too."""
    _, m = mapping
    view = memoryview(m)
    view[:] = b"\1" * SIZE  # every page
    ranges, tracked = tracker.take()
    assert tracked and ranges == [(0, SIZE)]  # this sync still knows them
    view[0] = 2
    assert tracker.take() == ([], False)  # backing off: hash (and protect again)
    view[:] = b"\4" * SIZE  # mostly written again at once: back off for 2 syncs
    assert tracker.take()[1]
    assert tracker.take() == ([], False)
    ranges, tracked = tracker.take()  # the last: protects again
    assert (ranges, tracked) == ([], False)
    tracker.restore(ranges, tracked)  # ... and that sync failed: hash again
    view[GRAIN] = 5
    assert tracker.take() == ([], False)
    view[2 * GRAIN] = 6
    assert tracker.take() == ([(2 * GRAIN, GRAIN)], True)  # tracked again
    view.release()
