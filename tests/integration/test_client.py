"""The Python client against a real local cluster (etcd, coordinator, two agents).

One cluster serves the whole module; each test uses its own segment names.
Child processes run from cwd / with the environment of the tests.
"""
from __future__ import annotations

import functools
import hashlib
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import vas
import waiting
from vas import _native
from vas.cluster import LocalCluster

np = pytest.importorskip("numpy")

MiB = 1 << 20
NODE_MEMORY = 256 * MiB
wait_for = functools.partial(waiting.wait_for, timeout=10.0)


@pytest.fixture(scope="module")
def cluster(module_dir):
    with LocalCluster(module_dir, nodes=2, memory=NODE_MEMORY) as running:
        yield running


@pytest.fixture(scope="module")
def env(cluster):
    return cluster.env()


@pytest.fixture
def client(env):
    with vas.connect(env["VAS_NODE"]) as c:
        yield c


def run_child(code: str, env: dict) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned parsed."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- lifecycle ---------------------------------------------------------------------

def test_lifecycle(client):
    info = client.create("life/a", 10_000, mode=0o640)
    assert isinstance(info, vas.SegmentInfo)
    assert (info.name, info.size, info.mode, info.uid, info.gid) == \
        ("life/a", 12_288, 0o640, os.getuid(), os.getgid())
    assert info.home == client.local_node.id == "node1"
    assert info.state == "ready" and info.version == 0 and info.expires is None
    assert info.address >= 0x200000000000 and info.address % (2 * MiB) == 0
    assert client.stat("life/a") == info
    assert client.create("life/a", 10_000, exist_ok=True).id == info.id

    client.create("life/b", 4096)
    assert [s.name for s in client.list("life/")] == ["life/a", "life/b"]
    assert info.name in {s.name for s in client.list()}

    with client.attach("life/a", "rw") as writer:
        assert (writer.size, writer.mode, writer.info.id) == (12_288, "rw", info.id)
        assert writer.write(100, b"hello") == 5
        with client.attach("life/a") as reader:
            assert reader.read(100, 5) == b"hello"
            assert writer.fetch == reader.fetch == "home (no fetch)"  # nothing fetched
            assert reader.buffer.readonly and not writer.buffer.readonly
            wait_for(lambda: client.stat("life/a").attachments == 2, what="2 attachments")
    wait_for(lambda: client.stat("life/a").attachments == 0, what="0 attachments")

    assert client.chmod("life/a", 0o604).mode == 0o604
    assert client.stat("life/a").mode == 0o604
    client.chown("life/a", 12345, 23456)
    assert (client.stat("life/a").uid, client.stat("life/a").gid) == (12345, 23456)

    client.delete("life/a")
    client.delete("life/b")
    with pytest.raises(vas.NotFound):
        client.stat("life/a")
    assert client.list("life/") == []


def test_segment_data_survives_the_creating_process(env, client):
    written = run_child("""
        import hashlib, json, os, vas
        data = os.urandom(3 << 20)
        with vas.connect() as c:
            c.create("survive/x", len(data))
            with c.attach("survive/x", "rw") as m:
                m.write(0, data)
        print(json.dumps({"sha": hashlib.sha256(data).hexdigest(), "pid": os.getpid()}))
    """, env)
    read = run_child("""
        import hashlib, json, os, vas
        with vas.connect() as c, c.attach("survive/x") as m:
            print(json.dumps({"sha": hashlib.sha256(m.buffer).hexdigest(), "pid": os.getpid()}))
    """, env)
    assert read["sha"] == written["sha"] and read["pid"] != written["pid"]
    client.delete("survive/x")


def test_ndarray_is_zero_copy(client):
    client.create("nd/a", 1 * MiB)
    with client.attach("nd/a", "rw") as writer, client.attach("nd/a") as reader:
        wide = writer.ndarray(np.float64)
        assert wide.shape == (MiB // 8,) and wide.ctypes.data == writer.address
        assert wide.flags.writeable
        grid = reader.ndarray(np.float64, shape=(16, 8), offset=4096)
        assert grid.ctypes.data == reader.address + 4096 and not grid.flags.writeable
        wide[512] = 2.5  # 4096 bytes in: grid[0, 0]
        assert grid[0, 0] == 2.5  # same physical pages, no copy, no sync
        with pytest.raises(ValueError):
            grid[0, 0] = 1.0
        with pytest.raises(vas.InvalidArgument, match="outside the segment"):
            reader.ndarray(np.float64, shape=(MiB // 8,), offset=8)
        del wide, grid  # views outliving the block are tests/integration/test_detach.py's
    assert writer.detached and reader.detached
    client.delete("nd/a")


def test_fixed_attach_and_address_conflict(client):
    info = client.create("fixed/a", 2 * MiB)
    with client.attach("fixed/a", fixed=True) as m:
        assert m.address == info.address
        with pytest.raises(vas.AddressConflict) as exc:
            client.attach("fixed/a", fixed=True)
        assert str(exc.value) == (f"segment fixed/a: address range 0x{info.address:x}-"
                                  f"0x{info.address + info.size:x} is already mapped in this process")
        with client.attach("fixed/a") as floating:  # not fixed: anywhere else
            assert floating.address != info.address
    # A foreign mapping in the range conflicts too, and the failed attach leaves nothing behind.
    fd = os.memfd_create("squatter")
    os.ftruncate(fd, 4096)
    squatter = _native.mmap(fd, 4096, writable=False, address=info.address + MiB, fixed=True)
    os.close(fd)
    try:
        with pytest.raises(vas.AddressConflict):
            client.attach("fixed/a", "rw", fixed=True)
        wait_for(lambda: client.stat("fixed/a").attachments == 0, what="no attachments")
        client.attach("fixed/a", "rw").detach()  # the writer lock was not kept
    finally:
        squatter.close()
    client.attach("fixed/a", fixed=True).detach()
    client.delete("fixed/a")


# -- bad input: the exact exception for each ------------------------------------------

@pytest.mark.parametrize("call, exc, message", [
    (lambda c: c.create("", 4096), vas.InvalidArgument, "invalid segment name '': must be a non-empty string"),
    (lambda c: c.create("bad name", 4096), vas.InvalidArgument, "invalid segment name 'bad name': only A-Z a-z 0-9 . _ / - are allowed"),
    (lambda c: c.create("/abs", 4096), vas.InvalidArgument, "invalid segment name '/abs': must not start with '/'"),
    (lambda c: c.create("a/../b", 4096), vas.InvalidArgument, "invalid segment name 'a/../b': must not contain a '..' component"),
    (lambda c: c.create("x" * 256, 4096), vas.InvalidArgument, "invalid segment name: longer than 255 characters"),
    (lambda c: c.create("bad/size", 0), vas.InvalidArgument, "invalid size 0: must be > 0"),
    (lambda c: c.create("bad/size", -1), vas.InvalidArgument, "invalid size -1: must be > 0"),
    (lambda c: c.create("bad/size", (1 << 40) + 1), vas.InvalidArgument, f"invalid size 1.0 TiB ({(1 << 40) + 1} bytes): larger than the maximum 1 TiB"),
    (lambda c: c.create("bad/mode", 4096, mode=0o1000), vas.InvalidArgument, "invalid mode 512: must be permission bits 0..0o777"),
    (lambda c: c.attach("bad/mode", "w"), vas.InvalidArgument, 'invalid attach mode \'w\': must be "r" or "rw"'),
])
def test_bad_input_is_refused_locally(client, call, exc, message):
    with pytest.raises(exc) as info:
        call(client)
    assert type(info.value) is exc and str(info.value) == message


def test_errors_from_the_cluster(client):
    with pytest.raises(vas.CapacityExceeded):
        client.create("bad/huge", NODE_MEMORY + 4096)
    with pytest.raises(vas.NotFound):
        client.stat("bad/huge")  # nothing reached etcd
    for call in (lambda: client.stat("no/such"), lambda: client.attach("no/such"),
                 lambda: client.delete("no/such"), lambda: client.chmod("no/such", 0o600),
                 lambda: client.chown("no/such", 0, 0)):
        with pytest.raises(vas.NotFound) as info:
            call()
        assert "no/such" in str(info.value)
    client.create("bad/dup", 4096)
    with pytest.raises(vas.AlreadyExists) as info:
        client.create("bad/dup", 4096)
    assert "bad/dup" in str(info.value)
    with client.attach("bad/dup", "rw"):
        with pytest.raises(vas.Busy):
            client.attach("bad/dup", "rw")
    with client.attach("bad/dup") as m:
        with pytest.raises(vas.PermissionDenied) as info:
            m.write(0, b"x")
        assert str(info.value) == "segment bad/dup is attached read-only"
        for offset, length in ((4096, 1), (4000, 97), (5000, 0)):
            with pytest.raises(vas.InvalidArgument) as info:
                m.read(offset, length)
            assert str(info.value) == (f"range [{offset}, {offset + length}) is outside "
                                       "the segment of 4 KiB")
        with pytest.raises(vas.InvalidArgument, match="invalid offset -1: must be an integer >= 0"):
            m.read(-1, 1)
    with client.attach("bad/dup", "rw") as m:
        with pytest.raises(vas.InvalidArgument, match=r"^range \[4095, 4097\) is outside the segment of 4 KiB$"):
            m.write(4095, b"ab")
    client.delete("bad/dup")


def test_create_refuses_replicas_without_room_on_other_nodes(client):
    """replicas=2 on a two-node cluster: CapacityExceeded, and nothing is created."""
    with pytest.raises(vas.CapacityExceeded, match=r"^replicas=2: only 1 of the live nodes "):
        client.create("bad/replicated", 4096, replicas=2)
    with pytest.raises(vas.NotFound):
        client.stat("bad/replicated")
    assert client.create("bad/replicated", 4096, replicas=0).replicas == 0
    client.delete("bad/replicated")


# -- connection behaviour ---------------------------------------------------------------

def test_closing_the_client_releases_its_writer_lock(env, client):
    client.create("conn/lock", 4096)
    other = vas.connect(env["VAS_NODE"])
    held = other.attach("conn/lock", "rw")
    with pytest.raises(vas.Busy):
        client.attach("conn/lock", "rw")
    other.close()
    other.close()  # idempotent
    wait_for(lambda: _attach_ok(client, "conn/lock"), timeout=5, what="writer lock release")
    held.detach()  # no-op on the wire: the connection is gone
    with pytest.raises(vas.Unavailable, match="is closed"):
        other.stat("conn/lock")
    client.delete("conn/lock")


def _attach_ok(client, name) -> bool:
    try:
        client.attach(name, "rw").detach()
        return True
    except vas.Busy:
        return False


def test_one_client_shared_by_threads(client):
    client.create("conn/threads", 64 * 1024)
    errors = []

    def work(index: int):
        try:
            for round_ in range(40):
                with client.attach("conn/threads") as m:
                    assert m.size == 64 * 1024
                assert client.stat("conn/threads").name == "conn/threads"
        except Exception as exc:  # reported below with the thread's index
            errors.append((index, repr(exc)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    wait_for(lambda: client.stat("conn/threads").attachments == 0, what="0 attachments")
    client.delete("conn/threads")


def test_a_forked_child_cannot_use_its_parents_connection(client):
    """The fork check (a pid kept by os.register_at_fork, no getpid per request): the
    child's request fails Unavailable and the parent's connection still works."""
    client.create("conn/fork", 4096)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what its request raised, never return into pytest
        try:
            os.close(read)
            try:
                client.stat("conn/fork")
                outcome = "answered"
            except vas.Unavailable as exc:
                outcome = str(exc)
            os.write(write, outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    assert "made by another process" in outcome, outcome
    with client.attach("conn/fork") as m:  # the parent's connection is untouched
        assert m.read(0, 8) == bytes(8)
    client.delete("conn/fork")


def test_garbage_collected_mapping_detaches(client):
    client.create("conn/gc", 4096)
    client.attach("conn/gc", "rw")  # dropped at once
    gc.collect()
    client.attach("conn/gc", "rw").detach()  # the writer lock went with it
    client.delete("conn/gc")


def test_module_level_shortcuts_use_vas_node(env, monkeypatch):
    import vas.client

    monkeypatch.setenv("VAS_NODE", env["VAS_NODE"])
    monkeypatch.setattr(vas.client, "_default_client", None)
    info = vas.create("mod/x", 8192)
    assert vas.stat("mod/x") == info
    assert [s.name for s in vas.list("mod/")] == ["mod/x"]
    with vas.attach("mod/x", "rw") as m:
        m.write(0, b"module")
    with vas.attach("mod/x") as m:
        assert m.read(0, 6) == b"module"
    vas.delete("mod/x")
    with pytest.raises(vas.NotFound):
        vas.stat("mod/x")
    vas.client._default_client.close()


def test_versions_on_the_home_node(client):
    client.create("ver/a", 4096)
    with client.attach("ver/a", "rw") as m, client.attach("ver/a") as reader:
        assert m.version == 0 and m.refresh() == 0
        assert m.prefetch() is None
        assert reader.wait(timeout=0.1) == 0  # nothing published yet
        m.write(0, b"v1")
        assert m.sync() == 1 and m.sync(ranges=[(0, 2)]) == 2 and m.version == 2
        assert reader.read(0, 2) == b"v1"  # same pages: seen before any publish
        assert reader.wait(timeout=5) == 2 and reader.version == 0
        assert reader.refresh() == 2 and reader.version == 2
        with pytest.raises(vas.InvalidArgument):
            m.sync(ranges=[(4095, 2)])
    assert client.stat("ver/a").version == 2
    with client.attach("ver/a") as m, pytest.raises(vas.PermissionDenied):
        m.sync()
    client.delete("ver/a")


def test_list_follows_pages(client):
    names = [f"page/{i:04d}" for i in range(520)]  # more than one 500-segment page
    for name in names:
        client.create(name, 4096)
    try:
        assert [s.name for s in client.list("page/")] == names
    finally:
        for name in names:
            client.delete(name)


# -- nodes and spaces -------------------------------------------------------------------

def test_nodes(client, cluster):
    nodes = client.nodes()
    assert [n.id for n in nodes] == ["node1", "node2"]
    assert {n.socket for n in nodes} == {node.socket for node in cluster.nodes}
    assert all(n.memory_total == NODE_MEMORY and n.state == "ready" for n in nodes)
    assert all(":" in n.address for n in nodes)
    with vas.connect(nodes[1].socket) as second:
        assert second.local_node.id == "node2"


def test_switch_into_a_space_of_two_segments(client):
    a = client.create("sw/a", 1 * MiB)
    b = client.create("sw/b", 2 * MiB)
    space = client.create_space("sw/space", mode=0o640)
    assert (space.name, space.mode, space.members) == ("sw/space", 0o640, {})
    client.space_add("sw/space", "sw/a", "rw")
    info = client.space_add("sw/space", "sw/b")
    assert info.members == {"sw/a": "rw", "sw/b": "r"}
    assert "sw/space" in {s.name for s in client.list_spaces()}

    with client.switch("sw/space") as view:
        assert list(view) == ["sw/a", "sw/b"] and len(view) == 2
        assert view["sw/a"].address == a.address and view["sw/b"].address == b.address
        assert view["sw/a"].mode == "rw" and view["sw/b"].mode == "r"
        # A pointer stored in one segment is valid in every process that switched in.
        view["sw/a"].write(0, b.address.to_bytes(8, "little"))
        with pytest.raises(KeyError):
            view["sw/c"]
    assert view["sw/a"].detached and view["sw/b"].detached
    with client.attach("sw/a", "rw", fixed=True) as m:  # the ranges are free again
        assert int.from_bytes(m.read(0, 8), "little") == b.address

    # A member that fails to attach undoes the ones already made.
    client.delete("sw/b")
    wait_for(lambda: _gone(client, "sw/b"), what="sw/b deleted")
    with pytest.raises(vas.NotFound):
        with client.switch("sw/space"):
            pass
    client.attach("sw/a", "rw", fixed=True).detach()

    client.space_remove("sw/space", "sw/b")
    assert client.get_space("sw/space").members == {"sw/a": "rw"}
    client.delete_space("sw/space")
    with pytest.raises(vas.NotFound):
        client.get_space("sw/space")
    client.delete("sw/a")


def _gone(client, name) -> bool:
    try:
        client.stat(name)
        return False
    except vas.NotFound:
        return True


# -- switch keeps the "r" members mapped ------------------------------------------------

def _fill(client, name: str, byte: int) -> int:
    """Write ``byte`` over all of segment ``name`` (a non-fixed "rw" attach) and publish;
    the new version."""
    with client.attach(name, "rw") as m:
        m.write(0, bytes([byte]) * m.size)
        return m.sync()


def _attachments(client, name: str) -> int:
    return client.stat(name).attachments


def _digest(mapping) -> str:
    return hashlib.sha256(mapping.buffer).hexdigest()


def test_switch_between_spaces_sharing_members_and_back(client, env):
    """A={x, y}, B={y, z}: y stays mapped from A to B and back; x is let go when B does
    not need it; every switch shows the bytes and version a fresh attach would."""
    for name in ("kp/x", "kp/y", "kp/z"):
        client.create(name, 64 * 1024)
    for space, members in (("kp/A", ("kp/x", "kp/y")), ("kp/B", ("kp/y", "kp/z"))):
        client.create_space(space)
        for member in members:
            client.space_add(space, member)
    _fill(client, "kp/x", 1)
    _fill(client, "kp/y", 2)
    _fill(client, "kp/z", 3)
    expected = {n: hashlib.sha256(bytes([b]) * 64 * 1024).hexdigest()
                for n, b in (("kp/x", 1), ("kp/y", 2), ("kp/z", 3))}
    with client.switch("kp/A") as view:
        assert {n: _digest(view[n]) for n in view} == {n: expected[n] for n in ("kp/x", "kp/y")}
        y_attachment = view["kp/y"]._attachment_id
    assert view["kp/x"].detached and view["kp/y"].detached  # for the user, as before
    # Still attachments for the agent and the cluster: mapped, counted, not hidden.
    wait_for(lambda: _attachments(client, "kp/x") == _attachments(client, "kp/y") == 1,
             what="the kept members counted as attachments")

    y_version = _fill(client, "kp/y", 4)  # published between two switches
    expected["kp/y"] = hashlib.sha256(bytes([4]) * 64 * 1024).hexdigest()
    with client.switch("kp/B") as view:
        assert view["kp/y"]._attachment_id == y_attachment  # kept, not attached again
        assert view["kp/y"].version == y_version
        assert view["kp/y"].address == client.stat("kp/y").address
        assert {n: _digest(view[n]) for n in view} == {n: expected[n] for n in ("kp/y", "kp/z")}
    wait_for(lambda: _attachments(client, "kp/x") == 0, what="kp/x let go by the switch into B")

    # A member deleted in between: the switch fails as an attach would, the others are let go.
    with vas.connect(env["VAS_NODE"]) as other:
        other.delete("kp/z")  # kept by this client: deleting until it lets go
        assert other.stat("kp/z").state == "deleting"
    with pytest.raises(vas.NotFound):
        with client.switch("kp/B"):
            pass
    wait_for(lambda: _gone(client, "kp/z"), what="kp/z freed once the switch let it go")
    wait_for(lambda: _attachments(client, "kp/y") == 0, what="kp/y let go by the failed switch")

    with client.switch("kp/A") as view:  # and back: attached afresh after the failure
        assert {n: _digest(view[n]) for n in view} == {n: expected[n] for n in ("kp/x", "kp/y")}
        y_attachment = view["kp/y"]._attachment_id
    # A Client.delete from this client lets its own kept member go first: freed at once.
    client.delete("kp/x")
    assert _gone(client, "kp/x")
    with pytest.raises(vas.NotFound):
        with client.switch("kp/A"):
            pass
    client.space_remove("kp/A", "kp/x")
    with client.switch("kp/A") as view:
        assert view["kp/y"]._attachment_id != y_attachment  # let go by the failed switch
    # A fixed attach of a kept member from this client takes the range over.
    with client.attach("kp/y", fixed=True) as m:
        assert _digest(m) == expected["kp/y"]
    for space in ("kp/A", "kp/B"):
        client.delete_space(space)
    client.delete("kp/y")


def test_switch_on_another_node_never_reuses_an_old_copy(cluster):
    """A member homed elsewhere is kept as this node's copy; a version published since
    makes the next switch attach again (a fresh copy), never show the old bytes."""
    with vas.connect(cluster.nodes[0].socket) as home, \
            vas.connect(cluster.nodes[1].socket) as away:
        home.create("kp/remote", 64 * 1024)
        home.create_space("kp/R")
        home.space_add("kp/R", "kp/remote")
        _fill(home, "kp/remote", 5)
        with away.switch("kp/R") as view:
            assert view["kp/remote"].read(0, 4) == b"\5" * 4
            kept = view["kp/remote"]._attachment_id
        with away.switch("kp/R") as view:  # nothing changed: the copy is reused
            assert view["kp/remote"]._attachment_id == kept
        version = _fill(home, "kp/remote", 6)
        with away.switch("kp/R") as view:
            assert view["kp/remote"]._attachment_id != kept
            assert view["kp/remote"].version == version
            assert _digest(view["kp/remote"]) == hashlib.sha256(b"\6" * 64 * 1024).hexdigest()
        away.close()  # lets the kept copy go
        wait_for(lambda: _attachments(home, "kp/remote") == 0, what="kp/remote released at close")
        home.delete_space("kp/R")
        home.delete("kp/remote")


def test_switch_rechecks_permission_of_kept_members(client, env, cluster):
    """A member whose mode no longer lets the caller read it is refused at the next
    switch (PermissionDenied), though this process still had it mapped and its switches
    had stopped asking the agent (the chmod, made through the other agent, moves the
    change counter of this one)."""
    client.create("kp/perm", 4096, mode=0o644)
    client.create_space("kp/P", mode=0o644)
    client.space_add("kp/P", "kp/perm")
    code = f"""
import os, sys, vas, vas.client
os.setgroups([]); os.setgid(65534); os.setuid(65534)
with vas.connect({env["VAS_NODE"]!r}) as c:
    for _ in range(2):  # then the next switch would ask nothing, were nothing changed
        with c.switch("kp/P") as view:
            first = view["kp/perm"].read(0, 1)
    print("left", flush=True)
    sys.stdin.readline()  # the parent changes the mode meanwhile
    try:
        with c.switch("kp/P"):
            sys.exit(4)
    except vas.PermissionDenied:
        sys.exit(3 if first == b"\\0" else 5)
"""
    child = subprocess.Popen([sys.executable, "-c", code], cwd="/", stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "left\n", child.stderr.read()
        other = next(n.socket for n in cluster.nodes if n.socket != env["VAS_NODE"])
        with vas.connect(other) as elsewhere:
            elsewhere.chmod("kp/perm", 0o600)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 3, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    client.delete_space("kp/P")
    client.delete("kp/perm")


def test_switch_sees_space_changes_made_through_another_agent(cluster):
    """node2 keeps the space record it read (its watch of the space records says when
    it changes): a member added through node1 is in node2's next switches within the
    deadline, one removed is gone from them; through node2 itself, at once."""
    with vas.connect(cluster.nodes[0].socket) as one, \
            vas.connect(cluster.nodes[1].socket) as two:
        for name in ("kp/w1", "kp/w2"):
            one.create(name, 4096)
        one.create_space("kp/W")
        one.space_add("kp/W", "kp/w1")

        def members() -> list[str]:
            with two.switch("kp/W") as view:
                return list(view)
        assert members() == ["kp/w1"]
        one.space_add("kp/W", "kp/w2")
        wait_for(lambda: members() == ["kp/w1", "kp/w2"], what="node2 to see kp/w2 added")
        one.space_remove("kp/W", "kp/w1")
        wait_for(lambda: members() == ["kp/w2"], what="node2 to see kp/w1 removed")
        two.space_add("kp/W", "kp/w1")  # through node2: its next switch has it
        assert members() == ["kp/w2", "kp/w1"]
        one.delete_space("kp/W")
        wait_for(lambda: _switch_fails(two, "kp/W"), what="node2 to see kp/W deleted")
        two.close()
        for name in ("kp/w1", "kp/w2"):
            one.delete(name)


def _requests(monkeypatch, client) -> list[str]:
    """The requests ``client`` sends from now on, by kind (its connection's ``call``
    wrapped: the agent still answers every one)."""
    sent: list[str] = []
    call = client._connection.call

    def counted(field, *args, **kwargs):
        sent.append(field)
        return call(field, *args, **kwargs)
    monkeypatch.setattr(client._connection, "call", counted)
    return sent


def _switch_until_nothing_is_sent(client, sent: list[str], space: str) -> None:
    """Switch into ``space`` until a switch sends no request: the agent's change counter
    stands still. The space watch's events of changes made through this agent arrive
    milliseconds after the changes and move it once more each. Empties ``sent``."""
    def quiet() -> bool:
        del sent[:]
        with client.switch(space):
            pass
        return not sent
    wait_for(quiet, what=f"a switch into {space} that sends nothing")
    del sent[:]


def test_switch_asks_nothing_until_the_agents_change_counter_moves(cluster, monkeypatch):
    """Switching back into a space whose members are kept sends no request while the
    agent's change counter stands still; a publish, a chmod or a delete made through
    ANOTHER agent moves it before that request returns (the coordinator tells the home
    first), so the next switch asks again and shows the new bytes or the attach's error."""
    with vas.connect(cluster.nodes[0].socket) as here, \
            vas.connect(cluster.nodes[1].socket) as there:
        for name in ("kc/a", "kc/b", "kc/c"):
            here.create(name, 64 * 1024)  # homed on node1, where `here` switches
        here.create_space("kc/S")
        here.space_add("kc/S", "kc/a")
        here.space_add("kc/S", "kc/b")
        _fill(here, "kc/a", 1)
        _fill(here, "kc/b", 2)
        for _ in range(2):  # the first maps every member, the second learns the counter
            with here.switch("kc/S"):
                pass
        sent = _requests(monkeypatch, here)
        _switch_until_nothing_is_sent(here, sent, "kc/S")
        with here.switch("kc/S") as view:
            kept = {n: view[n]._attachment_id for n in view}
            assert _digest(view["kc/a"]) == hashlib.sha256(b"\1" * 64 * 1024).hexdigest()
        assert sent == []

        # A publish through node2 (a remote writer: the home adopts the version before
        # the writer's sync returns).
        before = here._connection.changes()
        version = _fill(there, "kc/a", 7)
        assert here._connection.changes() > before
        with here.switch("kc/S") as view:
            assert {n: view[n]._attachment_id for n in view} == kept  # still current
            assert view["kc/a"].version == version
            assert _digest(view["kc/a"]) == hashlib.sha256(b"\7" * 64 * 1024).hexdigest()
        assert sent == ["revalidate"]
        with here.switch("kc/S"):
            pass
        assert sent == ["revalidate"]  # standing still again

        # A chmod through node2 (SegmentChanged reaches the home before it returns).
        before = here._connection.changes()
        there.chmod("kc/b", 0o640)  # created 0o600: a real change (a no-op moves nothing)
        assert here._connection.changes() > before
        with here.switch("kc/S") as view:
            assert view["kc/b"]._attachment_id == kept["kc/b"]  # root may still read it
        assert sent == ["revalidate", "revalidate"]

        # A space changed through node2: node1 hears of it from its watch of the space
        # records (milliseconds later, as before) and moves its counter then.
        there.space_add("kc/S", "kc/c")

        def members() -> list[str]:
            with here.switch("kc/S") as view:
                return list(view)
        wait_for(lambda: members() == ["kc/a", "kc/b", "kc/c"], what="node1 to see kc/c added")

        # A delete through node2: kc/b is kept here, so it is deleting until let go.
        before = here._connection.changes()
        there.delete("kc/b")
        assert here._connection.changes() > before
        with pytest.raises(vas.NotFound):
            with here.switch("kc/S"):
                pass
        wait_for(lambda: _gone(here, "kc/b"), what="kc/b freed once the switch let it go")

        # A member homed elsewhere (node2's copy of it) is asked about at every switch.
        here.space_remove("kc/S", "kc/b")
        there.create("kc/far", 4096)
        here.space_add("kc/S", "kc/far")
        for _ in range(3):
            with here.switch("kc/S") as view:
                assert list(view) == ["kc/a", "kc/c", "kc/far"]
        del sent[:]
        with here.switch("kc/S"):
            pass
        assert sent == ["revalidate"]
        here.close()
        for name in ("kc/a", "kc/c", "kc/far"):
            there.delete(name)
        there.delete_space("kc/S")


def test_switch_between_spaces_asks_nothing_for_the_members_both_keep(client, monkeypatch):
    """A={x, y}, B={z, w "rw", y}, the counter standing still: back and forth, y is reused
    with no request at all (the same attachment, its bytes), the others are attached and
    let go as each space needs them, and each view lists its members in the space's order."""
    fill = {"kb/x": 1, "kb/y": 2, "kb/z": 3, "kb/w": 4}
    for name, byte in fill.items():
        client.create(name, 64 * 1024)
        _fill(client, name, byte)
    spaces = {"kb/A": [("kb/x", "r"), ("kb/y", "r")],
              "kb/B": [("kb/z", "r"), ("kb/w", "rw"), ("kb/y", "r")]}
    for space, members in spaces.items():
        client.create_space(space)
        for member, mode in members:
            client.space_add(space, member, mode)
    for space in ("kb/A", "kb/B", "kb/A"):  # every member mapped once, both spaces read
        with client.switch(space) as view:
            y_attachment = view["kb/y"]._attachment_id
    sent = _requests(monkeypatch, client)
    _switch_until_nothing_is_sent(client, sent, "kb/A")
    for bad in ("", "kb/../A", None, ["kb/A"]):  # refused before the kept members are touched
        with pytest.raises(vas.InvalidArgument, match="invalid space name"):
            with client.switch(bad):
                pass
    for space in ("kb/B", "kb/A", "kb/B", "kb/A"):
        with client.switch(space) as view:
            assert [(n, view[n].mode) for n in view] == spaces[space]
            assert view["kb/y"]._attachment_id == y_attachment
            assert {n: view[n].read(0, 2) for n in view} == {n: bytes([fill[n]]) * 2 for n in view}
    # Into B: z and w attached, x let go; into A: x attached, z let go (w left with B's block).
    assert "revalidate" not in sent and sent.count("attach") == 2 + 1 + 2 + 1
    assert sent.count("detach") == 1 + 2 + 1 + 2
    wait_for(lambda: [_attachments(client, n) for n in fill] == [1, 1, 0, 0],
             what="x and y counted as kept attachments, z and w let go")

    # A member first asked for after its block: a detached Mapping, at the version it had
    # then, though the kept one was revalidated at a newer version since.
    with client.switch("kb/A") as untouched:
        assert list(untouched) == ["kb/x", "kb/y"] and "kb/x" in untouched
    version = client.stat("kb/x").version
    assert _fill(client, "kb/x", 9) > version
    with client.switch("kb/A") as view:
        assert view["kb/x"].read(0, 2) == b"\x09\x09" and view["kb/x"].version > version
        kept_x = view["kb/x"]
    late = untouched["kb/x"]
    assert late.detached and late.version == version and untouched["kb/x"] is late
    assert late._attachment_id == kept_x._attachment_id and late is not kept_x
    with pytest.raises(vas.InvalidArgument):
        late.read(0, 1)
    assert kept_x.detached  # given in its block: detached at its end as before
    with client.switch("kb/A") as view:  # the pages the first block kept, still mapped
        assert view["kb/x"]._attachment_id == kept_x._attachment_id
        assert view["kb/x"].read(0, 2) == b"\x09\x09"
    for space in spaces:
        client.delete_space(space)
    for name in fill:
        client.delete(name)


def test_peer_gone_asked_by_many_threads_at_once(client):
    """The connection polls its socket with one poll object, which Python refuses to a
    second thread while another is in poll(2) on it: peer_gone (every switch's check, and
    the default connection's before each use) then polls with one of its own."""
    answers, errors = [], []

    def ask():
        try:
            answers.extend(client._connection.peer_gone() for _ in range(5000))
        except Exception as exc:  # noqa: BLE001  (the assertion below shows it)
            errors.append(exc)
    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and answers == [False] * 20000


def _switch_fails(client, space: str) -> bool:
    try:
        with client.switch(space):
            return False
    except vas.NotFound:
        return True
