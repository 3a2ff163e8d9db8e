"""A delete waits for the attachments on every node, not only on the home: the segment
turns "deleting" (no new attach anywhere, the name stays taken), a lazy replica attached
on another node goes on fetching its pages from the home, and the home frees the pages
and removes the record once the last of them detached, or once that node is gone.
Once an attach on another node returned, a delete sees it (its node reported it before
answering): no test here waits for the report.

The readers run in child processes: a page that could not be fetched any more would end
them with SIGBUS, which must fail the test, not the test run.
"""
from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import threading

import pytest

import vas
from waiting import wait_for
from worlds import fill, gone, memory_used

MiB = 1 << 20
NODE_TTL = 2  # seconds: the kill test's agents (a dead node's reports lapse with its lease)

READER = textwrap.dedent("""
    import hashlib, sys, vas
    client = vas.connect(sys.argv[1])
    mapping = client.attach(sys.argv[2], sys.argv[3])
    print("attached", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "read":
            print(hashlib.sha256(mapping.buffer).hexdigest(), flush=True)
        elif command[0] == "write":  # then publish it
            mapping.write(0, bytes.fromhex(command[1]))
            print(mapping.sync(), flush=True)
        elif command[0] == "detach":
            mapping.detach()
            print("detached", flush=True)
""")


class Reader:
    """A client process on ``socket`` holding ``name`` attached (``mode``), answering one
    line per command; every answer is awaited with a deadline."""

    def __init__(self, socket: str, name: str, mode: str = "r"):
        self.proc = subprocess.Popen([sys.executable, "-c", READER, socket, name, mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.answer() == "attached"

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put("")  # EOF: the process ended

    def answer(self, timeout: float = 30.0) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer from the reader in {timeout} s") from None
        assert line, f"the reader ended ({self.proc.wait(5)}): {self.proc.stderr.read()[-2000:]}"
        return line

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def readers():
    started: list[Reader] = []

    def start(*args) -> Reader:
        started.append(Reader(*args))
        return started[-1]

    yield start
    for reader in started:
        reader.close()


@pytest.fixture(scope="module")
def shared(module_cluster):
    return module_cluster(nodes=2, memory=256 * MiB)


def freed_at_the_last_detach(client, name: str, nodes) -> None:
    """Wait until the record of ``name`` is gone and no node of ``nodes`` holds memory."""
    wait_for(lambda: gone(client, name), "the record to go at the last detach", timeout=10)
    wait_for(lambda: all(memory_used(node) == 0 for node in nodes), "every node to free it",
             timeout=10)


@pytest.mark.parametrize("through", ["home", "reader's node"])
def test_a_lazy_reader_on_another_node_keeps_its_segment_until_it_detaches(
        shared, readers, through):
    node1, node2 = shared.nodes
    name = f"elsewhere/lazy-{through[0]}"
    with vas.connect(node1.socket) as c1, vas.connect(node2.socket) as c2:
        digest = fill(c1, name, 8 * MiB)
        reader = readers(node2.socket, name)  # lazy: no page fetched yet
        (c1 if through == "home" else c2).delete(name)
        assert c1.stat(name).state == "deleting"
        for client in (c1, c2):  # no new attach anywhere
            with pytest.raises(vas.NotFound, match="being deleted|not found"):
                client.attach(name)
        # Every page is fetched after the delete, from the home that kept them.
        assert reader.ask("read") == digest
        assert memory_used(node1) == 8 * MiB
        assert reader.ask("detach") == "detached"
        freed_at_the_last_detach(c1, name, shared.nodes)


def test_a_forced_delete_does_not_wait_for_other_nodes(shared, readers):
    node1, node2 = shared.nodes
    name = "elsewhere/forced"
    with vas.connect(node1.socket) as c1:
        fill(c1, name, 4 * MiB)
        reader = readers(node2.socket, name, "r")
        assert reader.ask("read")  # fetched while it lived: stays readable
        c1.delete(name, force=True)
        assert gone(c1, name)  # at once
        wait_for(lambda: memory_used(node1) == 0, "the home to free it", timeout=10)
        assert reader.ask("detach") == "detached"
        wait_for(lambda: memory_used(node2) == 0, "node2 to free its copy", timeout=10)


def test_a_remote_writer_publishes_until_it_detaches_from_a_deleted_segment(shared, readers):
    node1, node2 = shared.nodes
    name = "elsewhere/writer"
    with vas.connect(node1.socket) as c1:
        fill(c1, name, 1 * MiB)
        writer = readers(node2.socket, name, "rw")
        c1.delete(name)
        assert c1.stat(name).state == "deleting"
        assert writer.ask("write " + b"LAST".hex()) == "1"  # published: version 1
        assert c1.stat(name).version == 1
        assert writer.ask("detach") == "detached"
        freed_at_the_last_detach(c1, name, shared.nodes)


def test_the_home_frees_a_deleted_segment_once_the_attached_node_is_gone(cluster, readers):
    running = cluster(nodes=2, node_args=["--node-ttl", str(NODE_TTL)])
    node1, node2 = running.nodes
    name = "elsewhere/dead"
    with vas.connect(node1.socket) as c1:
        fill(c1, name, 4 * MiB)
        readers(node2.socket, name)
        c1.delete(name)
        assert c1.stat(name).state == "deleting"
        node2.kill()  # its reports lapse with its lease
        wait_for(lambda: gone(c1, name), "the home to free it after node2's lease lapsed",
                 timeout=NODE_TTL + 10)
        assert memory_used(node1) == 0
