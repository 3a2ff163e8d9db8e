"""A writer on a segment's home node is fenced like a remote one.

Such a writer maps the home pages themselves, so its lock is revocable
(node/revoke.py): when the agent lets the lock go without the writer's detach,
it write-protects the writer's mapping first, and a later store of that writer
ends it with SIGBUS instead of reaching the pages other readers see. Two agents
with a writer ttl of 2 s; writers run as separate processes (a SIGBUS must not
take the test runner with it), driven line by line over stdin/stdout. Every wait
is on a condition with a deadline; stopped processes are continued before they
are killed.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import vas
from vas.core import fetch
from vas.node import locks
from waiting import wait_for
from worlds import empty

MiB = 1 << 20
TTL = 2  # seconds: the writer lease of these agents
SIZE = 4 * MiB
A, B, C = (bytes([letter]) * SIZE for letter in b"ABC")

needs_write_protect = pytest.mark.skipif(
    not fetch.write_protect_available(),
    reason="userfaultfd write-protect of shared memory unavailable (Linux < 5.19?)")

pytestmark = needs_write_protect


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: Where each agent's log stood when the current test began (log path -> offset):
#: the agents are shared by the module's tests, what one logged is no other's business.
_LOGGED_BEFORE: dict[str, int] = {}


def log_of(node) -> str:
    """What agent ``node`` logged since the current test began."""
    with open(node.log_path) as log:
        log.seek(_LOGGED_BEFORE.get(node.log_path, 0))
        return log.read()


def home_writer(two, name: str, script: str) -> Writer:
    """Create ``name`` on node1 and start ``script`` there as its writer."""
    running, c1, _ = two
    c1.create(name, SIZE, mode=0o666)
    return Writer(script, running.nodes[0].socket, name)


def attach_rw(client, name: str):
    """A condition for wait_for: the "rw" Mapping of ``name``, or None while Busy."""
    def attempt():
        try:
            return client.attach(name, "rw")
        except vas.Busy:
            return None
    return attempt


@pytest.fixture(scope="module")
def shared(module_cluster):
    """The module's two agents with a writer ttl of TTL. Its tests kill no agent (the
    one that kills the coordinator has a cluster of its own, ``own_two``), and each
    starts from an empty cluster (``two``)."""
    return module_cluster(nodes=2, memory=256 * MiB, writer_ttl=TTL)


@contextlib.contextmanager
def clients_of(running):
    """(running, client of node1, client of node2); afterwards neither agent's log
    may show a traceback or (under VAS_LOCK_CHECK=1) a lock-order violation."""
    for node in running.nodes:
        _LOGGED_BEFORE[node.log_path] = os.path.getsize(node.log_path)
    c1, c2 = vas.connect(running.nodes[0].socket), vas.connect(running.nodes[1].socket)
    yield running, c1, c2
    c1.close()
    c2.close()
    for node in running.nodes:
        log = log_of(node)
        assert locks.MARKER not in log and "Traceback" not in log, node.tail()


@pytest.fixture
def two(shared):
    """Two agents with a writer ttl of TTL and a client of each (``clients_of``), the
    module's: emptied after the test (``worlds.empty``)."""
    with clients_of(shared) as both:
        yield both
    empty(shared)


@pytest.fixture
def own_two(cluster):
    """``two`` over a cluster of the test's own (for a test that kills a process of it)."""
    with clients_of(cluster(nodes=2, memory=256 * MiB, writer_ttl=TTL)) as both:
        yield both


class Writer:
    """A Python process running ``script`` (argv: socket, segment name), with its
    stdin/stdout as line pipes; stopped processes are continued before the kill."""

    def __init__(self, script: str, socket: str, name: str, **env):
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), socket, name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **env})

    def line(self) -> str:
        return self.process.stdout.readline()

    def send(self, text: str) -> None:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)  # a no-op once it was waited for

    def exit_code(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.resume()
            self.process.kill()
        self.process.wait(30)
        with contextlib.suppress(OSError):  # a broken pipe to a dead process
            self.process.stdin.close()
        self.process.stdout.close()


_STALE_WRITER = """
    import sys, vas
    m = vas.connect(sys.argv[1]).attach(sys.argv[2], "rw")
    print("fetch", m.fetch, flush=True)
    m.write(0, b"A" * m.size)
    print("synced", m.sync(), flush=True)
    sys.stdin.readline()            # stopped here (SIGSTOP) past its lease, then resumed
    print("storing", flush=True)
    m.buffer[:] = b"C" * m.size     # the late store: it must never reach the home pages
    try:
        print("published", m.sync(), flush=True)
    except vas.Fenced as exc:
        print("fenced:", exc, flush=True)
"""


@pytest.mark.parametrize("takeover", ["other node", "same node"])
def test_stopped_home_writer_is_revoked_and_its_late_stores_never_land(two, takeover):
    running, c1, c2 = two
    node1 = running.nodes[0]
    old = home_writer(two, "hf/stale", _STALE_WRITER)
    try:
        assert old.line() == "fetch home (no fetch)\n"
        old_version = int(old.line().split()[1])
        with c1.attach("hf/stale") as reader:
            assert reader.read(0, 4) == b"AAAA"  # a local reader saw its stores
        old.stop()
        stopped = time.monotonic()

        # The stopped writer's lock is revoked before its lease can lapse: another
        # writer gets it within about a ttl (before this change: Busy on node1 until
        # the stopped process came back, and unfenced stores after that).
        taker = c2 if takeover == "other node" else c1
        new = wait_for(attach_rw(taker, "hf/stale"),
                       "another writer to take the stopped writer's lock", timeout=10 * TTL)
        took = time.monotonic() - stopped
        assert f"write-protected the home mapping of hf/stale in process {old.process.pid}" \
            in log_of(node1)
        new.write(0, B)
        try:
            new_version = new.sync()
        except vas.Fenced:  # say why: the agents' logs hold the renewals and fences
            pytest.fail("the new writer was fenced:\n" + "\n".join(
                node.tail() for node in running.nodes))
        assert new_version > old_version

        old.resume()
        old.send("go")
        assert old.line() == "storing\n"
        assert old.exit_code() == -signal.SIGBUS  # the store faulted: never landed
        assert old.line() == ""  # neither "published" nor "fenced": it died storing

        with c1.attach("hf/stale") as home, c2.attach("hf/stale", fetch="eager") as remote:
            seen_home, seen_remote = bytes(home.buffer), bytes(remote.buffer)
        assert seen_home.count(b"C") == 0 and digest(seen_home) == digest(B)
        assert digest(seen_remote) == digest(B)
        assert c1.stat("hf/stale").version == new_version  # the stale writer published nothing
        new.write(0, b"after")  # the new writer is unaffected by the old one's end
        assert new.sync() == new_version + 1
        new.detach()
        print(f"takeover on the {takeover} {took:.2f} s after SIGSTOP (ttl {TTL} s)")
    finally:
        old.close()


_STALE_COPIER = """
    import sys, vas, vas.pages
    vas.pages.WRITE_FROM_MIN = 1 << 20  # copied in by the agent from 1 MiB on (blocks of 1 MiB)
    m = vas.connect(sys.argv[1]).attach(sys.argv[2], "rw")
    print("fetch", m.fetch, flush=True)
    m.write(0, b"A" * (1 << 20))    # the agent copies it in (WriteFrom)
    print("synced", m.sync(), flush=True)
    sys.stdin.readline()            # stopped here (SIGSTOP) past its lease, then resumed
    try:                            # the late write, a first one there: the agent's to copy
        m.write(1 << 20, b"C" * (m.size - (1 << 20)))
        print("written", flush=True)
    except vas.Fenced as exc:
        print("fenced:", exc, flush=True)
"""


def test_a_stopped_home_writers_late_write_is_not_copied_in_by_the_agent(two):
    """A large write() is copied in by the agent, not stored by the writer: that copy
    is fenced as the stores are (Guard.storing), so once the lock was revoked it is
    refused with Fenced and the new writer's bytes stay."""
    running, c1, _ = two
    old = home_writer(two, "hf/copier", _STALE_COPIER)
    try:
        assert old.line() == "fetch home (no fetch)\n"
        assert old.line().startswith("synced ")
        old.stop()
        new = wait_for(attach_rw(c1, "hf/copier"),
                       "another writer to take the stopped writer's lock", timeout=10 * TTL)
        new.write(0, B)
        new_version = new.sync()
        old.resume()
        old.send("go")
        assert old.line().startswith("fenced: ")
        assert old.exit_code() == 0
        with c1.attach("hf/copier") as home:
            assert digest(bytes(home.buffer)) == digest(B)
        assert c1.stat("hf/copier").version == new_version
        new.detach()
    finally:
        old.close()


def test_live_home_writer_is_revoked_when_its_lease_cannot_be_renewed(own_two):
    """The coordinator is gone: the agent cannot renew the lease, which will lapse (and
    another agent reaching etcd could hand the lock on), so it revokes the writer before
    that, although the writer's process is alive and keeps sending keepalives."""
    running, c1, _ = own_two
    node1 = running.nodes[0]
    old = home_writer(own_two, "hf/cut", _STALE_WRITER)
    try:
        assert old.line() == "fetch home (no fetch)\n"
        assert old.line().startswith("synced ")
        running.coordinators[0].kill()
        wait_for(lambda: f"write-protected the home mapping of hf/cut in process "
                         f"{old.process.pid}" in log_of(node1),
                 "the agent to revoke a writer it cannot renew", timeout=10 * TTL)
        old.send("go")
        assert old.line() == "storing\n"
        assert old.exit_code() == -signal.SIGBUS
        with c1.attach("hf/cut") as home:  # a home "r" attach needs no coordinator
            assert digest(bytes(home.buffer)) == digest(A)
    finally:
        old.close()


_LIVE_WRITER = """
    import sys, vas
    m = vas.connect(sys.argv[1]).attach(sys.argv[2], "rw")
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "done":
            break
        step = int(line)
        offset = (step * 7 * 4096 + 13) % (m.size - 16)   # new pages too, never touched before
        m.write(offset, step.to_bytes(16, "little"))
        print("wrote", offset, flush=True)
        print("synced", m.sync(), flush=True)
    m.detach()
    print("detached", flush=True)
"""


def test_live_home_writer_is_never_write_protected(two):
    """A writer that keeps its lease for 3 ttl: every store is visible to a local
    reader at once, every sync publishes, nothing is revoked."""
    running, c1, _ = two
    node1 = running.nodes[0]
    writer = home_writer(two, "hf/live", _LIVE_WRITER)
    try:
        assert writer.line() == "ready\n"
        reader = c1.attach("hf/live")
        version, step, started = 0, 0, time.monotonic()
        while time.monotonic() - started < 3 * TTL and step < 10_000:
            writer.send(str(step))
            word, offset = writer.line().split()
            assert word == "wrote"
            assert reader.read(int(offset), 16) == step.to_bytes(16, "little")  # at once
            assert writer.line() == f"synced {version + 1}\n"
            version, step = version + 1, step + 1
            time.sleep(TTL / 20)  # pacing over the three ttl, not synchronization
        writer.send("done")
        assert writer.line() == "detached\n"
        assert writer.exit_code() == 0
        reader.detach()
        assert step >= 3 and c1.stat("hf/live").version == version
        log = log_of(node1)
        assert "write-protected the home mapping of hf/live" not in log
        assert "revoking it before its lease can lapse" not in log
    finally:
        writer.close()


_CLOSING_WRITER = """
    import sys, vas
    c = vas.connect(sys.argv[1])
    m = c.attach(sys.argv[2], "rw")
    m.write(0, b"A" * m.size)
    print("synced", m.sync(), flush=True)
    c.close()                       # the mapping stays; the agent releases the lock
    try:
        m.write(0, b"late")
        print("wrote", flush=True)
    except vas.Fenced as exc:
        print("write:", type(exc).__name__, flush=True)
    sys.stdin.readline()
    print("storing", flush=True)
    m.buffer[0:4] = b"CCCC"          # a raw store: SIGBUS
    print("stored", flush=True)
"""


def test_closed_connection_revokes_a_home_writer_at_once(two):
    """Client.close() with the "rw" mapping still there: the lock goes at once (a
    same-node writer takes it) and the mapping is write-protected first."""
    _, c1, _ = two
    old = home_writer(two, "hf/eof", _CLOSING_WRITER)
    try:
        assert old.line().startswith("synced ")
        assert old.line() == "write: Fenced\n"
        new = wait_for(attach_rw(c1, "hf/eof"), "the lock of a closed connection",
                       timeout=3 * TTL)
        new.write(0, B)
        version = new.sync()
        old.send("go")
        assert old.line() == "storing\n"
        assert old.exit_code() == -signal.SIGBUS
        with c1.attach("hf/eof") as home:
            assert digest(bytes(home.buffer)) == digest(B)
        assert c1.stat("hf/eof").version == version
        new.detach()
    finally:
        old.close()


_FORKING_WRITER = """
    import os, sys, vas
    m = vas.connect(sys.argv[1]).attach(sys.argv[2], "rw")
    m.write(0, b"A" * m.size)
    print("synced", m.sync(), flush=True)
    pid = os.fork()
    if pid == 0:  # the child's copy would not be write-protected at a revocation
        m.buffer[:4096] = b"C" * 4096
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("child", os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status),
          flush=True)
    print("pages", bytes(m.buffer[:4096]) == b"A" * 4096, flush=True)
"""


def test_a_home_writers_forked_child_cannot_store_into_the_home_pages(two):
    """A forked child does not share the writer's write-protect registration, so a
    revocation could not fence it: the mapping is not inherited (SIGSEGV there)."""
    writer = home_writer(two, "hf/fork", _FORKING_WRITER)
    try:
        assert writer.line().startswith("synced ")
        assert writer.line() == f"child {int(signal.SIGSEGV)}\n"
        assert writer.line() == "pages True\n"
        assert writer.exit_code() == 0
    finally:
        writer.close()
    _, c1, _ = two
    with c1.attach("hf/fork") as home:
        assert digest(bytes(home.buffer)) == digest(A)


_REFUSED = """
    import sys, vas
    try:
        with vas.connect(sys.argv[1]).attach(sys.argv[2], "rw") as m:
            print("attached", m.fetch, flush=True)
    except vas.VasError as exc:
        print(type(exc).__name__, exc, flush=True)
"""


def test_home_writer_without_write_protect_is_refused(two):
    """Where the writer's mapping could not be revoked the attach is refused, never
    handed out unfenced; a remote "rw" attach (it writes into its own replica) and
    "r" attaches are unaffected."""
    running, c1, _ = two
    node1, node2 = running.nodes
    c1.create("hf/refused", SIZE, mode=0o666)
    home = Writer(_REFUSED, node1.socket, "hf/refused", VAS_DISABLE_USERFAULTFD="1")
    remote = Writer(_REFUSED, node2.socket, "hf/refused", VAS_DISABLE_USERFAULTFD="1")
    try:
        assert home.line() == (
            'Unavailable segment hf/refused is homed on this node: a "rw" attach here needs '
            "userfaultfd write-protection of shared memory in the calling process (Linux 5.19 "
            "or later, userfaultfd allowed, VAS_DISABLE_USERFAULTFD unset) so that its stores "
            'can be revoked with its lock; attach "rw" from another node instead\n')
        assert remote.line() == "attached eager\n"
        assert home.exit_code() == 0 and remote.exit_code() == 0
        with c1.attach("hf/refused", "rw") as writer:  # the refusal left no lock behind
            writer.write(0, b"ok")
    finally:
        home.close()
        remote.close()


_FORCE_DELETED = """
    import sys, vas
    m = vas.connect(sys.argv[1]).attach(sys.argv[2], "rw")
    m.write(0, b"A" * m.size)
    print("synced", m.sync(), flush=True)
    sys.stdin.readline()
    try:
        m.sync()
    except vas.Fenced:
        print("sync: Fenced", flush=True)
    m.buffer[0:4] = b"CCCC"
    print("stored", flush=True)
"""


def test_force_delete_revokes_the_home_writer(two):
    _, c1, _ = two
    old = home_writer(two, "hf/forced", _FORCE_DELETED)
    try:
        assert old.line().startswith("synced ")
        c1.delete("hf/forced", force=True)
        old.send("go")
        assert old.line() == "sync: Fenced\n"
        assert old.exit_code() == -signal.SIGBUS
    finally:
        old.close()


def test_remote_writer_keeps_its_lock_while_its_fetch_waits(own_two):
    """A remote "rw" attach takes the lock, then fetches the replica: its lease is renewed
    while the fetch waits (here on a home paused for 2 ttls; a GiB on a busy node takes as
    long), so the writer it returns is not fenced at its first sync. A cluster of its own:
    it pauses an agent."""
    running, c1, c2 = own_two
    node1 = running.nodes[0]
    c1.create("hf/slowfetch", SIZE, mode=0o666)
    with c1.attach("hf/slowfetch", "rw") as seed:
        seed.write(0, A)
        seed.sync()
    result = {}

    def attach():
        try:
            result["mapping"] = c2.attach("hf/slowfetch", "rw")
        except vas.VasError as exc:
            result["error"] = exc

    os.kill(node1.pid, signal.SIGSTOP)
    try:
        thread = threading.Thread(target=attach, daemon=True)
        thread.start()
        thread.join(2 * TTL)  # the pause: long enough for an unrenewed lease to lapse
        assert thread.is_alive(), f"the attach did not wait for the paused home: {result}"
    finally:
        os.kill(node1.pid, signal.SIGCONT)
    thread.join(30)
    assert not thread.is_alive() and "error" not in result, result
    writer = result["mapping"]
    assert digest(bytes(writer.buffer)) == digest(A)
    writer.write(0, B)
    assert writer.sync() == 2  # not Fenced
    writer.detach()
    with c1.attach("hf/slowfetch") as home:
        assert digest(bytes(home.buffer)) == digest(B)
