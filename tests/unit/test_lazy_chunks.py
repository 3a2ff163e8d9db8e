"""The chunk path of lazy replicas without daemons: ``LazyFill`` claims, the bulk
``Channel`` against a real ``BulkServer`` over loopback (plaintext and mutual TLS),
``HomeReader``'s fallback to ReadPages; and an eager ``bulk.fetch`` into fresh memory,
its pages pre-faulted ahead of the receivers."""
from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
import types

import pytest

from vas import _native
from vas.core import certs
from vas.core.errors import CapacityExceeded, InvalidArgument, NotFound, Unavailable
from vas.core.tls import TlsConfig
from vas.node import bulk, lazy
from vas.node import store as store_mod

from waiting import wait_for

MiB = 1 << 20
SIZE = 8 * MiB + 12288  # not a whole number of chunks
SEGMENT = 7
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def tls_configs(tmp_path_factory):
    """(home, reader) TlsConfigs of two agents under one CA."""
    directory = str(tmp_path_factory.mktemp("certs"))
    ca = certs.make_ca(directory)
    return tuple(TlsConfig(*certs.issue(ca, directory, name, certs.node_identity(node)),
                           ca.cert_path) for name, node in (("home", "n1"), ("reader", "n2")))


@pytest.fixture(params=["plaintext", "tls"])
def home(request):
    """A BulkServer serving segment SEGMENT (random bytes in a memfd), in plaintext and
    with mutual TLS; (server, bytes). ``server.client_tls``: the context a Channel needs."""
    tls = request.getfixturevalue("tls_configs") if request.param == "tls" else None
    data = os.urandom(SIZE)
    fd, ro_fd = store_mod.allocate("home", SIZE)
    os.pwrite(fd, data, 0)

    def source(segment_id: int, offset: int, length: int, peer) -> int:
        if segment_id != SEGMENT:
            raise NotFound(f"segment id {segment_id} is not held")
        if length <= 0 or offset < 0 or offset + length > SIZE:
            raise InvalidArgument(f"range [{offset}, +{length}) is outside the segment")
        return os.dup(fd)

    server = bulk.BulkServer("127.0.0.1", source, TIMEOUT,
                             tls[0].server_context() if tls else None, per_peer=32)
    server.client_tls = tls[1].client_context() if tls else None
    server.start()
    yield server, data
    server.close()
    store_mod.release(fd, ro_fd, SIZE)


@pytest.fixture
def replica():
    """A sparse memfd the size of the home's segment."""
    fd, ro_fd = store_mod.allocate("replica", SIZE, reserve=False)
    yield fd
    store_mod.release(fd, ro_fd, SIZE)


@pytest.fixture
def target():
    """Memory to receive a replica's ranges into (a Channel takes any writable buffer)."""
    return memoryview(bytearray(SIZE))


def _pooled(channel: bulk.Channel) -> list[socket.socket]:
    return [conn for _, conn in channel._idle]


def _read(channel: bulk.Channel, target: memoryview, offset: int, length: int,
          segment: int = SEGMENT) -> None:
    channel.read(segment, offset, target[offset:offset + length])


@pytest.fixture
def used_channel(home, target):
    """A Channel to the home that has read the first page: (channel, its one pooled
    connection, the home's bytes)."""
    server, data = home
    channel = bulk.Channel(f"127.0.0.1:{server.port}", TIMEOUT, server.client_tls)
    try:
        _read(channel, target, 0, 4096)
        [conn] = _pooled(channel)
        yield channel, conn, data
    finally:
        channel.close()


def test_channel_fills_ranges_over_one_persistent_connection(used_channel, target):
    channel, conn, data = used_channel
    ranges = [(start, min(lazy.CHUNK, SIZE - start)) for start in range(0, SIZE, lazy.CHUNK)]
    random.shuffle(ranges)
    for offset, length in ranges:
        _read(channel, target, offset, length)
    assert _pooled(channel) == [conn]  # every request went over the same connection
    assert hashlib.sha256(target).digest() == hashlib.sha256(data).digest()


def test_channel_error_replies_keep_the_connection(used_channel, target):
    channel, conn, data = used_channel
    with pytest.raises(NotFound):
        _read(channel, target, 0, 4096, SEGMENT + 1)
    with pytest.raises(InvalidArgument, match="outside the segment"):
        channel.read(SEGMENT, SIZE - 4096, memoryview(bytearray(8192)))
    for offset, length in ((-1, 4096), (0, 0)):
        with pytest.raises(ValueError):
            channel.read(SEGMENT, offset, target[:length])
    _read(channel, target, 4096, 4096)
    assert _pooled(channel) == [conn]
    assert bytes(target[:8192]) == data[:8192]


def test_channel_reply_framing(used_channel, target):
    """An error message longer than the range asked for is read whole and writes nothing
    (the connection stays in step); a range longer than one receive arrives whole, and
    nothing outside it is written."""
    channel, conn, data = used_channel
    target[:] = bytes(SIZE)
    with pytest.raises(NotFound, match="is not held"):
        _read(channel, target, 0, 1, SEGMENT + 1)  # the message is longer than 1 byte
    assert bytes(target[:4096]) == bytes(4096)
    offset, length = 4096 + 100, bulk._RECV_MAX + 12345
    _read(channel, target, offset, length)
    assert bytes(target[offset:offset + length]) == data[offset:offset + length]
    assert bytes(target[:offset]) == bytes(offset)
    assert _pooled(channel) == [conn]


def test_channel_replaces_a_connection_the_home_dropped(used_channel, target):
    channel, conn, data = used_channel
    # As a home that restarted or timed it out (with TLS: the connection's own socket).
    getattr(conn, "sock", conn).shutdown(socket.SHUT_RDWR)
    _read(channel, target, MiB, lazy.CHUNK)
    assert _pooled(channel) != [conn]
    assert bytes(target[MiB:MiB + lazy.CHUNK]) == data[MiB:MiB + lazy.CHUNK]


def test_channel_to_nobody_is_unavailable(target):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        channel = bulk.Channel(f"127.0.0.1:{port}", TIMEOUT)
        with pytest.raises(Unavailable, match="bulk read"):
            _read(channel, target, 0, 4096)


def test_eager_fetch_still_takes_one_range_per_connection(home):
    server, data = home
    view = memoryview(bytearray(SIZE))
    bulk.fetch(f"127.0.0.1:{server.port}", SEGMENT, view, bulk.split(SIZE, 3), timeout=TIMEOUT,
               tls=server.client_tls)
    assert view.tobytes() == data


# ---------------------------------------------------------------- LazyFill


class Recorder:
    """A LazyFill fetch that records its calls and can be held or made to fail."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.failures = 0

    def __call__(self, offset: int, length: int, deadline: float | None = None) -> None:
        self.calls.append((offset, length))
        assert self.gate.wait(TIMEOUT)
        if self.failures:
            self.failures -= 1
            raise Unavailable("home unreachable")


def test_concurrent_ensures_of_one_chunk_fetch_it_once():
    fetch = Recorder()
    fetch.gate.clear()
    fill = lazy.LazyFill(SIZE, fetch)
    threads = [threading.Thread(target=fill.ensure, args=(100 + i, 1)) for i in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: fetch.calls, "the first fetch")
    fetch.gate.set()
    for thread in threads:
        thread.join(TIMEOUT)
    assert fetch.calls == [(0, lazy.CHUNK)]
    assert fill.present_run(0, 4) == 1


def test_a_failed_fetch_leaves_the_chunk_missing_for_the_next_try():
    fetch = Recorder()
    fetch.failures = 1
    fill = lazy.LazyFill(SIZE, fetch)
    with pytest.raises(Unavailable):
        fill.ensure(lazy.CHUNK, 1)
    assert fill.present_run(1, 1) == 0
    fill.ensure(lazy.CHUNK, 1)
    assert fetch.calls == [(lazy.CHUNK, lazy.CHUNK)] * 2
    assert fill.present_run(1, 1) == 1


def test_ensure_clips_to_the_segment_and_checks_bounds():
    fetch = Recorder()
    fill = lazy.LazyFill(SIZE, fetch)
    last = (SIZE // lazy.CHUNK) * lazy.CHUNK
    fill.ensure(SIZE - 1, 10 * lazy.CHUNK)
    assert fetch.calls == [(last, SIZE - last)]
    for offset, length in ((-1, 1), (0, -1), (SIZE + 1, 1)):
        with pytest.raises(ValueError):
            fill.ensure(offset, length)


def test_long_ranges_are_fetched_in_pieces_and_released_fills_refuse():
    fetch = Recorder()
    fill = lazy.LazyFill(SIZE, fetch)
    fill.ensure(0, 3 * MiB)
    assert fetch.calls == [(0, MiB), (MiB, MiB), (2 * MiB, MiB)]
    fill.close()
    fill.ensure(0, MiB)  # present: no fetch needed
    with pytest.raises(Unavailable, match="released"):
        fill.ensure(4 * MiB, 1)


# ---------------------------------------------------------------- HomeReader


def _homes(bulk_address: str | None, opened: list, tls=None):
    def open_bulk(address: str, name: str, segment_id: int):
        opened.append((address, name, segment_id))
        if bulk_address is None:
            raise Unavailable("no bulk listener")
        return types.SimpleNamespace(address=bulk_address)
    return lazy.Homes(lambda node: f"grpc-of-{node}", open_bulk, TIMEOUT, tls)


@pytest.fixture
def sparse_memory():
    """A sparse replica memfd the size of the home's segment, mapped writable."""
    memory = store_mod.Memory.allocate("replica", SIZE, reserve=False, mapped=True)
    yield memory
    memory.release()


def _allocated_ranges(fd: int) -> list[tuple[int, int]]:
    """The [start, end) runs of ``fd`` that hold pages (SEEK_DATA / SEEK_HOLE)."""
    runs, at = [], 0
    while True:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past ``at``
            return runs
        at = os.lseek(fd, start, os.SEEK_HOLE)
        runs.append((start, at))


def test_home_reader_uses_one_bulk_channel_per_home(home, sparse_memory):
    """Two readers share the home's one channel; each range is allocated just before it
    is received into the sparse replica, and nothing else."""
    server, data = home
    opened, pages = [], []
    homes = _homes(f"127.0.0.1:{server.port}", opened, server.client_tls)
    readers = [lazy.HomeReader(homes, "node1", "seg", SEGMENT, sparse_memory.mapping,
                               lambda *args: pages.append(args)) for _ in range(2)]
    try:
        readers[0](0, lazy.CHUNK)
        readers[1](SIZE - 4096, 4096)
    finally:
        for reader in readers:
            reader.close()
        homes.close()
    assert opened == [("grpc-of-node1", "seg", SEGMENT)] and pages == []
    fd = sparse_memory.fd
    assert os.pread(fd, lazy.CHUNK, 0) == data[:lazy.CHUNK]
    assert os.pread(fd, 4096, SIZE - 4096) == data[-4096:]
    assert _allocated_ranges(fd) == [(0, lazy.CHUNK), (SIZE - 4096, SIZE)]


def test_home_reader_refuses_a_range_it_cannot_allocate(home):
    """No memory for a sparse range: CapacityExceeded, before any byte is asked for (a
    receive into pages that cannot be allocated would be SIGBUS for the agent)."""
    server, _ = home
    opened = []

    class NoMemory:
        def madvise(self, advice, offset, length):
            raise OSError(12, "Cannot allocate memory")

    reader = lazy.HomeReader(_homes(f"127.0.0.1:{server.port}", opened), "node1", "seg",
                             SEGMENT, NoMemory(), lambda *args: None)
    with pytest.raises(CapacityExceeded, match="cannot allocate 32 KiB of replica seg"):
        reader(0, lazy.CHUNK)
    assert opened == []


@pytest.mark.parametrize("reachable", [False, True], ids=["no-bulk-listener", "bulk-fails"])
def test_home_reader_falls_back_to_read_pages(reachable, sparse_memory):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        opened, pages = [], []
        homes = _homes(f"127.0.0.1:{unused.getsockname()[1]}" if reachable else None, opened)
        reader = lazy.HomeReader(homes, "node1", "seg", SEGMENT, sparse_memory.mapping,
                                 lambda *args: pages.append(args))
        try:
            reader(lazy.CHUNK, lazy.CHUNK)
            reader(0, lazy.CHUNK)  # within _BULK_RETRY: straight to ReadPages
        finally:
            reader.close()
            homes.close()
    assert pages == [("grpc-of-node1", lazy.CHUNK, lazy.CHUNK, None),
                     ("grpc-of-node1", 0, lazy.CHUNK, None)]
    assert len(opened) == 1


# -- an eager fetch into fresh memory ---------------------------------------------------

def _covered(pieces: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether the (offset, length) ``pieces`` cover [start, end)."""
    at = start
    for offset, length in sorted(pieces):
        if offset > at:
            break
        at = max(at, offset + length)
    return at >= end


def test_an_eager_fetch_receives_only_into_pages_prefaulted_ahead(home, replica, monkeypatch):
    server, data = home
    monkeypatch.setattr(bulk, "_PREFAULT_STEP", 64 << 10)  # 129 pieces
    mapping = _native.mmap(replica, SIZE, writable=True)
    lock = threading.Lock()
    prepared: list[tuple[int, int]] = []
    unprepared: list[tuple[int, int]] = []
    partial: list[int] = []  # receives let go before their range was wholly prepared

    def prepare(offset: int, length: int) -> None:
        mapping.madvise(_native.MADV_POPULATE_WRITE, offset, length)
        time.sleep(0.002)  # slow memory: the receivers catch up with the pre-faulting
        with lock:
            prepared.append((offset, length))

    ready = bulk._RunAhead.ready

    def checked(ahead, start: int, at: int) -> int:
        end = ready(ahead, start, at)
        with lock:
            if not _covered(prepared, at, end):
                unprepared.append((at, end))
            if end < ahead._end[start]:
                partial.append(start)
        return end

    monkeypatch.setattr(bulk._RunAhead, "ready", checked)
    try:
        with memoryview(mapping) as raw, raw.cast("B") as view:
            bulk.fetch(f"127.0.0.1:{server.port}", SEGMENT, view, bulk.split(SIZE, 3),
                       timeout=TIMEOUT, prepare=prepare, tls=server.client_tls)
            assert hashlib.sha256(view).digest() == hashlib.sha256(data).digest()
    finally:
        mapping.close()
    assert unprepared == [], "bytes were received into pages not prepared yet"
    assert partial, "no receiver received before its whole range was prepared (no overlap)"
    assert sum(length for _, length in prepared) == SIZE and _covered(prepared, 0, SIZE)
    assert not any(t.name == "vas-node-prefault" for t in threading.enumerate())


def test_an_eager_fetch_whose_prefault_fails_raises_it(home, replica, monkeypatch):
    server, _ = home
    monkeypatch.setattr(bulk, "_PREFAULT_STEP", MiB)
    calls = []

    def prepare(offset: int, length: int) -> None:
        calls.append(offset)
        if len(calls) == 3:
            raise CapacityExceeded("cannot allocate 1 MiB of segment memory: no room")

    mapping = _native.mmap(replica, SIZE, writable=True)
    try:
        with memoryview(mapping) as raw, raw.cast("B") as view, \
                pytest.raises(CapacityExceeded, match="no room"):
            bulk.fetch(f"127.0.0.1:{server.port}", SEGMENT, view, bulk.split(SIZE, 3),
                       timeout=TIMEOUT, prepare=prepare, tls=server.client_tls)
    finally:
        mapping.close()
    assert not any(t.name == "vas-node-prefault" for t in threading.enumerate())
