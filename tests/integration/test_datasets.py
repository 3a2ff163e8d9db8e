"""Segment metadata, arrays and Arrow tables through real agents (a 2-node LocalCluster
with its own etcd): put on one node, read zero-copy on both, with checksums;
bad input refused with precise errors at every hop; Mapping and SegmentRef pickles."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys

import grpc
import numpy as np
import pytest

import vas
import vas.datasets
import waiting
from vas.cluster import LocalCluster
from vas.proto import coordinator_pb2, coordinator_pb2_grpc, local_pb2, types_pb2
from worlds import gone

MiB = 1 << 20
VASCTL = [sys.executable, "-m", "vas.cli"]


@pytest.fixture(scope="module")
def two(module_dir):
    with LocalCluster(module_dir, nodes=2, memory=256 * MiB) as running:
        yield running


@pytest.fixture(scope="module")
def clients(two):
    a, b = (vas.connect(node.socket) for node in two.nodes)
    yield a, b
    a.close()
    b.close()


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def memfd_ranges() -> list[tuple[int, int]]:
    """[start, end) of every memfd mapping of this process (/proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/memfd:vas:"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def inside_memfd(address: int, size: int, ranges) -> bool:
    return any(start <= address and address + size <= end for start, end in ranges)


# -- metadata -----------------------------------------------------------------------------

def test_meta_is_kept_in_the_record_and_seen_from_every_node(clients):
    a, b = clients
    meta = {"codec": "raw", "owner/team": "ml", "note": "π ≈ 3.14"}
    info = a.create("meta/one", 4096, meta=meta)
    assert info.meta == meta
    assert b.stat("meta/one").meta == meta
    assert [s.meta for s in b.list("meta/")] == [meta]
    with a.attach("meta/one") as m:
        assert m.info.meta == meta
    assert a.create("meta/plain", 4096).meta == {}
    # exist_ok returns the existing record, with its own metadata
    assert a.create("meta/one", 4096, exist_ok=True, meta={"other": "x"}).meta == meta


def test_bad_meta_is_refused_by_the_agent_and_the_coordinator(two, clients):
    a, _ = clients
    # the client checks first ...
    with pytest.raises(vas.InvalidArgument, match="invalid meta key 'a b'"):
        a.create("meta/bad", 4096, meta={"a b": "c"})
    # ... and the agent checks what a client that skips the checks sends
    raw = local_pb2.CreateRequest(name="meta/bad", size=4096, mode=0o600,
                                  meta={"k": "v" * 5000})
    with pytest.raises(vas.InvalidArgument, match="invalid meta: 4.8 KiB of keys and values, more than the maximum 4 KiB"):
        a._connection.call("create", raw, "segment")
    assert a.stat("meta/one").name == "meta/one"  # the agent is alive and well
    with pytest.raises(vas.NotFound):
        a.stat("meta/bad")
    # ... and so does the coordinator
    with grpc.insecure_channel(two.coordinators[0].address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.CreateSegment(coordinator_pb2.CreateSegmentRequest(
                caller=types_pb2.Caller(uid=0, gid=0, pid=1, node="node1"), name="meta/bad",
                size=4096, mode=0o600, home="node1", meta={"": "x"}), timeout=10)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details() == "invalid meta key '': must be a non-empty string"


def test_vasctl_create_meta_and_stat(two):
    env = {**os.environ, "VAS_NODE": two.nodes[1].socket}

    def run(*args, expect=0):
        proc = subprocess.run([*VASCTL, *args], capture_output=True, env=env, timeout=60,
                              cwd="/")
        assert proc.returncode == expect, proc.stderr.decode()
        return proc

    run("seg", "create", "meta/cli", "--size", "4096", "--meta", "codec=zstd",
        "--meta", "rows=10")
    assert json.loads(run("seg", "stat", "meta/cli", "-o", "json").stdout)["meta"] == {
        "codec": "zstd", "rows": "10"}
    table = run("seg", "stat", "meta/cli").stdout.decode().splitlines()
    assert [line.split() for line in table if line.startswith("meta ")] == [
        ["meta", "codec", "zstd"], ["meta", "rows", "10"]]
    err = run("seg", "create", "meta/cli2", "--size", "4096", "--meta", "bad key=1",
              expect=1).stderr.decode()
    assert err == ("vasctl: error: invalid meta key 'bad key': only A-Z a-z 0-9 . _ / : - are "
                   "allowed\n")
    err = run("seg", "create", "meta/cli2", "--size", "4096", "--meta", "novalue",
              expect=2).stderr.decode()
    assert "expected KEY=VALUE" in err and err.count("\n") <= 3


# -- arrays -------------------------------------------------------------------------------

@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float64).reshape(2, 3, 4),
    np.arange(100, dtype=np.int8),
    np.array(3.5),  # 0-d
    np.zeros((0, 7), dtype=np.float32),  # empty
    np.arange(40, dtype=np.int64).reshape(5, 8)[::2, 1::3],  # non-contiguous
    np.asfortranarray(np.arange(12, dtype=np.uint16).reshape(3, 4)),  # Fortran order
    np.array([1 + 2j, 3 - 4j]),
    np.array(["ab", "cde"], dtype="U3"),
    np.array([True, False, True]),
    np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[ns]"),
    np.array([(1, (2.0, 3.0))], dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
    np.arange(6, dtype=">u4"),
], ids=lambda a: f"{a.dtype}-{a.shape}")
def test_put_get_array_round_trips_on_both_nodes(clients, array, request):
    a, b = clients
    name = "arr/" + re.sub(r"[^A-Za-z0-9._-]", "_", request.node.callspec.id)
    info = a.put_array(name, array)
    assert info.version == 1 and info.meta["vas.kind"] == "ndarray"
    assert info.size >= max(array.nbytes, 1)
    for client in (a, b):
        got = client.get_array(name)
        assert got.dtype == array.dtype and got.shape == array.shape
        assert not got.flags.writeable and got.flags.c_contiguous
        assert digest(got) == digest(array)
        with pytest.raises(ValueError):
            got[...] = got  # read-only


def resident_bytes(address: int) -> int:
    """Rss of this process's mapping that starts at ``address`` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as smaps:
        found = False
        for line in smaps:
            if not found:
                found = line.startswith(f"{address:x}-")
            elif line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping at 0x{address:x}")


def test_a_large_home_write_is_copied_in_by_the_agent(clients):
    """A home writer's first write() of >= WRITE_FROM_MIN into a range is copied by the
    agent (WriteFrom): the bytes land, yet the writer's own mapping of them stays
    unfaulted; a second write there stores through the mapping. A source that is
    itself a lazy mapping (its pages arrive through a userfaultfd: the agent's read
    of it waits for them, or fails and the client stores instead) gives the same bytes."""
    a, b = clients
    half = vas.pages.WRITE_FROM_MIN
    data = np.random.default_rng(7).integers(0, 256, 2 * half, dtype=np.uint8)
    b.put_array("arr/elsewhere", data[half:])  # homed on b: a lazy replica on a
    a.create("arr/written", 2 * half)
    lazy = a.attach("arr/elsewhere", "r")
    try:
        with a.attach("arr/written", "rw") as m:
            assert m.fetch == "home (no fetch)"
            assert m.write(0, data[:half]) == half
            assert resident_bytes(m.address) == 0  # not one page faulted in here
            assert m.write(half, lazy.buffer[:half]) == half
            m.sync()
            for client in (a, b):
                with client.attach("arr/written", "r", fetch="eager") as r:
                    assert digest(np.frombuffer(r.buffer, dtype=np.uint8)) == digest(data)
            m.write(0, data[half:])  # written before: stored through the mapping
            assert resident_bytes(m.address) >= half
            m.sync()
        with b.attach("arr/written", "r", fetch="eager") as r:
            assert digest(np.frombuffer(r.buffer, dtype=np.uint8)) == digest(
                np.concatenate([data[half:], data[half:]]))
    finally:
        lazy.detach()
        a.delete("arr/written")
        vas.datasets.WARM.clear()
        b.delete("arr/elsewhere")


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_a_large_put_lands_whole_however_its_pages_are_allocated(clients, layout):
    """A contiguous put of ALLOCATE_ON_WRITE_MIN bytes or more tells the agent it copies
    every byte in at once (its pages are allocated by that copy, not reserved first); a
    strided one does not (it stores through its own mapping). Either way every byte is
    the array's on both nodes, and a later writer's stores land as in any segment."""
    from vas.node.homes import ALLOCATE_ON_WRITE_MIN

    a, b = clients
    rows = np.random.default_rng(11).random((2, ALLOCATE_ON_WRITE_MIN // 8))
    array = rows[0] if layout == "contiguous" else rows.T.reshape(-1)[::2]
    assert array.flags.c_contiguous == (layout == "contiguous")
    name = f"arr/large-{layout}"
    a.put_array(name, array)
    try:
        for client in (a, b):
            assert digest(client.get_array(name, fetch="eager")) == digest(array)
        with a.attach(name, "rw") as m:
            m.write(4096, b"later")
            m.sync()
        with b.attach(name, "r", fetch="eager") as r:
            assert bytes(r.buffer[4096:4101]) == b"later"
            assert bytes(r.buffer[:4096]) == np.ascontiguousarray(array).tobytes()[:4096]
    finally:
        vas.datasets.WARM.clear()
        a.delete(name, force=True)


def test_get_array_is_zero_copy_and_keeps_its_pages(clients):
    a, b = clients
    data = np.random.default_rng(1).random(1 << 18)  # 2 MiB
    a.put_array("arr/big", data)
    for client in (a, b):
        got = client.get_array("arr/big")
        assert inside_memfd(got.ctypes.data, got.nbytes, memfd_ranges())
        base = got
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        assert isinstance(base, memoryview)  # a view of the mapping's pages, not a copy
        assert digest(got) == digest(data)
    # the array alone keeps its pages and the attachment: with no warm mapping left
    # and the segment deleted, it stays "deleting" while the array lives, and goes with it
    held = a.get_array("arr/big")
    del got, base
    vas.datasets.WARM.clear()
    a.delete("arr/big")
    assert a.stat("arr/big").state == "deleting"
    assert digest(held) == digest(data)
    del held
    waiting.wait_for(lambda: gone(a, "arr/big"), "the array's end to free the segment",
                     timeout=15)


def test_array_errors(clients):
    a, _ = clients
    with pytest.raises(vas.InvalidArgument, match="dtype object: it holds references"):
        a.put_array("arr/obj", np.array([object(), 1], dtype=object))
    with pytest.raises(vas.NotFound):
        a.stat("arr/obj")  # nothing created
    a.create("arr/plain", 4096)
    with pytest.raises(vas.InvalidArgument,
                       match=r"segment arr/plain does not hold what get_array reads "
                             r"\(vas.kind='ndarray'\): it has no vas.kind metadata"):
        a.get_array("arr/plain")
    with pytest.raises(vas.NotFound):
        a.get_array("arr/missing")
    with pytest.raises(vas.InvalidArgument, match="invalid segment name"):
        a.put_array("/bad", np.zeros(3))
    a.put_array("arr/twice", np.zeros(3))
    with pytest.raises(vas.AlreadyExists):
        a.put_array("arr/twice", np.zeros(3))
    # exist_ok: the same dtype and shape is returned unchanged, other contents refused
    assert a.put_array("arr/twice", np.ones(3), exist_ok=True).meta["vas.shape"] == "[3]"
    assert a.get_array("arr/twice").sum() == 0
    with pytest.raises(vas.AlreadyExists, match="already exists with other contents"):
        a.put_array("arr/twice", np.zeros(4), exist_ok=True)


def test_module_level_shortcuts(two, monkeypatch):
    import vas.client

    monkeypatch.setenv("VAS_NODE", two.nodes[1].socket)
    # a default connection of this test's own, gone with it (not left to later modules)
    monkeypatch.setattr(vas.client, "_default_client", None)
    vas.put_array("arr/module", np.arange(5))
    assert vas.get_array("arr/module").tolist() == [0, 1, 2, 3, 4]


# -- Arrow tables -------------------------------------------------------------------------

def test_put_get_table_zero_copy_on_both_nodes(clients):
    pa = pytest.importorskip("pyarrow")
    a, b = clients
    rows = 50_000
    table = pa.table({"id": np.arange(rows, dtype=np.int64),
                      "x": np.random.default_rng(2).random(rows),
                      "name": [f"row{i}" for i in range(rows)]})
    info = a.put_table("tab/one", table)
    assert info.meta["vas.kind"] == "arrow" and info.meta["vas.rows"] == str(rows)
    for client in (a, b):
        got = client.get_table("tab/one")
        assert got.equals(table)
        ranges = memfd_ranges()
        for column in got.columns:
            for chunk in column.chunks:
                for buf in chunk.buffers():
                    if buf is not None and buf.size:
                        assert inside_memfd(buf.address, buf.size, ranges), column
    # a RecordBatch is put as a one-batch table
    a.put_table("tab/batch", pa.record_batch({"v": [1, 2, 3]}))
    assert b.get_table("tab/batch").column("v").to_pylist() == [1, 2, 3]
    with pytest.raises(vas.InvalidArgument, match="expected a pyarrow.Table"):
        a.put_table("tab/bad", np.zeros(3))
    with pytest.raises(vas.InvalidArgument, match="does not hold what get_table reads"):
        a.get_table("meta/one")


# -- handles that travel ------------------------------------------------------------------

CHILD = """
import pickle, sys, hashlib, numpy as np
obj = pickle.loads(sys.stdin.buffer.read())
if hasattr(obj, "get"):
    data = obj.get()
    print(obj.name, hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest())
else:
    print(obj.name, obj.mode, repr(obj.fetch), hashlib.sha256(obj.read(0, obj.size)).hexdigest())
    obj.detach()
"""


def run_child(payload: bytes, socket: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", CHILD], input=payload, capture_output=True,
                          env={**os.environ, "VAS_NODE": socket}, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().split()


def test_mapping_pickles_as_a_reference(two, clients):
    a, _ = clients
    data = np.arange(4096, dtype=np.uint8)
    a.put_array("pickle/m", data)
    with a.attach("pickle/m", fetch="eager") as m:
        whole = hashlib.sha256(m.read(0, m.size)).hexdigest()
        payload = pickle.dumps(m)
        assert len(payload) < 200  # a reference, not the bytes
    # unpickled on the other node, it is a new attachment there (eager, as asked)
    assert run_child(payload, two.nodes[1].socket) == ["pickle/m", "r", "'eager'", whole]
    assert run_child(payload, two.nodes[0].socket) == ["pickle/m", "r", "'home", "(no",
                                                       "fetch)'", whole]


def test_segment_ref_travels_and_refuses_a_replaced_name(two, clients):
    a, _ = clients
    data = np.random.default_rng(3).random((64, 64))
    ref = vas.SegmentRef.of(a.put_array("pickle/ref", data))
    assert (ref.kind, ref.dtype, ref.shape, ref.version, ref.nbytes) == (
        "ndarray", "<f8", (64, 64), 1, data.nbytes)
    assert run_child(pickle.dumps(ref), two.nodes[1].socket) == ["pickle/ref", digest(data)]
    assert digest(ref.get(client=a)) == digest(data)
    a.delete("pickle/ref")
    a.put_array("pickle/ref", data)  # same name, another segment
    with pytest.raises(vas.NotFound, match=r"the name now holds another segment"):
        ref.get(client=a)
    with pytest.raises(vas.InvalidArgument, match="holds no array or table"):
        vas.SegmentRef.of(a.stat("meta/one"))


# -- warm mappings --------------------------------------------------------------------------

def test_a_second_read_reuses_the_warm_mapping_until_the_data_changes(clients):
    a, b = clients
    data = np.arange(1 << 16, dtype=np.int64)
    a.put_array("warm/x", data)
    first = b.get_array("warm/x")
    again = b.get_array("warm/x")
    assert again.ctypes.data == first.ctypes.data  # the same pages, mapped once
    del first, again
    with a.attach("warm/x", "rw") as m:  # a new version on the home
        m.write(0, np.full(1 << 16, 7, dtype=np.int64))
        m.sync()
    for client in (a, b):  # every reader sees it: a warm mapping serves only its version
        assert digest(client.get_array("warm/x")) == digest(np.full(1 << 16, 7, np.int64))


def test_a_warm_mapping_lets_go_of_a_deleted_dataset(two, clients, monkeypatch):
    a, _ = clients
    monkeypatch.setattr(vas.datasets, "KEEP_SECONDS", 0.5)
    a.put_array("warm/gone", np.ones(1000))
    with vas.connect(two.nodes[0].socket) as reader:  # another reader on the home node
        assert reader.get_array("warm/gone").sum() == 1000  # warm there, array dropped
        a.delete("warm/gone")  # from another connection: the warm mapping holds it ...
        assert a.stat("warm/gone").state == "deleting"
        waiting.wait_for(lambda: gone(a, "warm/gone"), "the warm mapping to expire",
                         timeout=15)  # ... KEEP_SECONDS
    # a delete from the reading connection itself is not held up at all
    a.put_array("warm/mine", np.ones(10))
    assert a.get_array("warm/mine").sum() == 10
    a.delete("warm/mine")
    a.put_array("warm/mine", np.zeros(10))  # the name is free at once
    assert a.get_array("warm/mine").sum() == 0


def test_put_with_a_ttl_expires(clients):
    a, b = clients
    info = a.put_array("ttl/x", np.ones(10), ttl=2)
    assert info.expires is not None and info.expires - info.created >= 2
    assert b.get_array("ttl/x").sum() == 10
    waiting.wait_for(lambda: gone(a, "ttl/x"), "the dataset's ttl to end", timeout=20)
    with pytest.raises(vas.NotFound):
        b.get_array("ttl/x")
