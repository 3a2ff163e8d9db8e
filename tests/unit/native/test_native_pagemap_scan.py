"""vas._native.pagemap_scan: PAGEMAP_SCAN over a memfd mapping of this process that is
registered for asynchronous write-protect (what a remote writer's tracking does:
vas/written.py). Pinned: written pages are reported and protected again in the same
walk, the state survives the PTE being zapped (a shmem PTE marker), a load does not
count as a write, pwrite(2) on the memfd is not seen (why the client records it),
and the argument checks. Skips, with the reason, where the kernel lacks the features.
"""
import os

import pytest

from native_checks import PS, exact
from vas import _native

TRACK = _native.UFFD_FEATURE_WP_HUGETLBFS_SHMEM | _native.UFFD_FEATURE_WP_ASYNC
FLAGS = _native.PM_SCAN_WP_MATCHING | _native.PM_SCAN_CHECK_WPASYNC
WRITTEN = _native.PAGE_IS_WRITTEN


@pytest.fixture
def tracked(memfd, mapper):
    """(memfd, mapping of 16 pages, pagemap fd, scan) with the mapping registered for
    asynchronous write-protect and protected whole."""
    fd = memfd(16)
    m = mapper(fd, 16 * PS)
    uffd = _native.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | _native.UFFD_USER_MODE_ONLY)
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _native.uffd_api(uffd, TRACK)
        except OSError as exc:
            pytest.skip(f"kernel lacks asynchronous write-protect of shmem: {exc}")
        _native.uffd_register(uffd, m.address, 16 * PS, _native.UFFDIO_REGISTER_MODE_WP)
        _native.uffd_writeprotect(uffd, m.address, 16 * PS, _native.UFFDIO_WRITEPROTECT_MODE_WP)

        def scan(flags=FLAGS):
            """Pages (indices) reported written, all regions in one call."""
            regions, walk_end = _native.pagemap_scan(pagemap, m.address, m.address + 16 * PS,
                                                     WRITTEN, WRITTEN, flags)
            assert walk_end == m.address + 16 * PS
            return [page for start, end, categories in regions
                    for page in range((start - m.address) // PS, (end - m.address) // PS)
                    if categories == WRITTEN]

        try:
            assert scan() == []
        except OSError as exc:
            pytest.skip(f"kernel lacks PAGEMAP_SCAN: {exc}")
        yield fd, m, pagemap, scan
    finally:
        os.close(pagemap)
        os.close(uffd)


def test_written_pages_reported_and_protected_again(tracked):
    _, m, _, scan = tracked
    view = memoryview(m)
    view[3 * PS] = 1
    view[4 * PS - 1] = 2  # the last byte of page 3 too
    view[15 * PS + 7] = 3
    assert scan(flags=0) == [3, 15]  # without WP_MATCHING: reported, left as they are
    assert scan() == [3, 15]
    assert scan() == []  # protected again by the walk above
    view[3 * PS + 100] = 4
    assert scan() == [3]
    view.release()


def test_state_survives_a_zap_and_loads_do_not_count(tracked):
    _, m, _, scan = tracked
    view = memoryview(m)
    view[2 * PS] = 9
    m.madvise(_native.MADV_DONTNEED)  # zaps the PTEs: shmem keeps markers in their place
    assert view[2 * PS] == 9 and view[5 * PS] == 0  # loads fault the pages back
    assert scan() == [2]
    m.madvise(_native.MADV_DONTNEED)
    view[5 * PS] = 1  # a store to a zapped, protected page
    assert scan() == [5]
    view.release()


def test_kernel_stores_count_and_pwrite_does_not(tracked):
    fd, m, _, scan = tracked
    view = memoryview(m)
    r, w = os.pipe()
    try:
        os.write(w, b"K")
        assert os.readv(r, [view[6 * PS:6 * PS + 1]]) == 1  # the kernel stores (copy_to_user)
    finally:
        os.close(r)
        os.close(w)
    os.pwrite(fd, b"P", 9 * PS)  # the page cache, not the page tables
    assert view[9 * PS] == ord("P")
    assert scan() == [6]
    view.release()


def test_walk_stops_when_regions_run_out(tracked):
    _, m, pagemap, _ = tracked
    view = memoryview(m)
    for page in (1, 3, 5):
        view[page * PS] = 1
    regions, walk_end = _native.pagemap_scan(pagemap, m.address, m.address + 16 * PS,
                                             WRITTEN, WRITTEN, FLAGS, max_regions=2)
    assert [(s - m.address) // PS for s, _, _ in regions] == [1, 3]
    assert m.address + 4 * PS <= walk_end <= m.address + 5 * PS
    regions, walk_end = _native.pagemap_scan(pagemap, walk_end, m.address + 16 * PS,
                                             WRITTEN, WRITTEN, FLAGS)
    assert [(s - m.address) // PS for s, _, _ in regions] == [5]
    view.release()


def test_argument_checks(tracked):
    fd, m, pagemap, _ = tracked
    bounds = exact("start and end must be multiples of the page size and start <= end")
    with pytest.raises(ValueError, match=bounds):
        _native.pagemap_scan(pagemap, m.address + 1, m.address + PS, WRITTEN, WRITTEN)
    with pytest.raises(ValueError, match=bounds):
        _native.pagemap_scan(pagemap, m.address + PS, m.address, WRITTEN, WRITTEN)
    for bad in (0, 65537):
        with pytest.raises(ValueError, match=exact("max_regions must be 1..65536")):
            _native.pagemap_scan(pagemap, m.address, m.address + PS, WRITTEN, WRITTEN,
                                 max_regions=bad)
    with pytest.raises(OSError):  # not a pagemap file (ENOTTY)
        _native.pagemap_scan(fd, m.address, m.address + PS, WRITTEN, WRITTEN)
