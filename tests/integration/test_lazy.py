"""fetch="lazy" remote attach between two loopback agents: demand paging with userfaultfd.

Bytes moved from the home are counted by the home agent process itself (``sent_by``:
its wchar in /proc/PID/io, which sendfile and socket sends add to): other processes
of the machine cannot inflate it, as they could a count on the loopback interface.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import grpc
import pytest

import vas
from vas.core import fetch
from vas.proto import node_pb2, node_pb2_grpc
from waiting import wait_for
from worlds import empty, fill

MiB = 1 << 20
PAGE = 4096


# What lazy attaches need (shmem MISSING/MINOR faults, UFFDIO_POISON), as the client probes it.
needs_uffd = pytest.mark.skipif(not fetch.userfaultfd_available(),
                                reason="userfaultfd with shmem faults and UFFDIO_POISON unavailable")


def sent_by(node) -> int:
    """Bytes the agent process ``node`` has written to files and sockets so far (its
    ``wchar``: sendfile, send and log writes). Unlike a count on the loopback
    interface, other processes of the machine (other tests, benchmarks) do not add to it."""
    with open(f"/proc/{node.pid}/io") as io:
        for line in io:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise AssertionError(f"no wchar in /proc/{node.pid}/io")


def sha_in_subprocess(socket_path: str, name: str, **env) -> list[str]:
    """[Mapping.fetch, sha256] of ``name`` as another process attached lazily sees them."""
    code = ("import hashlib, sys, vas\n"
            "with vas.connect(sys.argv[1]) as c, c.attach(sys.argv[2]) as m:\n"
            "    print(m.fetch); print(hashlib.sha256(m.buffer).hexdigest())\n")
    out = subprocess.run([sys.executable, "-c", code, socket_path, name], check=True,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}).stdout
    return out.splitlines()[-2:]


@pytest.fixture(scope="module")
def shared(module_cluster):
    """Three agents for the module: node1 and node2 for ``two``, node3 for the one test
    that needs an agent with no bulk connection to node1 yet (an agent keeps idle ones)."""
    return module_cluster(nodes=3, memory=1280 * MiB)


@pytest.fixture
def two(shared):
    """The module's two agents, empty when the test starts and emptied after it (no test
    kills or restarts one; what a test reads of a log is about its own segments or
    written since it started)."""
    node1, node2, _ = shared.nodes
    with vas.connect(node1.socket) as c1, vas.connect(node2.socket) as c2:
        yield node1, node2, c1, c2
    empty(shared)


@needs_uffd
def test_lazy_attach_maps_at_once_and_eager_completes_it(two):
    node1, node2, c1, c2 = two
    digest = fill(c1, "lazy/a", 256 * MiB)
    started = time.monotonic()
    with c2.attach("lazy/a") as m:
        elapsed = time.monotonic() - started
        assert m.fetch == "lazy"
        assert elapsed < 1.0
        # An eager attach of the partly filled replica fetches the rest first.
        with c2.attach("lazy/a", fetch="eager") as eager:
            assert eager.fetch == "eager"
            assert hashlib.sha256(eager.buffer).hexdigest() == digest
        assert hashlib.sha256(m.buffer).hexdigest() == digest


#: A lazy attach whose replica another attach completes between its Attach and its
#: RegisterFaults (the client library's two requests; the gap is widened here).
_COMPLETED_BEFORE_REGISTERING = """
import hashlib, sys, vas
from vas.connection import Connection
socket_path, name = sys.argv[1], sys.argv[2]
other = vas.connect(socket_path)
register = Connection.register_faults
def completed_first(self, *args, **kwargs):
    other.attach(name, fetch="eager").detach()  # the replica is complete from now on
    return register(self, *args, **kwargs)
Connection.register_faults = completed_first
with vas.connect(socket_path) as c, c.attach(name) as m:
    print(m.fetch); print(hashlib.sha256(m.buffer).hexdigest())
"""


@needs_uffd
def test_a_lazy_mapping_registered_after_its_replica_completed_reads_every_byte(two):
    """The agent used to close its copy of such a mapping's userfaultfd, as if that
    unregistered it; the guardian's dup kept the registration alive, unread, and the
    client's first touch waited for ever (found by test_concurrency under load)."""
    node1, node2, c1, c2 = two
    digest = fill(c1, "lazy/late", 8 * MiB)
    out = subprocess.run([sys.executable, "-c", _COMPLETED_BEFORE_REGISTERING, node2.socket,
                          "lazy/late"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["lazy", digest]


@needs_uffd
def test_lazy_replica_fills_on_touch_and_is_shared(two):
    node1, node2, c1, c2 = two
    digest = fill(c1, "lazy/s", 256 * MiB)
    with c2.attach("lazy/s") as m:
        assert m.fetch == "lazy"
        assert hashlib.sha256(m.buffer).hexdigest() == digest
        # Another process maps the same replica and registers its own faults.
        assert sha_in_subprocess(node2.socket, "lazy/s") == ["lazy", digest]


@needs_uffd
def test_random_pages_move_only_their_chunks(two):
    node1, node2, c1, c2 = two
    size = 1 << 30
    c1.create("lazy/big", size, mode=0o644)
    with c1.attach("lazy/big", "rw") as w:
        for index in range(0, size // PAGE, 997):
            w.write(index * PAGE, index.to_bytes(8, "little"))
    with c2.attach("lazy/big") as m:
        before = sent_by(node1)
        for index in random.sample(range(0, size // PAGE, 997), 10):
            assert m.read(index * PAGE, 8) == index.to_bytes(8, "little")
        moved = sent_by(node1) - before
    assert moved < 16 * MiB, f"{moved} bytes moved for 10 pages"


@needs_uffd
def test_prefetch_makes_a_range_present(two):
    node1, node2, c1, c2 = two
    digest = fill(c1, "lazy/p", 64 * MiB)
    with c2.attach("lazy/p") as m:
        # The second half: faults on present pages still start read-ahead past them,
        # which the end of the segment stops (a prefetched head would be read on from).
        m.prefetch(32 * MiB, 32 * MiB)
        before = sent_by(node1)
        tail = m.read(32 * MiB, 32 * MiB)
        assert sent_by(node1) - before < 2 * MiB  # present: mapped without a fetch
        m.prefetch()
        assert hashlib.sha256(m.read(0, 32 * MiB) + tail).hexdigest() == digest


def test_without_userfaultfd_lazy_falls_back_to_eager(two):
    node1, node2, c1, c2 = two
    digest = fill(c1, "lazy/f", 32 * MiB)
    fetch, seen = sha_in_subprocess(node2.socket, "lazy/f", VAS_DISABLE_USERFAULTFD="1")
    assert (fetch, seen) == ("eager (userfaultfd unavailable)", digest)
    assert replicas_made(node2, "lazy/f") == ["eager"]  # the agent fetched it whole


@needs_uffd
def test_the_fetch_mode_each_attach_reports(two):
    node1, node2, c1, c2 = two
    digest = fill(c1, "lazy/m", 8 * MiB)
    with c1.attach("lazy/m") as home, c1.attach("lazy/m", "rw") as home_writer:
        assert home.fetch == home_writer.fetch == "home (no fetch)"
    with c2.attach("lazy/m", fixed=True) as fixed:
        assert fixed.fetch == "eager (fixed address)"
        assert fixed.address == fixed.info.address
        assert hashlib.sha256(fixed.buffer).hexdigest() == digest
    assert replicas_made(node2, "lazy/m") == ["eager"]
    with c2.attach("lazy/m") as complete:  # lazy, but the replica is complete already
        assert complete.fetch == "eager"
    c1.create("lazy/m2", 8 * MiB, mode=0o644)
    with c2.attach("lazy/m2") as m:
        assert m.fetch == "lazy"
    with c2.attach("lazy/m2", "rw") as writer:  # a remote writer: completed first
        assert writer.fetch == "eager"
    assert replicas_made(node2, "lazy/m2") == ["lazy"]


def _log(node) -> str:
    with open(node.log_path, errors="replace") as log:
        return log.read()


def replicas_made(node, name: str) -> list[str]:
    """"lazy" or "eager" for each replica of ``name`` that ``node`` made, in order."""
    kinds = []
    for line in _log(node).splitlines():
        if f"replica of {name} (id" in line:
            kinds.append("lazy" if line.endswith(": lazy") else "eager")
    return kinds


@needs_uffd
def test_concurrent_faults_read_the_home_bytes_over_the_bulk_channel(two):
    node1, node2, c1, c2 = two
    logged_before = len(_log(node2))
    size = 64 * MiB
    blob = os.urandom(size)
    c1.create("lazy/c", size, mode=0o644)
    with c1.attach("lazy/c", "rw") as w:
        w.write(0, blob)
    pages = random.sample(range(size // PAGE), 400)
    wrong: list[int] = []
    with c2.attach("lazy/c") as m:
        assert m.fetch == "lazy"

        def touch(share: list[int]) -> None:
            for page in share:
                if m.read(page * PAGE, PAGE) != blob[page * PAGE:(page + 1) * PAGE]:
                    wrong.append(page)
        threads = [threading.Thread(target=touch, args=(pages[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not wrong and not any(thread.is_alive() for thread in threads)
        assert hashlib.sha256(m.buffer).digest() == hashlib.sha256(blob).digest()
    # Processes fault at once (a thread faulting holds its GIL: one process faults
    # one page at a time), on the same chunks too: each chunk is fetched once.
    code = ("import hashlib, sys, vas\n"
            "with vas.connect(sys.argv[1]) as c, c.attach(sys.argv[2]) as m:\n"
            "    print(m.fetch, hashlib.sha256(m.buffer).hexdigest())\n")
    c1.create("lazy/c2", size, mode=0o644)
    with c1.attach("lazy/c2", "rw") as w:
        w.write(0, blob)
    before = sent_by(node1)
    readers = [subprocess.Popen([sys.executable, "-c", code, node2.socket, "lazy/c2"],
                                stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [reader.communicate(timeout=120)[0].split() for reader in readers]
    assert outputs == [["lazy", hashlib.sha256(blob).hexdigest()]] * 3
    assert sent_by(node1) - before < 1.5 * size  # not once per process
    # every chunk came over the bulk channel
    assert "using ReadPages" not in _log(node2)[logged_before:]


def _bulk_port(node, name: str, segment_id: int) -> tuple[str, int]:
    with grpc.insecure_channel(node.address) as channel:
        opened = node_pb2_grpc.NodeStub(channel).OpenBulk(
            node_pb2.OpenBulkRequest(name=name, id=segment_id), timeout=10)
    host, _, port = opened.address.rpartition(":")
    return host, int(port)


@needs_uffd
def test_chunks_fall_back_to_read_pages_when_the_bulk_channel_refuses(two, shared):
    node1, _, c1, _ = two
    node3 = shared.nodes[2]  # no bulk connection to node1 of an earlier test to reuse
    logged_before = len(_log(node3))
    digest = fill(c1, "lazy/r", 16 * MiB)
    target = _bulk_port(node1, "lazy/r", c1.stat("lazy/r").id)
    # Take every bulk slot of this host at the home (--max-bulk-per-peer, 32): its
    # listener then refuses node3's connections too, with RESOURCE_EXHAUSTED.
    held = [socket.create_connection(target, timeout=10) for _ in range(32)]
    try:
        with socket.create_connection(target, timeout=10) as probe:
            magic, code, _ = struct.unpack("<8sIQ", probe.recv(20, socket.MSG_WAITALL))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        with vas.connect(node3.socket) as c3, c3.attach("lazy/r") as m:
            assert m.fetch == "lazy"
            assert hashlib.sha256(m.buffer).hexdigest() == digest
    finally:
        for conn in held:
            conn.close()
    assert "using ReadPages" in _log(node3)[logged_before:]


_FORK_CHILD_READS = """
import os, signal, sys, vas
with vas.connect(sys.argv[1]) as c, c.attach(sys.argv[2]) as m:
    assert m.fetch == "lazy", m.fetch
    pid = os.fork()
    if pid == 0:  # the child touches a page nobody has fetched yet
        page = bytes(m.buffer[-4096:])
        os._exit(3 if page == bytes(4096) else 4)
    _, status = os.waitpid(pid, 0)
    print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status))
    print(int(bytes(m.buffer[-4096:]) != bytes(4096)))  # the parent still pages in
"""


@needs_uffd
def test_a_forked_child_never_reads_a_lazy_mappings_missing_pages_as_zeros(two):
    """The child of a lazy reader does not inherit the userfaultfd registration, so an
    inherited mapping would read unfetched pages as zeros: lazy mappings are not
    inherited at all (MADV_DONTFORK), and touching one in the child is SIGSEGV."""
    node1, node2, c1, c2 = two
    fill(c1, "lazy/fork", 8 * MiB)
    out = subprocess.run([sys.executable, "-c", _FORK_CHILD_READS, node2.socket, "lazy/fork"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.split()
    assert out == [str(int(signal.SIGSEGV)), "1"], out


def prepared_memfds(node, size: int) -> set[int]:
    """Inodes of the warm pool's memfds of ``size`` bytes that agent ``node`` holds
    ("vas:segment": node/pool.py's name for them)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{node.pid}/fd"):
        path = f"/proc/{node.pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith("/memfd:vas:segment "):
                stat = os.stat(path)
                if stat.st_size == size:
                    inodes.add(stat.st_ino)
        except OSError:  # closed meanwhile
            continue
    return inodes


def preparations(node, size: int) -> int:
    """How many memfds of ``size`` bytes agent ``node``'s warm pool has prepared so far."""
    return _log(node).count(f"prepared {size} bytes of segment memory")


def mapped_inodes() -> set[int]:
    """Inodes of the memfds this process maps."""
    with open("/proc/self/maps") as maps:
        return {int(line.split()[4]) for line in maps if "/memfd:vas:" in line}


@needs_uffd
def test_a_replaced_dataset_goes_into_memory_prepared_when_the_old_one_was_freed(two):
    """Rounds of puts of one size (vas.ray.put, a dataset rewritten): freeing the old
    segment has the home, and freeing its replica the reader's node, prepare memory
    of that size; the next create and the next lazy replica take it. The writer's
    bytes are copied in by the home's agent (WriteFrom into prepared memory: two
    halves on two threads), and the lazy reader still sees the home's bytes, never
    the prepared pages' zeros."""
    node1, node2, c1, c2 = two
    size = 80 * MiB  # over the pool's MIN_SIZE and WriteFrom's PARALLEL_COPY_MIN; no other test's
    before = preparations(node1, size), preparations(node2, size)
    digest = fill(c1, "lazy/round0", size)
    with c2.attach("lazy/round0") as m:
        assert hashlib.sha256(m.buffer).hexdigest() == digest
    c1.delete("lazy/round0")
    wait_for(lambda: (preparations(node1, size), preparations(node2, size)) == (
        before[0] + 1, before[1] + 1), "memory prepared on both nodes")
    home_ready, reader_ready = prepared_memfds(node1, size), prepared_memfds(node2, size)
    assert len(home_ready) == len(reader_ready) == 1
    data = os.urandom(size)
    c1.create("lazy/round1", size, mode=0o644)
    with c1.attach("lazy/round1", "rw") as writer:
        assert home_ready <= mapped_inodes(), "the create did not take the prepared memfd"
        assert writer.write(0, data) == size  # one WriteFrom of the whole range
    with c1.attach("lazy/round1") as home, c2.attach("lazy/round1") as m:
        assert hashlib.sha256(home.buffer).digest() == hashlib.sha256(data).digest()
        assert m.fetch == "lazy"
        assert reader_ready <= mapped_inodes(), "the replica did not take the prepared memfd"
        for chunk in random.sample(range(size // (32 * 1024)), 20):  # first touches
            offset = chunk * 32 * 1024 + random.randrange(32 * 1024 // PAGE) * PAGE
            assert m.read(offset, PAGE) == data[offset:offset + PAGE]
        assert hashlib.sha256(m.buffer).digest() == hashlib.sha256(data).digest()
