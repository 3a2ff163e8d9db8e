"""``--data-dir``: a home agent killed with SIGKILL and started again on the same
directory re-adopts its segments, verified chunk by chunk.

Segments written and synced (by a writer on the home and by one on another node)
read back with their exact bytes (sha256) at the same version, locally and from
the other node, and take new writes; a clean stop keeps them too, and a segment
deleted while the home was down leaves no files. Chunks that differ from the last
sync -- a byte flipped on disk while the agent was down, or a home writer's stores
after its last sync -- are reported (log), the segment reads ``lost`` everywhere
and an attach of it fails (on its home with DataLoss naming the chunk), while the
others serve on; a home writer of the killed agent that still maps the segment
cannot change what the restarted agent serves. Started without the directory the
agent behaves as before: the segments are lost.

The data dirs are on tmpfs (/dev/shm): the home "rw" attaches here need it
(userfaultfd write-protection of shared memory; node/datadir.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.request

import pytest

import vas
from faultkit import restart, usage
from vas.node import locks
from vas.node.publish import CHUNK

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def data_dir(pair):
    """A data dir on tmpfs for ``pair``'s node1; after the test the agents' logs must
    hold no traceback and, when run with VAS_LOCK_CHECK, no lock-order violation."""
    path = tempfile.mkdtemp(prefix="vas-data-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)
    for node in pair.nodes:
        with open(node.log_path, errors="replace") as log:
            text = log.read()
        assert locks.MARKER not in text and "Traceback" not in text, node.tail(80)


def on_data_dir(node, path: str | None) -> None:
    """Start ``node`` again (nothing held yet) with ``--data-dir path``."""
    node.stop()
    node.data_dir = path
    node.start()


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_and_sync(node, name: str, offset: int, data: bytes, ranges=None) -> int:
    with vas.connect(node.socket) as client, client.attach(name, "rw") as mapping:
        mapping.write(offset, data)
        return mapping.sync(ranges)


def read_all(node, name: str, fetch: str = "eager") -> tuple[int, bytes]:
    with vas.connect(node.socket) as client, client.attach(name, fetch=fetch) as mapping:
        return mapping.version, mapping.read(0, mapping.size)


def files_of(path: str, segment_id: int) -> list[str]:
    return sorted(entry for entry in os.listdir(os.path.join(path, "segments"))
                  if entry.split(".")[0] == str(segment_id))


def stat_cli(node, name: str) -> dict:
    """``vasctl seg stat NAME -o json`` against ``node``'s agent, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "vas.cli", "seg", "stat", name, "-o", "json",
                           "--node", node.socket], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_synced_segments_survive_kill_9_with_their_exact_bytes(pair, data_dir):
    node1, node2 = pair.nodes
    on_data_dir(node1, data_dir)
    sizes = {"dd/home": MiB + 3 * PAGE, "dd/remote": 3 * MiB, "dd/zeros": CHUNK,
             "dd/gone": CHUNK}
    with vas.connect(node1.socket) as c1:
        ids = {name: c1.create(name, size, mode=0o644).id for name, size in sizes.items()}
    content = {name: bytes(size) for name, size in sizes.items()}
    # A writer on the home (its sync is PublishVersion) ...
    content["dd/home"] = pattern(1, sizes["dd/home"])
    assert write_and_sync(node1, "dd/home", 0, content["dd/home"]) == 1
    edit = pattern(2, 1000)
    assert write_and_sync(node1, "dd/home", MiB + 5, edit, [(MiB + 5, 1000)]) == 2
    content["dd/home"] = content["dd/home"][:MiB + 5] + edit + content["dd/home"][MiB + 1005:]
    # ... and one on another node (its sync streams the changed chunks: WritePages).
    content["dd/remote"] = pattern(3, sizes["dd/remote"])
    assert write_and_sync(node2, "dd/remote", 0, content["dd/remote"]) == 1
    versions = {"dd/home": 2, "dd/remote": 1, "dd/zeros": 0}

    took = restart(node1)
    print(f"\nnode1 killed and serving again on its data dir after {took:.2f} s")
    node1.stop()  # a clean stop keeps them too; a delete made meanwhile leaves no files
    with vas.connect(node2.socket) as c2:
        c2.delete("dd/gone")
    node1.start()
    assert files_of(data_dir, ids["dd/gone"]) == []

    seen = stat_cli(node1, "dd/home")
    assert (seen["state"], seen["version"]) == ("ready", 2), seen
    with vas.connect(node2.socket) as c2:
        for name, version in versions.items():
            info = c2.stat(name)
            assert (info.state, info.id, info.version) == ("ready", ids[name], version), info
    for name, version in versions.items():
        for node, fetch in ((node1, "lazy"), (node2, "eager")):
            seen, data = read_all(node, name, fetch)
            assert (seen, sha(data)) == (version, sha(content[name])), (name, node.node_id)
    assert usage(node1) == (sum(sizes.values()) - sizes["dd/gone"], 3)

    # Both kinds of writer carry on from the re-adopted bytes.
    assert write_and_sync(node1, "dd/home", 0, b"after") == 3
    assert write_and_sync(node2, "dd/remote", 2 * MiB, b"after too") == 2
    with open(os.path.join(data_dir, "segments", f"{ids['dd/home']}.json")) as manifest:
        assert json.load(manifest)["version"] == 3
    assert read_all(node2, "dd/home")[1][:5] == b"after"
    assert read_all(node1, "dd/remote")[1][2 * MiB:2 * MiB + 9] == b"after too"

    with vas.connect(node1.socket) as c1:
        c1.delete("dd/zeros")
    assert files_of(data_dir, ids["dd/zeros"]) == []
    for name in ("dd/home", "dd/remote"):  # no redo file left behind by a publish
        assert files_of(data_dir, ids[name]) == [f"{ids[name]}.data", f"{ids[name]}.json"]


#: A home writer that syncs, then writes again without syncing (unless told -1), then
#: waits; told "go" (its agent killed and started again meanwhile), it stores into its
#: mapping, which it still holds.
HOME_WRITER = textwrap.dedent("""
    import sys, vas
    socket, name, chunk, unsynced = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    client = vas.connect(socket)
    mapping = client.attach(name, "rw")
    mapping.write(chunk + 10, b"synced")
    mapping.sync()
    if unsynced >= 0:
        mapping.write(unsynced, b"never synced")
    print("written", flush=True)
    sys.stdin.readline()
    mapping.buffer[0:6] = b"zombie"
    print("stored", flush=True)
    sys.stdin.readline()
""")


def home_writer(node, name: str, unsynced: int) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", HOME_WRITER, node.socket, name, str(CHUNK),
                               str(unsynced)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "written\n"
    return writer


def failed_chunks_counted(node) -> float:
    """``vas_node_chunks_failed_checksum_total`` of ``node``'s current process (its
    metrics listener is the last one its log names)."""
    with open(node.log_path, errors="replace") as log:
        url = re.findall(r"serving metrics on (http://[^\s\"]+/metrics)", log.read())[-1]
    with urllib.request.urlopen(url, timeout=10) as page:
        text = page.read().decode()
    return float(re.search(r"^vas_node_chunks_failed_checksum_total (\S+)$", text, re.M)[1])


def test_chunks_that_differ_from_the_last_sync_are_reported_never_served(pair, data_dir):
    node1, node2 = pair.nodes
    on_data_dir(node1, data_dir)
    with vas.connect(node1.socket) as c1:
        ids = {name: c1.create(name, MiB, mode=0o644).id
               for name in ("dd/unsynced", "dd/corrupt", "dd/fine", "dd/zombie")}
    fine = pattern(4, MiB)
    write_and_sync(node1, "dd/fine", 0, fine)
    write_and_sync(node1, "dd/corrupt", 0, pattern(5, MiB))
    writers = [home_writer(node1, "dd/unsynced", 2 * CHUNK + 5),
               home_writer(node1, "dd/zombie", -1)]
    try:
        node1.kill()
        # A byte flipped at rest while the agent is down.
        with open(os.path.join(data_dir, "segments", f"{ids['dd/corrupt']}.data"),
                  "r+b") as data:
            data.seek(3 * CHUNK + 123)
            byte = data.read(1)
            data.seek(3 * CHUNK + 123)
            data.write(bytes([byte[0] ^ 0x40]))
        node1.args += ["--metrics-port", "0"]
        node1.start()
        # The writer of the killed agent still maps the old file: its stores now must
        # not reach what the restarted agent serves.
        writers[1].stdin.write("go\n")
        writers[1].stdin.flush()
        assert writers[1].stdout.readline() == "stored\n"
        zombie = bytes(CHUNK + 10) + b"synced" + bytes(MiB - CHUNK - 16)
        assert read_all(node2, "dd/zombie") == (1, zombie)
        assert read_all(node1, "dd/zombie", "lazy") == (1, zombie)
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
            writer.stdin.close()
            writer.stdout.close()

    for name, offset, version in (("dd/corrupt", 3 * CHUNK, 1), ("dd/unsynced", 2 * CHUNK, 1)):
        reported = (f"chunk at offset {offset} of segment {name} failed its checksum when node "
                    f"node1 restarted: its bytes of version {version} are lost, never served "
                    "(delete the segment)")
        with open(node1.log_path, errors="replace") as log:
            assert reported in log.read()
        assert stat_cli(node2, name)["state"] == "lost"
        for fetch in ("eager", "lazy"):  # the home names the chunk; elsewhere it is lost
            with pytest.raises(vas.DataLoss) as failed:
                read_all(node1, name, fetch)
            assert str(failed.value) == reported
            with pytest.raises(vas.NotFound) as failed:
                read_all(node2, name, fetch)
            assert str(failed.value) == (f"segment {name} was lost: its home node node1 "
                                         "restarted without it (delete it to free the name)")
    assert failed_chunks_counted(node1) == 2.0
    # The rest serves on, and a damaged segment can be deleted.
    assert read_all(node2, "dd/fine") == (1, fine)
    with vas.connect(node1.socket) as c1:
        c1.delete("dd/corrupt")
        assert files_of(data_dir, ids["dd/corrupt"]) == []
        c1.create("dd/corrupt", CHUNK)
    assert write_and_sync(node1, "dd/corrupt", 0, b"new") == 1


def test_a_large_first_write_is_copied_into_the_file_and_survives_kill_9(pair, data_dir):
    """A home writer's first write of 8 MiB or more is copied in by the agent
    (WriteFrom), which maps a data dir's file read-only: it writes the file instead
    (it was an internal error, a TypeError, before)."""
    node1, _ = pair.nodes
    on_data_dir(node1, data_dir)
    size = 72 * MiB  # past both the WriteFrom size and the two-thread copy's
    with vas.connect(node1.socket) as c1:
        c1.create("dd/large", size, mode=0o644)
    data = pattern(7, size)
    assert write_and_sync(node1, "dd/large", 0, data) == 1
    assert read_all(node1, "dd/large") == (1, data)
    restart(node1)
    assert read_all(node1, "dd/large") == (1, data)


def test_a_start_without_the_data_dir_loses_the_segments_as_before(pair, data_dir):
    node1, _ = pair.nodes
    on_data_dir(node1, data_dir)
    with vas.connect(node1.socket) as c1:
        segment_id = c1.create("dd/kept", CHUNK, mode=0o644).id
    write_and_sync(node1, "dd/kept", 0, b"bytes")
    node1.kill()
    node1.data_dir = None
    node1.start()
    with vas.connect(node1.socket) as c1:
        assert c1.stat("dd/kept").state == "lost"
    # The files stay where they were: nothing but that directory's agent touches them.
    assert files_of(data_dir, segment_id) == [f"{segment_id}.data", f"{segment_id}.json"]
    assert usage(node1) == (0, 0)
    # Back on the data dir: the record was marked lost meanwhile (for good), so the
    # files go instead of a copy the rest of the cluster calls lost.
    node1.kill()
    node1.data_dir = data_dir
    node1.start()
    assert files_of(data_dir, segment_id) == []
    assert usage(node1) == (0, 0)
    with vas.connect(node1.socket) as c1:
        assert c1.stat("dd/kept").state == "lost"


def test_on_a_disk_home_writers_are_refused_and_remote_ones_kept(pair, tmp_path):
    """A disk file's mapping takes no userfaultfd write-protection, so a home "rw"
    attach could not be revoked: refused, saying why; a writer on another node works."""
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                          text=True, check=True).stdout.strip()
    if kind == "tmpfs":
        pytest.skip(f"{tmp_path} is on tmpfs: no disk file system here")
    node1, node2 = pair.nodes
    path = str(tmp_path / "data")
    on_data_dir(node1, path)
    with vas.connect(node1.socket) as c1:
        c1.create("dd/disk", MiB, mode=0o644)
        with pytest.raises(vas.Unavailable) as refused:
            c1.attach("dd/disk", "rw")
    assert str(refused.value) == (
        f'segment dd/disk is homed on this node, whose --data-dir {path} cannot take a '
        'revocable "rw" mapping: userfaultfd write-protection of its files failed (Invalid '
        'argument; it needs tmpfs); attach "rw" from another node instead')
    data = pattern(6, MiB)
    assert write_and_sync(node2, "dd/disk", 0, data) == 1
    restart(node1)
    assert read_all(node1, "dd/disk") == (1, data)
