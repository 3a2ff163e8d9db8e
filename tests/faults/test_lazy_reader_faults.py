"""A lazy reader whose pages can no longer be fetched gets SIGBUS within a bounded
time, never zeros and never a hang, whichever agent died.

A reader process on node2 attaches a 256 MiB segment homed on node1 lazily and
checks every page it reads against the segment's pattern (page ``p`` holds the
byte ``p % 251 + 1``: never zero, so a page that reads zeros is caught). It reads a
first part, says so, and waits for "go" on stdin; the test then breaks something
and sends "go". The reader's next touch of a page not fetched yet must end it
with SIGBUS (returncode ``-SIGBUS``) within a deadline, after reading only right
bytes. Deadlines are generous (a loaded 2-CPU VM) and every wait is on a
condition; each test kills the processes it started.
"""
from __future__ import annotations

import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

import vas
from vas.core import fetch
from vas.node.locks import MARKER

from waiting import in_userfault, wait_for

MiB = 1 << 20
PAGE = 4096
SIZE = 256 * MiB
PAGES = SIZE // PAGE
#: Pages the reader checks before it waits for "go" (32 MiB).
FIRST = 8192
#: Seconds within which a touch of a lost page must end the reader (the guardian and
#: a lost fill answer in milliseconds; the rest is room for a loaded machine).
PROMPT = 20.0

needs_poison = pytest.mark.skipif(
    not fetch.userfaultfd_available(),
    reason="lazy attaches need userfaultfd shmem faults and UFFDIO_POISON (Linux 6.6)")

READER = r"""
import sys
import numpy as np
import vas

socket_path, name, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
PAGE = 4096
client = vas.connect(socket_path)
mapping = client.attach(name)
print("fetch", mapping.fetch, flush=True)
pages = mapping.size // PAGE
rows = mapping.ndarray(np.uint8).reshape(pages, PAGE)


def check(p):
    row = rows[p]  # numpy holds the GIL while the page faults in
    lo, hi = int(row.min()), int(row.max())
    if lo != hi or lo != p % 251 + 1:
        print("WRONG", p, lo, hi, flush=True)
        sys.exit(3)


for p in range(first):
    check(p)
print("read", first, flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(4)
if len(sys.argv) > 4 and sys.argv[4] == "close":  # views alive, connection closed
    client.close()
for p in range(first, pages):
    check(p)
print("done", flush=True)
"""


class Reader:
    """The reader process (module docstring); a thread collects its stdout lines."""

    def __init__(self, socket_path: str, name: str, *extra: str):
        self._stderr = tempfile.TemporaryFile("w+")  # its guardian writes there too
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, socket_path, name, str(FIRST), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put("")  # EOF

    def expect(self, prefix: str, timeout: float = 120.0) -> str:
        """Wait for the next stdout line, which must start with ``prefix``."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            line = f"(nothing in {timeout:.0f} s)"
        self.lines.append(line)
        assert line.startswith(prefix), f"reader said {line!r}, not {prefix!r}: {self.tail()}"
        return line

    def go(self) -> float:
        """Let the reader read on; the time it was told."""
        started = time.monotonic()
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return started

    def finish(self, timeout: float) -> int:
        """The reader's returncode, once it ended (failing the test after ``timeout``)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the reader still runs {timeout:.0f} s later (hung?): {self.tail()}")

    def tail(self) -> str:
        if self.proc.poll() is None:
            return f"(running) stdout so far {self.lines}"
        self._collector.join(10)
        while not self._queue.empty():
            self.lines.append(self._queue.get())
        self._stderr.seek(0)
        err = self._stderr.read()
        return f"returncode {self.proc.returncode}, stdout {self.lines}, stderr {err[-2000:]}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._collector.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                pipe.close()
            except OSError:  # stdin of a dead reader: its buffer cannot be flushed
                pass


@pytest.fixture
def readers():
    """Factory of Reader processes; kills what is left of them after the test."""
    started: list[Reader] = []

    def start(*args: str) -> Reader:
        started.append(Reader(*args))
        return started[-1]

    yield start
    for reader in started:
        reader.kill()


@pytest.fixture
def two(cluster, monkeypatch):
    """Factory: ``two(fault_timeout, node_args=())`` -> (node1, node2, client of node1,
    client of node2) over a started 2-node cluster whose agents have that fault timeout
    (and those more flags), and a segment "faults/seg" homed on node1 holding the
    pattern. The agents check their lock order; the test fails on a violation or a
    traceback in their logs."""
    clients, nodes = [], []

    def start(fault_timeout: float = 10.0, node_args=()):
        monkeypatch.setenv("VAS_FAULT_TIMEOUT", str(fault_timeout))
        monkeypatch.setenv("VAS_LOCK_CHECK", "1")  # the agents inherit the environment
        running = cluster(nodes=2, memory=640 * MiB, node_args=node_args)
        node1, node2 = running.nodes
        nodes.extend((node1, node2))
        c1, c2 = vas.connect(node1.socket), vas.connect(node2.socket)
        clients.extend((c1, c2))
        c1.create("faults/seg", SIZE, mode=0o644)
        with c1.attach("faults/seg", "rw") as m:
            rows = m.ndarray(np.uint8).reshape(PAGES, PAGE)
            rows[:] = (np.arange(PAGES) % 251 + 1).astype(np.uint8)[:, None]
            del rows
        return node1, node2, c1, c2

    yield start
    for client in clients:
        client.close()
    for node in nodes:
        log = _log(node)
        assert MARKER not in log and "Traceback" not in log, f"{node.name}:\n{log[-5000:]}"


def _log(node) -> str:
    with open(node.log_path, errors="replace") as log:
        return log.read()


def _started(reader: Reader) -> None:
    assert reader.expect("fetch").split(None, 1)[1].strip() == "lazy"
    reader.expect("read")


def _ended_by_sigbus(reader: Reader, told: float, within: float) -> float:
    """Assert the reader ended with SIGBUS within ``within`` s of ``told``, having read
    only right bytes; the seconds it took."""
    returncode = reader.finish(within + 30)
    took = time.monotonic() - told
    summary = reader.tail()
    assert "WRONG" not in summary, summary
    assert returncode == -signal.SIGBUS, summary
    assert took < within, f"SIGBUS after {took:.1f} s (bound {within:.0f} s)"
    print(f"\nreader ended with SIGBUS {took * 1e3:.0f} ms after going on")
    return took


@needs_poison
def test_the_readers_own_agent_killed(two, readers):
    node1, node2, c1, c2 = two()
    reader = readers(node2.socket, "faults/seg")
    _started(reader)
    node2.kill()
    told = reader.go()
    _ended_by_sigbus(reader, told, PROMPT)
    assert "agent connection of process" in reader.tail()  # the guardian says why


@needs_poison
def test_the_home_killed(two, readers):
    fault_timeout = 5.0
    # A 2 s node lease (the default is 10 s): the wait for it to lapse below is short.
    node1, node2, c1, c2 = two(fault_timeout, ["--node-ttl", "2"])
    reader = readers(node2.socket, "faults/seg")
    _started(reader)
    node1.kill()
    told = reader.go()
    _ended_by_sigbus(reader, told, fault_timeout + PROMPT)
    # Once the home's lease is gone, its replica is never handed out again.
    wait_for(lambda: "node1" not in {n.id for n in c2.nodes()}, "node1's lease to lapse", 60)
    started = time.monotonic()
    with pytest.raises(vas.Unavailable, match="home node node1 of segment faults/seg is not "
                                              r"registered \(down\?\)"):
        c2.attach("faults/seg")
    assert time.monotonic() - started < 5.0
    with pytest.raises(vas.Unavailable, match="not registered"):
        c2.attach("faults/seg", fetch="eager")


@needs_poison
def test_a_home_restarted_empty(two, readers):
    node1, node2, c1, c2 = two(60.0)
    reader = readers(node2.socket, "faults/seg")
    _started(reader)
    node1.kill()
    node1.start()  # the same node id, registered again, holding nothing
    told = reader.go()
    # The home answers "not held": the pages are lost at once, not after 60 s.
    _ended_by_sigbus(reader, told, PROMPT)
    # The restarted home marked the segment lost before serving: a new attach is
    # refused at once, never handed a copy that cannot be filled.
    started = time.monotonic()
    with pytest.raises(vas.NotFound, match="was lost: its home node node1 restarted"):
        c2.attach("faults/seg")
    assert time.monotonic() - started < 5.0


@needs_poison
def test_seg_rm_while_a_reader_waits(two, readers):
    """`seg rm` of a segment a lazy reader waits on: SIGBUS promptly, not after the
    fault timeout."""
    node1, node2, c1, c2 = two(120.0)  # far beyond the test's bounds: rm must end the wait
    reader = readers(node2.socket, "faults/seg")
    _started(reader)
    node1.kill()  # the reader's next fetch fails again and again: it waits in the fault
    told = reader.go()
    wait_for(lambda: in_userfault(reader.proc.pid), "the reader to wait in a page fault", 60)
    removed = time.monotonic()
    c2.delete("faults/seg")  # what `vasctl seg rm faults/seg` sends (no CLI start-up here:
    # it must land well before node1's lease lapses, which would lose the pages too)
    returncode = reader.finish(PROMPT + 30)
    took = time.monotonic() - removed
    assert returncode == -signal.SIGBUS, reader.tail()
    assert "WRONG" not in reader.tail()
    assert took < PROMPT, f"SIGBUS {took:.1f} s after seg rm"
    assert "was deleted" in _log(node2)  # lost by the delete, not by a timeout
    print(f"\nreader ended with SIGBUS {took * 1e3:.0f} ms after seg rm "
          f"({removed - told:.1f} s after it began to wait)")


@needs_poison
def test_a_closed_connection_never_reads_zeros(two, readers):
    node1, node2, c1, c2 = two()
    reader = readers(node2.socket, "faults/seg", "close")
    _started(reader)
    told = reader.go()  # closes its client, keeps reading through its live view
    _ended_by_sigbus(reader, told, PROMPT)
    # Its own close, not the agent's death: the guardian raises no alarm on its stderr.
    assert "agent connection of process" not in reader.tail()


@needs_poison
def test_lazy_readers_with_both_agents_alive_read_every_byte(two, readers):
    node1, node2, c1, c2 = two()
    both = [readers(node2.socket, "faults/seg") for _ in range(2)]
    for reader in both:
        _started(reader)
        reader.go()
    for reader in both:
        reader.expect("done", 300)
        assert reader.finish(60) == 0, reader.tail()
    # The guardians ended with their readers: nothing of theirs holds node2's sessions.
    wait_for(lambda: c2.stat("faults/seg").attachments == 0, "the readers' attachments "
             "to be released", 30)
