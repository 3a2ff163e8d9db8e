"""Whole-cluster behaviour through the public API, with clients in separate processes.

The tests drive real coordinator and agent processes (vas.cluster.LocalCluster) from
child Python processes, the way users do. They share one two-node cluster, emptied
after each test (every segment deleted, every node's memory free again), so each
starts from an empty cluster as if it were new; none kills or restarts an agent.
The test of two coordinators starts a cluster of its own (it kills one).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import vas
from vas.cluster import LocalCluster
from worlds import empty

MiB = 1 << 20


@pytest.fixture(scope="module")
def shared2(module_cluster):
    return module_cluster(nodes=2, memory=1 << 30)


@pytest.fixture
def cluster2(shared2):
    """The module's two-node cluster, empty when the test starts and emptied after it."""
    yield shared2
    empty(shared2)


def child(code: str, env: dict, *, uid: int | None = None, timeout: float = 60) -> dict:
    """Run ``code`` in a fresh Python process; it prints one JSON line, returned parsed."""
    code = textwrap.dedent(code)
    if uid is not None:
        # Drop to ``uid`` inside the child after its imports (vas.client too: `import vas`
        # loads it on first use): the interpreter itself may
        # live where that uid cannot read (e.g. under /root).
        code = ("import json, os, vas, vas.client\n"
                f"os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n" + code)
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env},
        capture_output=True, text=True, timeout=timeout, cwd="/",
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def smaps_of(pid: int, address: int) -> dict[str, int]:
    """The smaps fields (kB) of the mapping of ``pid`` that starts at ``address``."""
    fields: dict[str, int] = {}
    inside = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                inside = int(head.split("-")[0], 16) == address
            elif inside and line.split()[-1] == "kB":
                fields[head.rstrip(":")] = int(line.split()[1])
    return fields


def test_data_survives_the_creating_process(cluster2):
    env = cluster2.env()
    written = child("""
        import hashlib, json, os, vas
        data = os.urandom(8 << 20)
        with vas.connect() as c:
            c.create("survivor", len(data))
            with c.attach("survivor", "rw") as m:
                m.write(0, data)
        print(json.dumps({"sha": hashlib.sha256(data).hexdigest()}))
    """, env)
    read = child("""
        import hashlib, json, vas
        with vas.connect() as c, c.attach("survivor") as m:
            print(json.dumps({"sha": hashlib.sha256(m.read(0, 8 << 20)).hexdigest(),
                              "attachments": c.stat("survivor").attachments}))
    """, env)
    assert read["sha"] == written["sha"]


def test_four_processes_share_one_copy(cluster2):
    """Four attached processes add about one segment of memory (Pss), and see writes at once."""
    size = 256 * MiB
    env = cluster2.env()
    with vas.connect(env["VAS_NODE"]) as c:
        c.create("shared", size)
    script = textwrap.dedent("""
        import sys, vas, numpy as np
        c = vas.connect()
        m = c.attach("shared", sys.argv[1])
        view = m.ndarray(np.uint8)
        view[::4096].sum() if sys.argv[1] == "r" else view[::4096].fill(1)
        print(hex(m.address), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if cmd[0] == "write":
                view[int(cmd[1])] = int(cmd[2]); print("ok", flush=True)
            elif cmd[0] == "read":
                print(int(view[int(cmd[1])]), flush=True)
    """)
    modes = ["rw", "r", "r", "r"]
    procs = [subprocess.Popen([sys.executable, "-c", script, mode], env={**os.environ, **env},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
             for mode in modes]
    try:
        addresses = [int(p.stdout.readline(), 16) for p in procs]
        pss = [smaps_of(p.pid, a).get("Pss", 0) for p, a in zip(procs, addresses)]
        rss = [smaps_of(p.pid, a).get("Rss", 0) for p, a in zip(procs, addresses)]
        size_kb = size // 1024
        # Each process maps every page, but together they account for one copy.
        assert all(r >= 0.95 * size_kb for r in rss), rss
        assert 0.9 * size_kb <= sum(pss) <= 1.1 * size_kb, (pss, size_kb)

        procs[0].stdin.write("write 12345 77\n"); procs[0].stdin.flush()
        assert procs[0].stdout.readline().strip() == "ok"
        for reader in procs[1:]:
            reader.stdin.write("read 12345\n"); reader.stdin.flush()
            assert reader.stdout.readline().strip() == "77"
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def test_permissions_follow_mode_bits(cluster2):
    env = cluster2.env()
    with vas.connect(env["VAS_NODE"]) as c:
        c.create("private", 1 * MiB, mode=0o600)
    probe = """
        import json, vas
        out = {}
        with vas.connect() as c:
            for what, call in [("attach_r", lambda: c.attach("private", "r").detach()),
                               ("attach_rw", lambda: c.attach("private", "rw").detach()),
                               ("chmod", lambda: c.chmod("private", 0o666)),
                               ("delete", lambda: c.delete("private"))]:
                try:
                    call(); out[what] = "ok"
                except vas.VasError as exc:
                    out[what] = type(exc).__name__
        print(json.dumps(out))
    """
    assert child(probe, env, uid=65534) == {
        "attach_r": "PermissionDenied", "attach_rw": "PermissionDenied",
        "chmod": "PermissionDenied", "delete": "PermissionDenied"}
    with vas.connect(env["VAS_NODE"]) as c:
        c.chmod("private", 0o644)
    assert child(probe, env, uid=65534) == {
        "attach_r": "ok", "attach_rw": "PermissionDenied",
        "chmod": "PermissionDenied", "delete": "PermissionDenied"}
    with vas.connect(env["VAS_NODE"]) as c:
        c.chown("private", 65534, 65534)
        assert c.stat("private").uid == 65534
    assert child(probe, env, uid=65534)["delete"] == "ok"


def test_eight_processes_race_to_create_one_name(cluster2):
    sockets = [node.socket for node in cluster2.nodes]
    script = textwrap.dedent("""
        import sys, vas
        c = vas.connect(sys.argv[1])
        sys.stdin.readline()
        try:
            info = c.create("contested", 1 << 20)
            print("won", info.id, info.home, flush=True)
        except vas.AlreadyExists:
            print("lost", flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, sockets[i % 2]],
                              env={**os.environ, **cluster2.env()}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd="/") for i in range(8)]
    try:
        for p in procs:  # release all at once, once every process is connected
            p.stdin.write("go\n")
        for p in procs:
            p.stdin.flush()
        results = [p.communicate(timeout=60)[0].split() for p in procs]
    finally:
        for p in procs:
            p.kill()
    winners = [r for r in results if r[0] == "won"]
    assert len(winners) == 1, results
    assert sum(r == ["lost"] for r in results) == 7
    with vas.connect(sockets[0]) as c:
        info = c.stat("contested")
        assert (str(info.id), info.home) == (winners[0][1], winners[0][2])


def test_delete_while_attached_frees_at_last_detach(cluster2):
    env = cluster2.env()
    with vas.connect(env["VAS_NODE"]) as c:
        c.create("doomed", 4 * MiB)
        m = c.attach("doomed")
        c.delete("doomed")
        assert c.stat("doomed").state == "deleting"
        with pytest.raises(vas.NotFound):
            c.attach("doomed")
        m.detach()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                c.stat("doomed")
            except vas.NotFound:
                break
            time.sleep(0.02)
        else:
            pytest.fail("segment not freed after its last detach")
        c.create("doomed", 4 * MiB)  # the name is free again


def test_dead_client_loses_its_writer_lock(cluster2):
    env = cluster2.env()
    with vas.connect(env["VAS_NODE"]) as c:
        c.create("locked", 1 * MiB)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import vas,sys; m=vas.connect().attach('locked','rw'); "
                               "print('held', flush=True); sys.stdin.readline()"],
        env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert holder.stdout.readline().strip() == "held"
        with vas.connect(env["VAS_NODE"]) as c:
            with pytest.raises(vas.Busy):
                c.attach("locked", "rw")
            holder.kill()
            holder.wait(10)
            deadline = time.monotonic() + 5  # the agent sees the socket close at once
            while True:
                try:
                    c.attach("locked", "rw").detach()
                    break
                except vas.Busy:
                    assert time.monotonic() < deadline, "writer lock not released after EOF"
                    time.sleep(0.01)
    finally:
        holder.kill()


def test_two_coordinators_survive_losing_one(world_dir):
    with LocalCluster(world_dir, nodes=2, memory=256 * MiB, coordinators=2) as cluster:
        env = cluster.env()
        with vas.connect(env["VAS_NODE"]) as c:
            for i in range(5):
                c.create(f"before/{i}", MiB)
            cluster.coordinators[0].kill()
            for i in range(5):
                c.create(f"after/{i}", MiB)
            names = sorted(info.name for info in c.list())
        assert names == [f"after/{i}" for i in range(5)] + [f"before/{i}" for i in range(5)]
        with vas.connect(cluster.nodes[1].socket) as c2:
            assert len(c2.list("before/")) == 5
            assert {n.id for n in c2.nodes()} == {"node1", "node2"}


def test_cli_put_get_round_trip(cluster2, tmp_path):
    env = {**os.environ, **cluster2.env()}
    vasctl = [sys.executable, "-m", "vas.cli"]
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(5 * MiB + 123))
    run = lambda *args: subprocess.run([*vasctl, *args], env=env, capture_output=True, cwd="/")
    assert run("seg", "create", "demo", "--size", "64MiB").returncode == 0
    assert run("seg", "put", "demo", str(payload)).returncode == 0
    got = run("seg", "get", "demo", "--length", str(payload.stat().st_size))
    assert got.returncode == 0
    assert hashlib.sha256(got.stdout).digest() == hashlib.sha256(payload.read_bytes()).digest()
    listing = json.loads(run("seg", "ls", "-o", "json").stdout)
    (demo,) = [s for s in listing if s["name"] == "demo"]
    assert demo["size"] == 64 * MiB and demo["home"] == "node1" and demo["mode"] == 0o600
    assert demo["address"] > 0 and demo["uid"] == os.getuid()
    nodes = json.loads(run("node", "ls", "-o", "json").stdout)
    assert sorted(n["id"] for n in nodes) == ["node1", "node2"]


def test_node_ls_shows_the_local_nodes_usage_at_once(cluster2):
    with vas.connect(cluster2.nodes[0].socket) as c:
        c.create("usage", 3 * MiB)
        (mine,) = [n for n in c.nodes() if n.id == "node1"]
        assert (mine.memory_used, mine.segments) == (3 * MiB, 1)
