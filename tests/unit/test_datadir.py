"""node/datadir.py on its own: the lock, the node id kept in the directory, manifests
written and verified, and what a start removes (no agent, no cluster)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from vas.core.fetch import write_protect_available
from vas.node.datadir import DataDir, DataDirError, zero_hashes
from vas.node.publish import CHUNK, hashes
from vas.proto import types_pb2

SIZE = 2 * CHUNK + 8192  # the last chunk is a short one


@pytest.fixture
def data_dir(tmp_path):
    opened = DataDir.open(str(tmp_path / "data"))
    yield opened
    opened.close()


def created(data_dir: DataDir, segment_id: int, data: bytes = b"") -> types_pb2.SegmentInfo:
    """A segment of SIZE bytes kept as a create would keep it, then ``data`` published
    at version 1 (when given)."""
    info = types_pb2.SegmentInfo(name=f"seg/{segment_id}", id=segment_id, size=SIZE,
                                 address=0x2000_0000_0000)
    memory = data_dir.allocate(info.name, SIZE)
    data_dir.keep(memory, info)
    if data:
        os.pwrite(memory.fd, data, 0)
        data_dir.save(info, 1, hashes(memoryview(data.ljust(SIZE, b"\0"))))
    memory.close()
    return info


def test_one_agent_per_directory(data_dir):
    with pytest.raises(DataDirError) as refused:
        DataDir.open(data_dir.path)
    assert str(refused.value) == f"--data-dir {data_dir.path} is in use by another agent"
    data_dir.close()
    DataDir.open(data_dir.path).close()


def test_the_node_id_is_kept_and_another_is_refused(data_dir):
    assert data_dir.node_id(None, "host:1234") == "host:1234"
    assert data_dir.node_id(None, "host:999") == "host:1234"  # a later start, another port
    assert data_dir.node_id("host:1234", "x") == "host:1234"
    with pytest.raises(DataDirError) as refused:
        data_dir.node_id("node7", "x")
    assert str(refused.value) == (f"--data-dir {data_dir.path} holds the segments of node "
                                  "host:1234, not node7: start it with --id host:1234 (or "
                                  "another --data-dir)")


def test_a_new_segment_is_all_zeros_and_verifies(data_dir):
    info = created(data_dir, 7)
    [stored] = data_dir.stored()
    assert stored.failed == []
    assert (stored.manifest["id"], stored.manifest["version"], stored.manifest["size"]) == \
        (7, 0, SIZE)
    assert zero_hashes(SIZE) == hashes(memoryview(bytes(SIZE)))
    stored.memory.release()  # a delete: both files go
    assert os.listdir(data_dir.segments) == []
    assert info.id == 7


def test_a_flipped_byte_fails_its_chunk_only(data_dir):
    created(data_dir, 8, os.urandom(SIZE))
    path = os.path.join(data_dir.segments, "8.data")
    with open(path, "r+b") as data:
        data.seek(SIZE - 1)
        last = data.read(1)
        data.seek(SIZE - 1)
        data.write(bytes([last[0] ^ 1]))
    [stored] = data_dir.stored()
    assert stored.failed == [2 * CHUNK]
    stored.memory.close()  # shutdown: the files stay
    assert sorted(os.listdir(data_dir.segments)) == ["8.data", "8.json"]


def test_a_start_removes_what_was_never_acknowledged(data_dir):
    data_dir.allocate("in flight", SIZE).close()          # a create that never finished
    created(data_dir, 9)
    os.unlink(os.path.join(data_dir.segments, "9.json"))  # a data file without manifest
    created(data_dir, 10)
    with open(os.path.join(data_dir.segments, "10.json"), "w") as manifest:
        manifest.write("{not json")                       # a manifest that cannot be read
    created(data_dir, 11)
    with open(os.path.join(data_dir.segments, "11.json")) as manifest:
        record = json.load(manifest)
    os.truncate(os.path.join(data_dir.segments, "11.data"), CHUNK)  # another size
    assert data_dir.stored() == []
    assert os.listdir(data_dir.segments) == []
    assert record["size"] == SIZE


def _file_system(path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_write_protect_is_probed_on_the_directory_s_own_file_system(tmp_path):
    """tmpfs files take userfaultfd write-protection (home "rw" attaches are revocable);
    a disk file system's do not, and the agent must know before it hands one out."""
    shm = tempfile.mkdtemp(prefix="vas-data-", dir="/dev/shm")
    try:
        on_tmpfs = DataDir.open(shm)
        assert (on_tmpfs.no_write_protect == "") == write_protect_available()
        on_tmpfs.close()
    finally:
        shutil.rmtree(shm)
    if _file_system(tmp_path) == "tmpfs":
        pytest.skip(f"{tmp_path} is on tmpfs: no disk file system to compare with")
    on_disk = DataDir.open(str(tmp_path / "disk"))
    assert on_disk.no_write_protect == ("userfaultfd write-protection of its files failed "
                                        "(Invalid argument; it needs tmpfs)")
    on_disk.close()


def test_hashes_after_pieces_are_those_of_the_bytes_once_applied(data_dir):
    info = created(data_dir, 12, os.urandom(SIZE))
    [stored] = data_dir.stored()
    memory = stored.memory
    pieces = [(0, os.urandom(CHUNK)),                  # a whole chunk
              (CHUNK + 5, b"partial"),                 # part of one
              (2 * CHUNK, os.urandom(8192)),           # the short last chunk, whole
              (100, b"over the first piece")]          # a later piece over an earlier one
    after = memory.hashes_after(stored.kept, pieces)
    for offset, data in pieces:
        os.pwrite(memory.fd, data, offset)
    assert after == memory.hashes()
    memory.close()
    assert info.id == 12


def test_a_publish_interrupted_while_applied_is_replayed_at_start(data_dir):
    before = os.urandom(SIZE)
    info = created(data_dir, 13, before)
    [stored] = data_dir.stored()
    pieces = [(CHUNK - 10, b"across two chunks"), (2 * CHUNK, b"tail")]
    after = stored.memory.hashes_after(stored.kept, pieces)
    data_dir.intend(info.id, 2, pieces, after)
    os.pwrite(stored.memory.fd, pieces[0][1][:4], pieces[0][0])  # the agent dies mid-apply
    stored.memory.close()

    [replayed] = data_dir.stored()
    assert (replayed.manifest["version"], replayed.failed) == (2, [])
    expected = bytearray(before)
    for offset, data in pieces:
        expected[offset:offset + len(data)] = data
    assert os.pread(replayed.memory.fd, SIZE, 0) == bytes(expected)
    assert sorted(os.listdir(data_dir.segments)) == ["13.data", "13.json"]
    # A redo the manifest has caught up with already (the agent died before removing it)
    # is removed, not applied again.
    data_dir.intend(info.id, 2, [(0, b"stale")], after)
    replayed.memory.close()
    [again] = data_dir.stored()
    assert (again.manifest["version"], again.failed) == (2, [])
    assert os.pread(again.memory.fd, 5, 0) == bytes(expected[:5])
    assert sorted(os.listdir(data_dir.segments)) == ["13.data", "13.json"]
    again.memory.close()
