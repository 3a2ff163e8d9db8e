"""Pages that can no longer be fetched, without daemons: ``LazyFill`` losing its
home's bytes, ``HomeReader`` telling a gone home from a failing one, and the
``FaultHandler`` (node/faults.py) poisoning a fault (a real userfaultfd on a lazy-style mapping of
this process) after ``fault_timeout`` or at once when the pages are lost.

The faulting reads are made by a system call (``os.write`` from the mapping into a
pipe), so a poisoned page fails them with EFAULT instead of killing pytest with
SIGBUS (tests/faults/ checks the SIGBUS of real client processes).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time

import pytest

from vas import _native
from vas.core import fetch as fetch_mode
from vas.core.errors import NotFound, Unavailable
from vas.node import faults, lazy
from vas.node import store as store_mod

from waiting import wait_for

PS = _native.PAGE_SIZE
SIZE = 4 * lazy.CHUNK
WAIT = 10.0


class Fetch:
    """A LazyFill fetch: copies ``data`` into ``fd`` (if any), or raises ``error`` when
    set; ``gate`` holds it."""

    def __init__(self, fd: int = -1, data: bytes = b""):
        self.fd, self.data = fd, data
        self.error: BaseException | None = None
        self.calls: list[tuple[int, int, float | None]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, offset: int, length: int, deadline: float | None = None) -> None:
        self.calls.append((offset, length, deadline))
        assert self.gate.wait(WAIT)
        if self.error is not None:
            raise self.error
        if self.fd >= 0:
            os.pwrite(self.fd, self.data[offset:offset + length], offset)


# ---------------------------------------------------------------- LazyFill


def test_a_lost_fill_serves_present_chunks_and_refuses_missing_ones():
    fill = lazy.LazyFill(SIZE, Fetch())
    fill.ensure(0, 1)  # chunk 0 present
    assert fill.lose("segment s was deleted")
    assert not fill.lose("again")  # once
    assert fill.life is lazy.FillState.LOST
    fill.ensure(0, lazy.CHUNK)
    with pytest.raises(lazy.PagesLost, match="segment s was deleted"):
        fill.ensure(lazy.CHUNK, 1)
    fill.close()
    assert fill.life is lazy.FillState.CLOSED
    with pytest.raises(lazy.PagesLost, match="deleted"):
        fill.ensure(lazy.CHUNK, 1)


def _fetch_held(fill: lazy.LazyFill, fetch: Fetch) -> threading.Thread:
    """A thread whose fetch of chunk 0 is held (``fetch.gate``) until the test sets it."""
    fetch.gate.clear()
    holder = threading.Thread(target=lambda: _quietly(fill.ensure, 0, 1), daemon=True)
    holder.start()
    wait_for(lambda: fetch.calls, "the first fetch")
    return holder


def test_losing_wakes_the_threads_waiting_for_a_fetch():
    fetch = Fetch()
    fill = lazy.LazyFill(SIZE, fetch)
    first = _fetch_held(fill, fetch)
    errors: list[BaseException] = []
    waiter = threading.Thread(target=lambda: _record(errors, fill.ensure, 0, 1), daemon=True)
    waiter.start()  # waits for the chunk being fetched (or, if it comes late, sees it lost)
    fill.lose("home gone")
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], lazy.PagesLost)
    fetch.gate.set()
    first.join(WAIT)


def test_a_fetch_raising_pages_lost_loses_the_fill_and_tells_once():
    fetch = Fetch()
    fetch.error = lazy.PagesLost("home node n1 is not registered (down?)", home_gone=True)
    told: list[lazy.PagesLost] = []
    fill = lazy.LazyFill(SIZE, fetch, on_lost=told.append)
    for _ in range(2):
        with pytest.raises(lazy.PagesLost):
            fill.ensure(lazy.CHUNK, 1)
    assert fill.life is lazy.FillState.LOST
    assert len(fetch.calls) == 1 and len(told) == 1 and told[0].home_gone
    assert fill.present_run(1, 1) == 0


def test_waiting_for_another_fetch_ends_at_the_deadline():
    fetch = Fetch()
    fill = lazy.LazyFill(SIZE, fetch)
    holder = _fetch_held(fill, fetch)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="timed out"):
        fill.ensure(0, 1, deadline=time.monotonic() + 0.2)
    assert time.monotonic() - started < WAIT / 2
    fetch.gate.set()
    holder.join(WAIT)


# ---------------------------------------------------------------- HomeReader


def test_the_home_answering_not_found_is_pages_lost():
    def open_bulk(address, name, segment_id):
        raise Unavailable("no bulk listener")

    def read_pages(address, offset, length, timeout):
        raise NotFound("segment id 7 is not held by node n1")

    homes = lazy.Homes(lambda node: "grpc-of-n1", open_bulk, WAIT)
    memory = store_mod.Memory.allocate("replica", 4 * lazy.CHUNK, reserve=False, mapped=True)
    reader = lazy.HomeReader(homes, "n1", "seg", 7, memory.mapping, read_pages)
    try:
        with pytest.raises(lazy.PagesLost, match="no longer holds segment seg") as info:
            reader(0, lazy.CHUNK)
        assert not info.value.home_gone
    finally:
        reader.close()
        homes.close()
        memory.release()


def test_a_home_missing_from_list_nodes_is_gone():
    homes = lazy.Homes(lambda node: None, lambda *args: None, WAIT)
    memory = store_mod.Memory.allocate("replica", 4 * lazy.CHUNK, reserve=False, mapped=True)
    reader = lazy.HomeReader(homes, "n1", "seg", 7, memory.mapping, lambda *args: None)
    try:
        with pytest.raises(lazy.PagesLost, match="home node n1 is not registered") as info:
            reader(0, lazy.CHUNK)
        assert info.value.home_gone
    finally:
        reader.close()
        homes.close()
        memory.release()


def test_a_reader_out_of_time_does_not_call_the_home():
    calls = []
    homes = lazy.Homes(lambda node: "grpc-of-n1", lambda *args: None, WAIT)
    memory = store_mod.Memory.allocate("replica", 4 * lazy.CHUNK, reserve=False, mapped=True)
    reader = lazy.HomeReader(homes, "n1", "seg", 7, memory.mapping, lambda *args: calls.append(args))
    reader._bulk_after = time.monotonic() + 60  # straight to ReadPages
    try:
        with pytest.raises(Unavailable, match="out of time"):
            reader(0, lazy.CHUNK, deadline=time.monotonic() - 1)
        assert calls == []
    finally:
        reader.close()
        homes.close()
        memory.release()


# ---------------------------------------------------------------- FaultHandler


needs_poison = pytest.mark.skipif(not fetch_mode.userfaultfd_available(),
                                  reason="userfaultfd with shmem faults and UFFDIO_POISON "
                                  "(Linux 6.6) unavailable")


class LazyMapping:
    """A lazy replica and this process's registered mapping of it, as a client makes
    one (vas/mapping.py), resolved by a ``FaultHandler``."""

    def __init__(self, timeout: float, fetch: Fetch):
        np = pytest.importorskip("numpy")
        self.fd, self.ro_fd = store_mod.allocate("replica", SIZE, reserve=False)
        fetch.fd = self.fd
        self.fill = lazy.LazyFill(SIZE, fetch)
        self.map = mmap.mmap(self.ro_fd, SIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        self.view = memoryview(self.map)
        self.address = int(np.frombuffer(self.view, dtype=np.uint8, count=1).ctypes.data)
        uffd = _native.userfaultfd()
        _native.uffd_api(uffd, fetch_mode.lazy_features())
        _native.uffd_register(uffd, self.address, SIZE, _native.UFFDIO_REGISTER_MODE_MISSING
                              | _native.UFFDIO_REGISTER_MODE_MINOR)
        self.handler = faults.FaultHandler(timeout)
        self.handler.add(uffd, self.fill, self.address, SIZE)

    def read(self, offset: int, length: int):
        """The bytes a system call reads at ``offset`` (a fault taken in the kernel), or
        the OSError it fails with; (result, seconds)."""
        r, w = os.pipe()
        started = time.monotonic()
        try:
            source = (ctypes.c_char * length).from_address(self.address + offset)
            os.write(w, memoryview(source).cast("B"))
            return os.read(r, length), time.monotonic() - started
        except OSError as exc:
            return exc, time.monotonic() - started
        finally:
            os.close(r)
            os.close(w)

    def close(self) -> None:
        self.handler.stop()  # closes the uffd
        self.view.release()
        self.map.close()
        store_mod.release(self.fd, self.ro_fd, SIZE)


@pytest.fixture
def lazy_mapping():
    made: list[LazyMapping] = []

    def make(timeout: float, fetch: Fetch) -> LazyMapping:
        made.append(LazyMapping(timeout, fetch))
        return made[-1]

    yield make
    for mapping in made:
        mapping.close()


@needs_poison
def test_faults_are_resolved_while_the_home_answers(lazy_mapping):
    data = os.urandom(SIZE)
    m = lazy_mapping(5.0, Fetch(data=data))
    assert m.read(lazy.CHUNK + 100, 64)[0] == data[lazy.CHUNK + 100:lazy.CHUNK + 164]


@needs_poison
def test_a_fault_the_home_never_answers_is_poisoned_after_the_timeout(lazy_mapping):
    fetch = Fetch(data=bytes(SIZE))
    fetch.error = Unavailable("home unreachable")
    m = lazy_mapping(1.0, fetch)
    result, seconds = m.read(2 * lazy.CHUNK, 16)
    assert isinstance(result, OSError) and result.errno == errno.EFAULT
    assert 0.9 <= seconds < 1.0 + WAIT / 2
    assert len(fetch.calls) >= 2  # retried meanwhile
    # Later faults of the mapping needing a fetch are poisoned at once.
    calls = len(fetch.calls)
    result, seconds = m.read(3 * lazy.CHUNK, 16)
    assert isinstance(result, OSError) and result.errno == errno.EFAULT
    assert seconds < 0.5 and len(fetch.calls) == calls


@needs_poison
def test_lost_pages_are_poisoned_at_once_and_present_ones_still_map(lazy_mapping):
    data = os.urandom(SIZE)
    fetch = Fetch(data=data)
    m = lazy_mapping(60.0, fetch)
    m.fill.ensure(0, lazy.CHUNK)  # present, not mapped in the client yet (a minor fault)
    m.fill.lose("segment s was deleted")
    result, seconds = m.read(lazy.CHUNK, 16)
    assert isinstance(result, OSError) and result.errno == errno.EFAULT
    assert seconds < WAIT / 2
    assert m.read(100, 16)[0] == data[100:116]


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001  (the test checks what it needs elsewhere)
        pass


def _record(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)
