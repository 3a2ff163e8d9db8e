"""replicas=k with real processes: backups on other nodes, sync waits for them, and a
backup is promoted when the home agent is killed (SIGKILL), so readers on a third node
read the last synced bytes again; a segment left with no copy is lost, never zeros.

Every agent runs with ``--node-ttl 2``; the acceptance bound is 2 x that TTL from the
kill to the first read of the last synced version on another node.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time

import pytest

import vas
from faultkit import restart
from vas.coordinator import keys
from waiting import wait_for

MiB = 1 << 20
NODE_TTL = 2
SIZE = 8 * MiB


@pytest.fixture
def trio(cluster):
    """Three agents with a 2 s node lease, and two coordinators: both see a home's lease
    lapse and race to promote its backups (one transaction wins)."""
    return cluster(nodes=3, coordinators=2, node_args=["--node-ttl", str(NODE_TTL)])


def pattern(seed: int, size: int = SIZE) -> bytes:
    """``size`` bytes that differ per seed and per block (so a stale chunk shows)."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest() * (4096 // 32)
    return bytes(b ^ (i % 251) for i, b in enumerate(block[:256])) * (size // 256)


def digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


def write_and_sync(client, name: str, data: bytes, offset: int = 0) -> int:
    with client.attach(name, "rw") as m:
        m.write(offset, data)
        return m.sync()


def read_all(client, name: str, fetch: str) -> tuple[bytes, int]:
    with client.attach(name, fetch=fetch) as m:
        return m.read(0, m.size), m.version


def node_by_id(cluster, node_id: str):
    return next(node for node in cluster.nodes if node.node_id == node_id)


def memory_used(client, node_id: str) -> int:
    return next(n.memory_used for n in client.nodes() if n.id == node_id)


def test_killed_home_promotes_its_backup_and_readers_continue(trio):
    node1, _, _ = trio.nodes
    with vas.connect(node1.socket) as c1:
        with pytest.raises(vas.CapacityExceeded, match=r"^replicas=3: only 2 of the live nodes other than the home 'node1' have 8 MiB free, 3 needed$"):
            c1.create("rep/too-many", SIZE, replicas=3)
        with pytest.raises(vas.NotFound):
            c1.stat("rep/too-many")  # nothing stored

        info = c1.create("rep/kept", SIZE, replicas=1)
        assert info.replicas == 1 and info.state == "ready"
        backup = c1.stat("rep/kept").copies[0]
        assert backup != "node1"
        holder = node_by_id(trio, backup)
        reader = next(n for n in trio.nodes if n.node_id not in ("node1", backup))

        # A deleted segment's backup gives its memory back on the holder.
        with vas.connect(holder.socket) as ch:
            before = memory_used(ch, backup)
            c1.create("rep/freed", SIZE, replicas=1)
            assert backup in c1.stat("rep/freed").copies
            assert memory_used(ch, backup) == before + SIZE
            c1.delete("rep/freed")
            wait_for(lambda: memory_used(ch, backup) == before, "the backup freed")

        first, last = pattern(1), pattern(2)
        write_and_sync(c1, "rep/kept", first)
        # A second sync changes half the chunks: the backup must apply them over the first.
        version = write_and_sync(c1, "rep/kept", last[:SIZE // 2])
        expected = digest(last[:SIZE // 2] + first[SIZE // 2:])
        assert c1.stat("rep/kept").version == version == 2

    with vas.connect(reader.socket) as c3:
        # A lazy reader attached before the kill, two pages touched (jumps: no read-ahead
        # of the rest): it goes on from the promoted backup.
        early = c3.attach("rep/kept", fetch="lazy")
        assert early.fetch == "lazy"
        touched = early.read(0, 4096) + early.read(SIZE // 2, 4096)
        killed = time.monotonic()
        node1.kill()
        with early:  # its missing pages come from the promoted backup (the faults wait)
            whole = early.read(0, SIZE)
            took = time.monotonic() - killed
            assert early.read(0, 4096) + early.read(SIZE // 2, 4096) == touched
        print(f"\nthe lazy reader on {reader.node_id} attached before the kill -9 of the home "
              f"read the last synced version {took:.2f} s after it (bound {2 * NODE_TTL} s)")
        assert digest(whole) == expected and took <= 2 * NODE_TTL
        for fetch in ("eager", "lazy"):  # new attaches
            data, seen = read_all(c3, "rep/kept", fetch)
            assert digest(data) == expected and seen == version

        info = wait_for(lambda: (lambda i: i.home == backup and i)(c3.stat("rep/kept")),
                        "the promoted home in the record", timeout=2 * NODE_TTL)
        assert info.state in ("degraded", "ready")
        # The new home replaces the backup it was: the only other live node gets one.
        restored = wait_for(lambda: (lambda i: i.state == "ready" and i)(c3.stat("rep/kept")),
                            "a new backup of rep/kept", timeout=10)
        assert restored.copies == (reader.node_id,)

        # The promoted home takes writes; readers elsewhere see them.
        with vas.connect(holder.socket) as c2:
            assert write_and_sync(c2, "rep/kept", pattern(3)) == version + 1
        with c3.attach("rep/kept", fetch="eager") as m:
            assert digest(m.read(0, m.size)) == digest(pattern(3))


def test_sync_drops_a_stopped_backup_and_a_home_without_copies_is_lost(trio, oracle):
    node1 = trio.nodes[0]
    # A home killed and restarted at once (before its lease lapsed) reconciles: its
    # backup is promoted then, instead of the segment being marked lost.
    # The bytes come from a remote writer (WritePages at the home, staged at the backup).
    with vas.connect(node1.socket) as c1:
        c1.create("rep/restarted", SIZE, replicas=1)
        backup = c1.stat("rep/restarted").copies[0]
    reader = next(n for n in trio.nodes if n.node_id not in ("node1", backup))
    with vas.connect(reader.socket) as c3:
        write_and_sync(c3, "rep/restarted", pattern(6))
        write_and_sync(c3, "rep/restarted", pattern(7)[:4096], offset=SIZE - 4096)
    took = restart(node1)
    with vas.connect(reader.socket) as c3:
        data, seen = read_all(c3, "rep/restarted", "eager")
        assert digest(data) == digest(pattern(6)[:SIZE - 4096] + pattern(7)[:4096])
        assert seen == 2 and c3.stat("rep/restarted").home == backup
    print(f"\nhome restarted in {took:.2f} s; its backup on {backup} serves the last version")

    with vas.connect(node1.socket) as c1:
        c1.create("rep/stopped", SIZE, replicas=1)
        backup = c1.stat("rep/stopped").copies[0]
        stopped = node_by_id(trio, backup)
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            version = write_and_sync(c1, "rep/stopped", pattern(4))
            took = time.monotonic() - started
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        print(f"\nsync with a stopped backup returned in {took:.2f} s")
        assert took < 6 and version == 1
        info = c1.stat("rep/stopped")
        assert backup not in info.copies and info.state in ("degraded", "ready")
        # node1 replaces it on the one live node left with room (the stopped one was not).
        wait_for(lambda: c1.stat("rep/stopped").state == "ready", "a new backup", timeout=10)
        assert c1.stat("rep/stopped").copies not in ((), (backup,))

        # No copy left: its backup's node dies, then its home.
        c1.create("rep/lost", SIZE, replicas=1)
        write_and_sync(c1, "rep/lost", pattern(5))
        gone = node_by_id(trio, c1.stat("rep/lost").copies[0])
        survivor = next(n for n in trio.nodes if n not in (node1, gone))
    gone.kill()
    node1.kill()
    def marked_lost():
        kvs = oracle.kvs(keys.segment_key("rep/lost"))
        return kvs and keys.decode(kvs[0].value).get("lost")
    wait_for(marked_lost, "rep/lost marked lost (no backup to promote)", timeout=4 * NODE_TTL)
    with vas.connect(survivor.socket) as c:
        assert c.stat("rep/lost").state == "lost"
        with pytest.raises((vas.NotFound, vas.Unavailable)):  # never zeros
            read_all(c, "rep/lost", "eager")


def test_backups_come_back_while_a_home_writer_stays_attached(trio):
    """A writer attached on the home without a break: its backup killed, a new one is made
    all the same (before, none was while a home writer was attached, so the next home
    kill lost the segment), and after the home is killed too the last synced bytes are
    read on the node left."""
    node1 = trio.nodes[0]
    with vas.connect(node1.socket) as c1:
        c1.create("rep/busy", SIZE, replicas=1)
        first = c1.stat("rep/busy").copies[0]
        third = next(n for n in trio.nodes if n.node_id not in ("node1", first))
        writer = c1.attach("rep/busy", "rw")
        writer.write(0, pattern(1))
        assert writer.sync() == 1
        node_by_id(trio, first).kill()
        wait_for(lambda: c1.stat("rep/busy").copies == (third.node_id,)
                 and c1.stat("rep/busy").state == "ready",
                 "a new backup on the third node, the writer still attached", timeout=20)
        writer.write(0, pattern(2))
        assert writer.sync() == 2  # returns once the new backup holds it
        node1.kill()
    killed = time.monotonic()
    with vas.connect(third.socket) as c3:
        seen = wait_for(lambda: _read_if_promoted(c3, "rep/busy"),
                        "the third node's backup promoted", timeout=4 * NODE_TTL)
        assert seen == (digest(pattern(2)), 2)
    print(f"promoted and read {time.monotonic() - killed:.2f} s after the home's kill")


def _read_if_promoted(client, name: str):
    """(sha256, version) of ``name`` read through ``client``, or None while its home is down."""
    try:
        data, version = read_all(client, name, "eager")
    except (vas.Unavailable, vas.NotFound):
        return None
    return digest(data), version
