"""Publishing between two agents on loopback: remote "rw" attach, sync(), refresh(),
wait(), and fencing of a writer stopped past its lease.

What moved is read from the agents' logs ("sync of NAME: sent N changed chunks",
"refresh of NAME: fetched N bytes ..."), so a test can tell a chunk-hash diff from a
whole-segment copy.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import grpc
import pytest

import vas
from vas.core import fetch
from vas.node.publish import CHUNK
from vas.proto import coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2
from waiting import wait_for

MiB = 1 << 20


def log_of(node) -> str:
    with open(os.path.join(node.dir, f"{node.node_id}.log")) as log:
        return log.read()


def counts(node, what: str, name: str) -> list[int]:
    """The chunk count of every "sync of" line, or the byte count of every "refresh of"
    line, about ``name`` in the node's log."""
    unit = "sent (\\d+) changed chunks" if what == "sync" else "fetched (\\d+) bytes"
    return [int(n) for n in re.findall(rf"{what} of {re.escape(name)}: {unit}", log_of(node))]


def fill(client, name: str, size: int) -> bytes:
    client.create(name, size, mode=0o644)
    data = os.urandom(size)
    with client.attach(name, "rw") as m:
        m.write(0, data)
    return data


@pytest.fixture(scope="module")
def shared(module_cluster):
    """One two-node cluster for the module: no test kills or restarts an agent and each
    names its segments apart ("pub/<test>"), which is all the log counts look at."""
    return module_cluster(nodes=2, memory=256 * MiB, writer_ttl=2)


@pytest.fixture
def two(shared):
    running = shared
    c1, c2 = vas.connect(running.nodes[0].socket), vas.connect(running.nodes[1].socket)
    yield running, c1, c2
    c1.close()
    c2.close()


def test_remote_writer_sync_sends_only_changed_chunks(two):
    running, c1, c2 = two
    node2 = running.nodes[1]
    data = bytearray(fill(c1, "pub/w", 16 * MiB))
    with c2.attach("pub/w", "rw") as w:
        assert w.info.home == "node1" and not w.buffer.readonly
        assert bytes(w.buffer) == data  # the remote writer starts from the home's bytes
        with pytest.raises(vas.Busy):
            c1.attach("pub/w", "rw")
        for offset in (0, 5 * CHUNK + 7, 16 * MiB - 3):
            w.write(offset, b"abc")
            data[offset:offset + 3] = b"abc"
        assert w.sync() == 1
        with c1.attach("pub/w") as r:
            assert r.version == 1 and bytes(r.buffer) == data
        assert w.sync() == 2  # nothing changed: no bytes, still a new version
        w.write(CHUNK, b"ranged")
        data[CHUNK:CHUNK + 6] = b"ranged"
        assert w.sync(ranges=[(CHUNK, 6)]) == 3
        with c1.attach("pub/w") as r:
            assert bytes(r.buffer) == data and r.version == 3
        with pytest.raises(vas.InvalidArgument):
            w.sync(ranges=[(16 * MiB - 1, 2)])
    assert counts(node2, "sync", "pub/w") == [3, 0, 1]


def test_release_consistency_reader_refreshes_changed_chunks(two):
    running, c1, c2 = two
    node2 = running.nodes[1]
    data = bytearray(fill(c1, "pub/rc", 8 * MiB))
    reader = c2.attach("pub/rc", fetch="eager")
    lazy_reader = vas.connect(node2.socket).attach("pub/rc", fetch="lazy")
    assert bytes(reader.buffer) == data
    with c1.attach("pub/rc", "rw") as w:
        w.write(3 * CHUNK, b"v1" * 100)
        data[3 * CHUNK:3 * CHUNK + 200] = b"v1" * 100
        assert w.sync() == 1
        assert reader.refresh() == 1  # sees every write made before that sync
        assert bytes(reader.buffer) == data
        assert lazy_reader.refresh() == 1 and bytes(lazy_reader.buffer) == data
        w.write(0, b"v2")
        data[0:2] = b"v2"
        assert w.sync() == 2
    assert reader.refresh() == 2 and reader.version == 2
    assert bytes(reader.buffer) == data
    assert reader.refresh() == 2  # versions only grow, nothing new to fetch
    assert counts(node2, "refresh", "pub/rc") == [CHUNK, CHUNK]  # one changed chunk each time
    with c1.attach("pub/rc") as home:
        assert home.refresh() == 2
    reader.detach()
    lazy_reader.detach()


def test_wait_returns_on_publish_or_timeout(two):
    running, c1, c2 = two
    fill(c1, "pub/wait", 1 * MiB)
    reader = c2.attach("pub/wait")
    assert reader.wait(timeout=0.2) == 0  # nothing published: the version it had
    seen = []
    with vas.connect(running.nodes[1].socket) as other:
        waiting_reader = other.attach("pub/wait")
        waiter = threading.Thread(target=lambda: seen.append(waiting_reader.wait(timeout=30)))
        waiter.start()
        assert other.stat("pub/wait").version == 0  # the waiting connection serves others too
        with c1.attach("pub/wait", "rw") as w:
            w.write(0, b"x")
            assert w.sync() == 1
        waiter.join(30)
        assert seen == [1]
        assert waiting_reader.wait(0) == 1  # an older version was published already
    assert reader.refresh() == 1 and reader.read(0, 1) == b"x"
    with pytest.raises(vas.InvalidArgument):
        reader.wait(timeout=-1)
    reader.detach()


def test_sync_needs_rw(two):
    _, c1, c2 = two
    fill(c1, "pub/r", 1 * MiB)
    for client in (c1, c2):
        with client.attach("pub/r") as m, pytest.raises(vas.PermissionDenied):
            m.sync()


_STOPPED_WRITER = textwrap.dedent("""
    import sys, vas
    m = vas.connect(sys.argv[1]).attach(sys.argv[2], "rw")
    m.write(0, b"first")
    m.sync()
    print("synced", flush=True)
    sys.stdin.readline()          # stopped (SIGSTOP) while waiting here, then resumed
    m.write(0, b"late!")
    try:
        m.sync()
        print("published", flush=True)
    except vas.Fenced as exc:
        print("fenced:", exc, flush=True)
""")


def test_writer_stopped_past_its_lease_is_fenced(two):
    running, c1, c2 = two
    node2 = running.nodes[1]
    fill(c1, "pub/fence", 1 * MiB)
    writer = subprocess.Popen([sys.executable, "-c", _STOPPED_WRITER, node2.socket, "pub/fence"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "synced\n"
        os.kill(writer.pid, signal.SIGSTOP)

        def take_over():
            try:
                return c1.attach("pub/fence", "rw")
            except vas.Busy:
                return None
        new = wait_for(take_over, "the stopped writer's lease to lapse", timeout=20)
        new.write(0, b"NEWER")
        assert new.sync() == 2
        os.kill(writer.pid, signal.SIGCONT)
        writer.stdin.write("go\n")
        writer.stdin.flush()
        line = writer.stdout.readline()
        assert line.startswith("fenced: segment pub/fence: writer token"), line
        with c1.attach("pub/fence") as home:
            assert home.read(0, 5) == b"NEWER" and home.version == 2
        # node2's copy holds the fenced writer's late bytes: a new reader there gets a fresh one.
        with c2.attach("pub/fence", fetch="eager") as fresh:
            assert fresh.read(0, 5) == b"NEWER"
        new.detach()
        # A remote writer after the fenced one starts from the home's bytes and publishes
        # exactly its own stores (tracked where the kernel can).
        with c2.attach("pub/fence", "rw") as again:
            again.write(100, b"AGAIN")
            assert again.sync() == 3
            with c1.attach("pub/fence") as home:
                assert home.read(0, 5) == b"NEWER" and home.read(100, 5) == b"AGAIN"
                assert hashlib.sha256(home.buffer).digest() == \
                    hashlib.sha256(again.buffer).digest()
    finally:
        os.kill(writer.pid, signal.SIGCONT)
        writer.kill()
        writer.wait()


def test_a_remote_writer_whose_segment_was_deleted_gets_not_found(two):
    """A forced delete on the home frees the segment at once, its writer lock with it,
    attachments on other nodes or not (an unforced one waits for them:
    test_delete_attached_elsewhere.py). The remote writer's agent finds the lock gone
    at its next renewal; its sync then says why: NotFound, the segment was deleted --
    not Fenced, which would send its writer to attach "rw" again."""
    running, c1, c2 = two
    node2 = running.nodes[1]
    fill(c1, "pub/deleted", 1 * MiB)
    with c2.attach("pub/deleted", "rw") as writer:
        segment_id = writer.info.id
        writer.write(0, b"LOST")
        c1.delete("pub/deleted", force=True)
        wait_for(lambda: "writer lock of pub/deleted" in log_of(node2),
                 "node2 to find the lock gone", timeout=10)
        with pytest.raises(vas.NotFound) as deleted:
            writer.sync()
        assert str(deleted.value) == (f"segment pub/deleted (id {segment_id}) was deleted: "
                                      "the writes since the last sync are not published")
    assert "pub/deleted" not in [s.name for s in c1.list()]


def test_node_service_refuses_bad_publishes(two):
    """Node.WritePages / ChunkHashes called directly: each bad input gets its status and the
    home bytes stay as they were."""
    running, c1, _ = two
    data = fill(c1, "pub/bad", 1 * MiB)
    info = c1.stat("pub/bad")
    stub = node_pb2_grpc.NodeStub(grpc.insecure_channel(running.nodes[0].address))
    caller = types_pb2.Caller(uid=0, gid=0, pid=1, node="node2")

    def write(header, *pieces):
        messages = [node_pb2.WritePagesChunk(header=header)] if header else []
        messages += [node_pb2.WritePagesChunk(offset=o, data=d) for o, d in pieces]
        with pytest.raises(grpc.RpcError) as err:
            stub.WritePages(iter(messages), timeout=10)
        return err.value.code()

    good = node_pb2.WritePagesHeader(caller=caller, name="pub/bad", id=info.id, token=1)
    assert write(None, (0, b"x")) == grpc.StatusCode.INVALID_ARGUMENT  # no header
    assert write(node_pb2.WritePagesHeader(caller=caller, name="pub/bad", id=info.id)) == \
        grpc.StatusCode.INVALID_ARGUMENT  # no token
    assert write(node_pb2.WritePagesHeader(caller=caller, name="pub/bad", id=info.id + 99,
                                           token=1)) == grpc.StatusCode.NOT_FOUND
    assert write(node_pb2.WritePagesHeader(caller=caller, name="pub/other", id=info.id,
                                           token=1)) == grpc.StatusCode.NOT_FOUND
    assert write(good, (MiB - 1, b"xy")) == grpc.StatusCode.INVALID_ARGUMENT  # past the end
    assert write(good, (0, b"late")) == grpc.StatusCode.FAILED_PRECONDITION  # no such writer
    with pytest.raises(grpc.RpcError) as err:
        stub.ChunkHashes(node_pb2.ChunkHashesRequest(name="pub/bad", id=info.id, chunk_size=4096),
                         timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.ChunkHashes(node_pb2.ChunkHashesRequest(name="pub/bad", id=info.id + 99,
                                                     chunk_size=CHUNK), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    hashes = stub.ChunkHashes(node_pb2.ChunkHashesRequest(name="pub/bad", id=info.id,
                                                          chunk_size=CHUNK), timeout=10)
    assert hashes.version == 0 and len(hashes.hashes) == 8 * (MiB // CHUNK)
    with c1.attach("pub/bad") as m:
        assert bytes(m.buffer) == data and m.version == 0  # nothing applied, no new version


def test_a_stream_cut_short_publishes_nothing(two):
    """A writer that marks its end (WritePagesHeader.end_marked) and holds the lock: a
    stream that ends before the message marked last, or goes on after it, is refused
    and the home keeps its bytes and version; marked properly, it publishes."""
    running, c1, _ = two
    data = fill(c1, "pub/cut", 1 * MiB)
    info = c1.stat("pub/cut")
    caller = types_pb2.Caller(uid=0, gid=0, pid=1)  # no node: a tool's (loopback cluster)
    with grpc.insecure_channel(running.coordinators[0].address) as to_coordinator, \
            grpc.insecure_channel(running.nodes[0].address) as to_home:
        lock = coordinator_pb2_grpc.CoordinatorStub(to_coordinator).AcquireWriter(
            coordinator_pb2.AcquireWriterRequest(caller=caller, name="pub/cut", ttl_seconds=30),
            timeout=10)
        header = node_pb2.WritePagesHeader(caller=caller, name="pub/cut", id=info.id,
                                           token=lock.token, lease_id=lock.lease_id,
                                           end_marked=True)
        home = node_pb2_grpc.NodeStub(to_home)

        def write(*messages):
            return home.WritePages(iter([node_pb2.WritePagesChunk(header=header),
                                         *messages]), timeout=10)

        for messages, details in (
                ([node_pb2.WritePagesChunk(offset=0, data=b"torn")],
                 "the WritePages stream of segment pub/cut ended before its message marked "
                 "last (the writer gave up or went away): nothing published"),
                ([node_pb2.WritePagesChunk(offset=0, data=b"torn", last=True),
                  node_pb2.WritePagesChunk(offset=4, data=b"more")],
                 "WritePages takes no message after the one marked last")):
            with pytest.raises(grpc.RpcError) as err:
                write(*messages)
            assert (err.value.code(), err.value.details()) == \
                (grpc.StatusCode.INVALID_ARGUMENT, details)
        with c1.attach("pub/cut") as m:
            assert bytes(m.buffer) == data and m.version == 0
        published = write(node_pb2.WritePagesChunk(offset=0, data=b"whole"),
                          node_pb2.WritePagesChunk(last=True))
        assert published.version == 1
    with c1.attach("pub/cut") as m:
        assert bytes(m.buffer[:5]) == b"whole" and bytes(m.buffer[5:]) == data[5:]


# -- written-page tracking of a remote writer (vas/written.py) -----------------------------

def tracking(mapping) -> bool:
    """Whether this remote writer's stores are tracked (Linux 6.7+: WP_ASYNC, PAGEMAP_SCAN)."""
    return mapping._written is not None


def found(node, name: str) -> list[str]:
    """How each sync of ``name`` logged by ``node`` found its chunks ("tracked", "hashed",
    "ranges given")."""
    return re.findall(rf"sync of {re.escape(name)}: sent \d+ changed chunks .*?\((\w[\w ]*);",
                      log_of(node))


def home_digest(client, name: str) -> str:
    """sha256 of the home's bytes of ``name`` (``client`` on the home node)."""
    with client.attach(name, "r") as home:
        return hashlib.sha256(home.buffer).hexdigest()


def test_tracked_sync_publishes_every_written_page(two):
    """Random stores (single bytes at chunk edges, pwrite-sized writes, numpy slices) over
    rounds of syncs: after each, the home's bytes are the writer's (sha256), and a store
    of the byte already there is sent too (tracked, not found by hashing)."""
    running, c1, c2 = two
    node2 = running.nodes[1]
    size = 4 * MiB + 3 * 4096  # a last chunk shorter than CHUNK
    fill(c1, "pub/tracked", size)
    rng = random.Random(11)
    with c2.attach("pub/tracked", "rw") as w:
        if not tracking(w):
            pytest.skip("this kernel cannot track a writer's stores")
        array = w.ndarray("u1")
        for _ in range(4):
            edges = [rng.randrange(size // CHUNK + 1) * CHUNK + d for d in (-1, 0)]
            for offset in [rng.randrange(size) for _ in range(5)] + edges:
                if 0 <= offset < size:
                    array[offset] = rng.randrange(256)
            offset = rng.randrange(size - 100 * 1024)
            w.write(offset, os.urandom(100 * 1024))  # >= PWRITE_MIN: past the page tables
            w.sync()
            assert home_digest(c1, "pub/tracked") == hashlib.sha256(array).hexdigest()
        array[2 * CHUNK + 5] = array[2 * CHUNK + 5]  # a store that changes nothing
        w.sync()
        assert counts(node2, "sync", "pub/tracked")[-1] == 1
        w.sync()
        assert counts(node2, "sync", "pub/tracked")[-1] == 0  # nothing stored since
        assert found(node2, "pub/tracked") == ["tracked"] * 6
        del array


def test_stores_racing_syncs_are_never_lost(two):
    """A thread stores counters into random pages while the main thread syncs: after the
    stores stop, one more sync makes the home's bytes the writer's."""
    _, c1, c2 = two
    size = 2 * MiB
    fill(c1, "pub/racing", size)
    with c2.attach("pub/racing", "rw") as w:
        array = w.ndarray("<u4")
        stop = threading.Event()

        def store():
            rng = random.Random(5)
            n = 0
            while not stop.is_set():
                n += 1
                array[rng.randrange(len(array))] = n

        writer = threading.Thread(target=store)
        writer.start()
        try:
            for _ in range(8):
                w.sync()
        finally:
            stop.set()
            writer.join(10)
        assert not writer.is_alive()
        w.sync()
        assert home_digest(c1, "pub/racing") == hashlib.sha256(array).hexdigest()
        del array


def test_without_tracking_sync_hashes_and_publishes_the_same(two, monkeypatch):
    """VAS_DISABLE_USERFAULTFD=1: no tracking, the agent hashes every chunk (a store of
    the byte already there is not sent) and the home gets the same bytes."""
    running, c1, c2 = two
    node2 = running.nodes[1]
    data = bytearray(fill(c1, "pub/hashed", 2 * MiB))  # a home "rw" attach needs uffd
    monkeypatch.setenv("VAS_DISABLE_USERFAULTFD", "1")
    monkeypatch.setattr(fetch, "_write_tracking_ok", None)  # probed again, per process
    with c2.attach("pub/hashed", "rw") as w:
        assert not tracking(w)
        for offset in (0, CHUNK - 1, CHUNK, 2 * MiB - 1):
            data[offset] ^= 0xFF  # a byte the random fill did not put there already
            w.write(offset, bytes(data[offset:offset + 1]))
        w.write(5 * CHUNK, bytes(data[5 * CHUNK:5 * CHUNK + 10]))  # changes nothing
        w.sync()
        assert counts(node2, "sync", "pub/hashed")[-1] == 3
        assert found(node2, "pub/hashed") == ["hashed"]
        assert home_digest(c1, "pub/hashed") == hashlib.sha256(data).hexdigest()


def test_failed_sync_is_sent_again_by_the_next(cluster):
    """A sync that fails (the coordinator stopped: the home cannot publish) keeps the
    writer's written pages: the next good sync sends them with the later ones."""
    running = cluster(nodes=2, memory=64 * MiB, writer_ttl=30)
    node2 = running.nodes[1]
    coordinator = running.coordinators[0]
    with vas.connect(running.nodes[0].socket) as c1, \
            vas.connect(running.nodes[1].socket) as c2:
        fill(c1, "pub/failed", 2 * MiB)
        with c2.attach("pub/failed", "rw") as w:
            if not tracking(w):
                pytest.skip("this kernel cannot track a writer's stores")
            array = w.ndarray("u1")
            array[0] = array[0]  # stores that change nothing: only tracking sends them
            array[3 * CHUNK] = array[3 * CHUNK]
            coordinator.stop()
            with pytest.raises(vas.VasError):
                w.sync()
            array[5 * CHUNK] ^= 0xFF
            coordinator.listen = coordinator.address  # the agents reconnect to its port
            coordinator.start()
            wait_for(lambda: try_sync(w), "a sync once the coordinator is back", timeout=30)
            assert counts(node2, "sync", "pub/failed")[-1] == 3
            assert found(node2, "pub/failed") == ["tracked"]
            assert home_digest(c1, "pub/failed") == hashlib.sha256(array).hexdigest()
            del array


def try_sync(mapping) -> bool:
    try:
        mapping.sync()
    except vas.Unavailable:
        return False
    return True


# -- a remote writer's sync over the bulk channel (node/bulk.py write requests) -------------

def test_sync_sends_its_bytes_over_the_bulk_channel(two):
    """A remote writer's sync of scattered MiBs goes over the bulk channel (its log says
    so, not the WritePages fallback) and the home holds the writer's bytes (sha256)."""
    running, c1, c2 = two
    node2 = running.nodes[1]
    data = bytearray(fill(c1, "pub/bulk", 16 * MiB))
    with c2.attach("pub/bulk", "rw") as w:
        for offset in (0, 3 * MiB + 5, 16 * MiB - MiB):
            piece = os.urandom(MiB)
            w.write(offset, piece)
            data[offset:offset + MiB] = piece
        assert w.sync() == 1
    assert home_digest(c1, "pub/bulk") == hashlib.sha256(data).hexdigest()
    assert re.findall(r"sync of pub/bulk: sent \d+ changed chunks \(\d+ bytes\) to node1 "
                      r"(over the bulk channel|as WritePages)", log_of(node2)) == \
        ["over the bulk channel"]


_WRITE = struct.Struct("<8sQQQ")
_REPLY = struct.Struct("<8sIQ")


def _bulk_address(running, segment_id: int) -> tuple[str, int]:
    with grpc.insecure_channel(running.nodes[0].address) as channel:
        opened = node_pb2_grpc.NodeStub(channel).OpenBulk(
            node_pb2.OpenBulkRequest(id=segment_id), timeout=10)
    host, _, port = opened.address.rpartition(":")
    return host.strip("[]"), int(port)


def _raw_write(address, header, runs, data: bytes, *, segment_id=None, cut=None):
    """A write request sent by hand on a raw socket: (status, message) of the reply, or
    None when ``cut`` bytes of ``data`` were sent and the connection closed."""
    blob = header.SerializeToString()
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(_WRITE.pack(b"VASWRITE", segment_id or header.id, len(blob), len(runs))
                     + blob + b"".join(struct.pack("<QQ", *run) for run in runs))
        if cut is not None:
            conn.sendall(data[:cut])
            return None
        conn.sendall(data)
        reply = conn.makefile("rb")
        magic, code, size = _REPLY.unpack(reply.read(_REPLY.size))
        assert magic == b"VASBULK1"
        return next(c for c in grpc.StatusCode if c.value[0] == code), \
            reply.read(size)


def test_bulk_write_requests_are_checked_like_writepages(two):
    """Write requests sent by hand to the home's bulk port: a stranger's forged token is
    refused (FAILED_PRECONDITION, Fenced at PublishVersion), a header for another id, a
    run outside the segment and a connection cut mid-bytes publish nothing; the home
    keeps its bytes and version until the lock holder's whole request publishes."""
    running, c1, _ = two
    data = fill(c1, "pub/rawbulk", 1 * MiB)
    info = c1.stat("pub/rawbulk")
    address = _bulk_address(running, info.id)
    caller = types_pb2.Caller(uid=0, gid=0, pid=1)
    forged = node_pb2.WritePagesHeader(caller=caller, name="pub/rawbulk", id=info.id,
                                       token=987654, lease_id=1)
    code, message = _raw_write(address, forged, [(0, 5)], b"forge")
    assert code == grpc.StatusCode.FAILED_PRECONDITION, message
    with grpc.insecure_channel(running.coordinators[0].address) as to_coordinator:
        lock = coordinator_pb2_grpc.CoordinatorStub(to_coordinator).AcquireWriter(
            coordinator_pb2.AcquireWriterRequest(caller=caller, name="pub/rawbulk",
                                                 ttl_seconds=30), timeout=10)
    header = node_pb2.WritePagesHeader(caller=caller, name="pub/rawbulk", id=info.id,
                                       token=lock.token, lease_id=lock.lease_id)
    assert _raw_write(address, header, [(0, 5)], b"other", segment_id=info.id + 99)[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _raw_write(address, header, [(MiB - 2, 5)], b"outer")[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    piece = os.urandom(256 * 1024)
    assert _raw_write(address, header, [(4096, len(piece))], piece, cut=100 * 1024) is None
    with c1.attach("pub/rawbulk") as m:
        assert bytes(m.buffer) == data and m.version == 0
    code, message = _raw_write(address, header, [(4096, len(piece)), (0, 5)], piece + b"whole")
    assert code == grpc.StatusCode.OK
    assert types_pb2.SegmentInfo.FromString(message).version == 1  # the cut one: nothing
    expected = b"whole" + data[5:4096] + piece + data[4096 + len(piece):]
    assert home_digest(c1, "pub/rawbulk") == hashlib.sha256(expected).hexdigest()


def test_sync_falls_back_to_writepages_when_the_bulk_channel_refuses(cluster):
    """Every bulk slot of this host taken at the home (--max-bulk-per-peer, 32): the
    writer's sync goes as WritePages and publishes the right bytes; once the slots are
    free the next sync is back on the bulk channel."""
    running = cluster(nodes=2, memory=64 * MiB)
    node2 = running.nodes[1]
    with vas.connect(running.nodes[0].socket) as c1, \
            vas.connect(running.nodes[1].socket) as c2:
        fill(c1, "pub/fallback", 2 * MiB)  # fetched by ReadPages: no bulk connection yet
        target = _bulk_address(running, c1.stat("pub/fallback").id)
        with c2.attach("pub/fallback", "rw") as w:
            held = [socket.create_connection(target, timeout=10) for _ in range(32)]
            try:
                w.write(MiB, os.urandom(MiB))
                assert w.sync() == 1
                assert home_digest(c1, "pub/fallback") == hashlib.sha256(w.buffer).hexdigest()
            finally:
                for conn in held:
                    conn.close()
            w.write(0, os.urandom(MiB))
            assert w.sync() == 2
            assert home_digest(c1, "pub/fallback") == hashlib.sha256(w.buffer).hexdigest()
    assert re.findall(r"sync of pub/fallback: sent \d+ changed chunks \(\d+ bytes\) to node1 "
                      r"(over the bulk channel|as WritePages)", log_of(node2)) == \
        ["as WritePages", "over the bulk channel"]
    assert "bulk sync of pub/fallback to node node1 failed" in log_of(node2)


# -- compare-and-set publishes (WritePagesHeader/PublishVersionRequest.base_version) ----------

def test_a_publish_on_a_stale_base_is_refused_and_applies_nothing(two):
    """A write whose base_version is not the segment's version is refused (ABORTED) by
    the home before any of its bytes reach the pages, and PublishVersion the same at the
    coordinator; on the current version both publish, and without a base (a home
    writer's sync) PublishVersion does not compare."""
    running, c1, _ = two
    data = fill(c1, "pub/base", 1 * MiB)
    info = c1.stat("pub/base")
    caller = types_pb2.Caller(uid=0, gid=0, pid=1)
    with grpc.insecure_channel(running.coordinators[0].address) as to_coordinator, \
            grpc.insecure_channel(running.nodes[0].address) as to_home:
        coordinator = coordinator_pb2_grpc.CoordinatorStub(to_coordinator)
        lock = coordinator.AcquireWriter(coordinator_pb2.AcquireWriterRequest(
            caller=caller, name="pub/base", ttl_seconds=30), timeout=10)
        home = node_pb2_grpc.NodeStub(to_home)

        def write(base: int, data: bytes):
            header = node_pb2.WritePagesHeader(caller=caller, name="pub/base", id=info.id,
                                               token=lock.token, lease_id=lock.lease_id,
                                               end_marked=True, base_version=base)
            return home.WritePages(iter([node_pb2.WritePagesChunk(header=header),
                                         node_pb2.WritePagesChunk(offset=0, data=data,
                                                                  last=True)]), timeout=10)

        def publish(**base):
            return coordinator.PublishVersion(coordinator_pb2.PublishVersionRequest(
                caller=caller, name="pub/base", id=info.id, token=lock.token,
                lease_id=lock.lease_id, **base), timeout=10)

        assert write(0, b"first").version == 1
        with pytest.raises(grpc.RpcError) as err:
            write(0, b"stale")
        assert (err.value.code(), err.value.details()) == (
            grpc.StatusCode.ABORTED, "segment pub/base: publish based on version 0 refused: "
            "the segment is at version 1 (an earlier sync of this writer was published since)")
        with c1.attach("pub/base") as m:
            assert bytes(m.buffer[:5]) == b"first" and bytes(m.buffer[5:]) == data[5:]
            assert m.version == 1
        assert "publish of pub/base from a remote writer refused, its 5 bytes dropped" in \
            log_of(running.nodes[0])
        for stale in (0, 2):
            with pytest.raises(grpc.RpcError) as err:
                publish(base_version=stale)
            assert err.value.code() == grpc.StatusCode.ABORTED
        assert publish(base_version=1).version == 2
        assert publish().version == 3  # no base: no compare
        assert write(3, b"third").version == 4
        coordinator.ReleaseWriter(coordinator_pb2.ReleaseWriterRequest(
            name="pub/base", token=lock.token, lease_id=lock.lease_id), timeout=10)
        with pytest.raises(grpc.RpcError) as err:  # a stale token says so, base or not
            publish(base_version=0)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with c1.attach("pub/base") as m:
        assert bytes(m.buffer[:5]) == b"third" and m.version == 4


def refusals(node, name: str) -> int:
    """How many remote writes of ``name`` the home ``node`` refused on their base."""
    return log_of(node).count(f"publish of {name} from a remote writer refused")


def test_a_sync_published_late_is_never_published_again_nor_over_a_later_one(cluster):
    """The home stopped (SIGSTOP) with a sync's bytes in its socket: the writer's sync
    fails (Unavailable, after --rpc-timeout) and the home publishes them late, when it
    runs again. The writer's next sync is refused on its stale base, finds the home's
    pages equal to its own and acknowledges that version instead of publishing the same
    bytes again as one more. Then a sync fails the same way and the writer syncs again
    while the home is still stopped: whichever of the two reaches the coordinator second
    is refused, and the home ends at the version the second sync returned, with the
    writer's bytes (sha256)."""
    # A failing sync waits --rpc-timeout; the calls after SIGCONT get as long on a
    # loaded machine (with 2 s this test failed once in a loaded run, cause not kept).
    running = cluster(nodes=2, memory=64 * MiB, writer_ttl=30,
                      node_args=("--rpc-timeout", "3"))
    home, node2 = running.nodes
    with vas.connect(home.socket) as c1, vas.connect(node2.socket) as c2:
        fill(c1, "pub/late", 2 * MiB)
        with c2.attach("pub/late", "rw") as w:
            w.write(0, os.urandom(4096))
            assert w.sync() == 1  # the bulk channel to the home is open now
            w.write(CHUNK, os.urandom(4096))
            os.kill(home.pid, signal.SIGSTOP)
            try:
                with pytest.raises(vas.Unavailable, match="no answer after every byte"):
                    w.sync()
            finally:
                os.kill(home.pid, signal.SIGCONT)
            wait_for(lambda: c1.stat("pub/late").version == 2,
                     "the home to publish the failed sync late", timeout=20)
            assert w.sync() == 2  # the same bytes: not published again as version 3
            assert c1.stat("pub/late").version == 2
            assert home_digest(c1, "pub/late") == hashlib.sha256(w.buffer).hexdigest()
            assert "already at the home (published late)" in log_of(node2)
            assert refusals(home, "pub/late") == 1

            w.write(2 * CHUNK, os.urandom(4096))
            os.kill(home.pid, signal.SIGSTOP)
            try:
                with pytest.raises(vas.Unavailable, match="no answer after every byte"):
                    w.sync()
                w.write(2 * CHUNK, os.urandom(4096))  # newer bytes over the late ones
                w.write(3 * CHUNK, os.urandom(4096))
                synced = []

                def sync_again():
                    try:
                        synced.append(w.sync())
                    except vas.VasError as exc:
                        synced.append(exc)

                again = threading.Thread(target=sync_again)
                again.start()
            finally:
                os.kill(home.pid, signal.SIGCONT)
            again.join(timeout=30)
            # 4 (as seen every time here): the late one reached the home first, as 3,
            # and the second was refused and sent what differs on 3
            assert synced and synced[0] in (3, 4), synced
            if synced[0] == 4:  # 1 or 2 chunks: the late one may carry the newer bytes
                # of chunk 2 (sendfile queues the memfd's pages, not a copy of them)
                assert re.search(r"sync of pub/late: sent [12] changed chunks .* on version 3, "
                                 r"now version 4 ", log_of(node2))
            wait_for(lambda: refusals(home, "pub/late") == 2,
                     "the home to refuse the second of the two", timeout=20)
            assert c1.stat("pub/late").version == synced[0]
            assert home_digest(c1, "pub/late") == hashlib.sha256(w.buffer).hexdigest()
