"""Partitions: a node's link is cut (its bridge-side veth down: every packet dropped,
as behind a pulled cable) while a writer holds a segment's lock, then healed.

- A remote writer on b, cut off: its lock lapses at the coordinator and a writer on
  a (the home) takes it and syncs; b's node lease lapses (listed down). Healed, b
  registers again by itself, the old writer gets Fenced on its next sync and its
  bytes never reach the home, readers on b read the new version, never b's stale
  copy, and a new writer on b publishes again.
- The home a, cut off while its writer stores: its node lease lapses (its segment
  reads lost at the coordinator), the writer cannot renew and is revoked (a later
  store ends it with SIGBUS). Healed, a registers again under its id with its
  memory: the segment is ready, at the version it had, and the next writer's sync
  takes the next version.
- The home a of a segment with a backup on b, cut off: b's backup is promoted (the
  segment is served from b, which takes a write meanwhile); healed, a drops its stale
  copy, and a reader on a reads b's newer version.
- Every sync acknowledged to a client is recorded (writer, token, version): each
  version was acknowledged to one writer only, and tokens only grow with versions.

Agents run with a 2 s node lease and a 2 s writer lease. Clients are long-lived
processes in the namespaces answering one JSON line per command; every wait has a
deadline, and a cut link is brought up again at the end of its block even when the
test fails. The figures measured (cut -> writer fenced, cut -> lock taken over, cut ->
node down, heal -> node up) are printed (``pytest -s``).
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime

import grpc
import pytest

from vas.core import fetch
from vas.node import locks
from vas.proto import coordinator_pb2 as pb
from vas.proto import coordinator_pb2_grpc, types_pb2
from waiting import wait_for

pytestmark = pytest.mark.skipif(
    not fetch.write_protect_available(),
    reason="userfaultfd write-protect of shared memory unavailable (Linux < 5.19?)")

NODE_TTL = 2  # seconds: the agents' node lease (the fixture's writer lease is 2 s too)
HOSTS_NODE_ARGS = ["--node-ttl", str(NODE_TTL)]
MiB = 1 << 20
SIZE = 4 * MiB
#: Deadline of a lapse (measured 1.4-2.7 s after the cut) or of a return (0.1-1.8 s
#: after the heal): docs/ARCHITECTURE.md "Partitions".
LAPSE = 3 * NODE_TTL
#: Deadline of one client command.
ANSWER = 30.0

# One command per stdin line naming a segment (its mapping in this process), one JSON
# line per answer ("create NAME SIZE [REPLICAS]"; the rest as written below); a VasError
# is answered with its class name. "spin" starts a thread
# storing into every page of the mapping for ever (each store writes the byte that is
# there: the bytes never change); "held" answers this node's replica bytes.
_CLIENT = r"""
import hashlib, json, os, sys, threading, vas
c, maps = vas.connect(), {}
def answer(**fields):
    print(json.dumps(fields), flush=True)
def digest(m):
    return hashlib.sha256(m.buffer).hexdigest()
def spin(m):
    while True:
        for offset in range(0, m.size, 4096):
            m.buffer[offset] = m.buffer[offset]
for line in sys.stdin:
    verb, name, *args = line.split()
    m = maps.get(name)
    try:
        if verb == "create":
            c.create(name, int(args[0]), mode=0o644, replicas=int(args[1]) if args[1:] else 0)
            answer()
        elif verb == "delete":
            c.delete(name)
            answer()
        elif verb == "attach":
            m = maps[name] = c.attach(name, args[0], fetch=args[1])
            answer(version=m.version, token=m.token, sha=digest(m))
        elif verb == "fill":
            m.write(0, os.urandom(m.size))
            answer(sha=digest(m))
        elif verb == "sync":
            answer(version=m.sync(), token=m.token, sha=digest(m))
        elif verb == "refresh":
            answer(version=m.refresh(), sha=digest(m))
        elif verb == "spin":
            threading.Thread(target=spin, args=(m,), daemon=True).start()
            answer()
        elif verb == "detach":
            maps.pop(name).detach()
            answer()
        elif verb == "held":
            answer(bytes=next(n.replica_bytes for n in c.nodes() if n.id == c.local_node.id))
    except vas.VasError as exc:
        answer(error=type(exc).__name__, message=str(exc))
"""


class Client:
    """A long-lived vas client process inside a host's namespace."""

    def __init__(self, hosts, host: int, label: str):
        self.label = label
        self.process = hosts.spawn(host, _CLIENT)

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def answer(self, timeout: float = ANSWER) -> dict:
        """The next answer (failing the test after ``timeout`` seconds)."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"{self.label} did not answer within {timeout} s"
        line = self.process.stdout.readline()
        assert line, f"{self.label} exited ({self.process.poll()})"
        return json.loads(line)

    def waiting(self) -> bool:
        """Whether no answer has come (a command is still running)."""
        return not select.select([self.process.stdout], [], [], 0)[0]

    def ask(self, command: str, timeout: float = ANSWER) -> dict:
        """Send ``command``; its answer, which must not be an error."""
        self.send(command)
        answer = self.answer(timeout)
        assert "error" not in answer, (self.label, command, answer)
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


@dataclass
class Ledger:
    """Every sync acknowledged to a client: (segment, writer, token, version)."""

    acks: list[tuple[str, str, int, int]] = field(default_factory=list)

    def record(self, client: Client, name: str, answer: dict) -> dict:
        """``answer`` to a sync of ``name`` by ``client``, recorded if acknowledged."""
        if "error" not in answer:
            self.acks.append((name, client.label, answer["token"], answer["version"]))
        return answer

    def sync(self, client: Client, name: str) -> dict:
        """``client`` syncs ``name``; its answer (recorded if acknowledged)."""
        client.send(f"sync {name}")
        return self.record(client, name, client.answer())

    def check(self) -> None:
        """One writer per version; versions and tokens grow together."""
        for name in {ack[0] for ack in self.acks}:
            acks = sorted((version, token, writer)
                          for segment, writer, token, version in self.acks if segment == name)
            versions = [version for version, _, _ in acks]
            assert len(versions) == len(set(versions)), f"{name}: a version acked twice: {acks}"
            tokens = [token for _, token, _ in acks]
            assert tokens == sorted(tokens), f"{name}: a token went back: {acks}"


@pytest.fixture
def clients(hosts):
    """Factory of ``Client``s, all killed after the test."""
    made: list[Client] = []

    def make(host: int, label: str) -> Client:
        made.append(Client(hosts, host, label))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture(autouse=True)
def clean_logs(hosts):
    """After each test no agent may have logged a traceback (or, under VAS_LOCK_CHECK=1,
    a lock-order violation) while its link was cut and healed."""
    offsets = [os.path.getsize(node.log_path) for node in hosts.nodes]
    yield
    for node, offset in zip(hosts.nodes, offsets):
        with open(node.log_path, errors="replace") as log:
            log.seek(offset)
            text = log.read()
        assert locks.MARKER not in text and "Traceback" not in text, node.tail(80)


@pytest.fixture
def coordinator(hosts):
    """The coordinator's stub, from the root namespace (never cut off)."""
    with grpc.insecure_channel(hosts.coordinator.address) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)


def node_state(coordinator, node_id: str) -> int:
    nodes = coordinator.ListNodes(pb.ListNodesRequest(include_down=True), timeout=10).nodes
    return next(node.state for node in nodes if node.id == node_id)


def await_state(coordinator, node_id: str, state: int, start: float) -> float:
    """Wait (at most LAPSE) until ``node_id`` is listed in ``state``; seconds since ``start``."""
    wait_for(lambda: node_state(coordinator, node_id) == state,
             f"{node_id} listed {types_pb2.NodeState.Name(state)}", timeout=LAPSE)
    return since(start)


def segment(coordinator, name: str) -> types_pb2.SegmentInfo:
    return coordinator.GetSegment(pb.GetSegmentRequest(name=name), timeout=10)


def troubles(coordinator) -> tuple[list[str], list[str], list[str]]:
    """What ``vasctl status`` shows wrong: nodes down, segments lost, segments degraded."""
    status = coordinator.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
    return ([node.id for node in status.down_nodes], [ref.name for ref in status.lost],
            [ref.name for ref in status.degraded])


def take_lock(client: Client, name: str):
    """A condition for wait_for: ``client``'s "rw" attach of ``name``, or None while Busy."""
    client.send(f"attach {name} rw eager")
    answer = client.answer()
    if answer.get("error") == "Busy":
        return None
    assert "error" not in answer, answer
    return answer


def fenced_at(node, name: str, offset: int) -> float:
    """When (Unix seconds, from its log past ``offset``) ``node`` fenced the writer of ``name``."""
    with open(node.log_path) as log:
        log.seek(offset)
        for line in log:
            if f"writer lock of {name} " in line and "revoking it" in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                return stamp.timestamp()
    raise AssertionError(f"{node.node_id} did not log fencing the writer of {name}")


def since(start: float) -> float:
    return round(time.monotonic() - start, 2)


def test_a_cut_remote_writer_is_fenced_and_its_node_rejoins_without_stale_copies(
        hosts, clients, coordinator):
    name, gone, ledger = "part/remote", "part/gone", Ledger()
    node_b = hosts.nodes[1]
    home, old, reader = clients(0, "a-writer"), clients(1, "b-writer"), clients(1, "b-reader")
    home.ask(f"create {name} {SIZE}")
    home.ask(f"create {gone} {MiB}")
    old.ask(f"attach {name} rw eager")
    old.ask(f"fill {name}")
    assert ledger.sync(old, name)["version"] == 1
    reader.ask(f"attach {name} r eager")  # shares b's copy (and sees its writer's stores)
    reader.ask(f"attach {gone} r eager")
    reader.ask(f"detach {gone}")  # b keeps an idle copy of it
    held = reader.ask(f"held {gone}")["bytes"]
    old.ask(f"fill {name}")  # written, never published

    log_offset = os.path.getsize(node_b.log_path)
    with hosts.cut(1) as link:
        cut, cut_wall = time.monotonic(), time.time()
        old.send(f"sync {name}")  # before its deadline: the stream is stuck in the cut
        wait_for(lambda: take_lock(home, name), "a to take b's lapsed lock", timeout=LAPSE)
        takeover = since(cut)
        home.ask(f"fill {name}")
        newer = ledger.sync(home, name)
        assert newer["version"] == 2
        home.ask(f"delete {gone}")  # b cannot be told
        down = await_state(coordinator, node_b.node_id, types_pb2.NODE_STATE_DOWN, cut)
        assert troubles(coordinator)[:2] == ([node_b.node_id], [])
        assert old.waiting()  # its sync is still stuck
        link.heal()
        back = await_state(coordinator, node_b.node_id, types_pb2.NODE_STATE_READY,
                           time.monotonic())
    assert troubles(coordinator) == ([], [], [])

    stuck = ledger.record(old, name, old.answer())  # the stream ended after the heal
    assert stuck["error"] == "Fenced", stuck
    late = ledger.sync(old, name)
    assert late["error"] == "Fenced", late
    fenced = round(fenced_at(node_b, name, log_offset) - cut_wall, 2)
    assert segment(coordinator, name).version == 2
    assert home.ask(f"refresh {name}") == {"version": 2, "sha": newer["sha"]}  # b's never landed
    wait_for(lambda: reader.ask(f"held {gone}")["bytes"] == held - MiB,
             "b to drop its copy of the segment deleted meanwhile", timeout=LAPSE)
    assert reader.ask(f"refresh {name}") == {"version": 2, "sha": newer["sha"]}
    for mode in ("eager", "lazy"):
        fresh = clients(1, f"b-{mode}-reader").ask(f"attach {name} r {mode}")
        assert (fresh["version"], fresh["sha"]) == (2, newer["sha"]), mode
    home.ask(f"detach {name}")  # b writes again: its path to the home works after the heal
    successor = clients(1, "b-successor")
    taken = wait_for(lambda: take_lock(successor, name), "a to release the lock")
    assert (taken["version"], taken["sha"]) == (2, newer["sha"])
    successor.ask(f"fill {name}")
    newest = ledger.sync(successor, name)
    assert newest["version"] == 3
    assert reader.ask(f"refresh {name}") == {"version": 3, "sha": newest["sha"]}
    ledger.check()
    print(f"\nremote writer cut: fenced on b {fenced} s after the cut, lock taken over by a "
          f"after {takeover} s, b down after {down} s, b up again {back} s after the heal")


def test_a_cut_home_loses_its_lease_revokes_its_writer_and_rejoins_with_its_memory(
        hosts, clients, coordinator):
    name, ledger = "part/home", Ledger()
    node_a = hosts.nodes[0].node_id
    writer = clients(0, "a-writer")
    writer.ask(f"create {name} {SIZE}")
    writer.ask(f"attach {name} rw eager")
    writer.ask(f"fill {name}")
    synced = ledger.sync(writer, name)
    assert synced["version"] == 1
    writer.ask(f"spin {name}")

    with hosts.cut(0) as link:
        cut = time.monotonic()
        assert writer.process.wait(LAPSE) == -signal.SIGBUS  # revoked: a store faulted
        revoked = since(cut)
        down = await_state(coordinator, node_a, types_pb2.NODE_STATE_DOWN, cut)
        assert segment(coordinator, name).state == types_pb2.SEGMENT_STATE_LOST
        down_nodes, lost, _ = troubles(coordinator)
        assert down_nodes == [node_a] and name in lost
        link.heal()
        back = await_state(coordinator, node_a, types_pb2.NODE_STATE_READY, time.monotonic())
    assert troubles(coordinator) == ([], [], [])

    info = segment(coordinator, name)
    assert (info.state, info.version) == (types_pb2.SEGMENT_STATE_READY, 1)
    kept = clients(1, "b-reader").ask(f"attach {name} r eager")
    assert (kept["version"], kept["sha"]) == (1, synced["sha"])  # a kept its memory
    successor = clients(0, "a-successor")
    taken = wait_for(lambda: take_lock(successor, name), "the lock to be free", timeout=LAPSE)
    assert (taken["version"], taken["sha"]) == (1, synced["sha"])
    successor.ask(f"fill {name}")
    newer = ledger.sync(successor, name)
    assert newer["version"] == 2
    fresh = clients(1, "b-new-reader").ask(f"attach {name} r eager")
    assert (fresh["version"], fresh["sha"]) == (2, newer["sha"])
    ledger.check()
    print(f"\nhome cut: writer revoked (SIGBUS) {revoked} s after the cut, a down after "
          f"{down} s, a up again {back} s after the heal")


def test_a_cut_home_with_a_backup_is_replaced_and_drops_its_stale_copy(
        hosts, clients, coordinator):
    name, ledger = "part/backed", Ledger()
    node_a, node_b = (node.node_id for node in hosts.nodes)
    writer = clients(0, "a-writer")
    writer.ask(f"create {name} {SIZE} 1")
    assert list(segment(coordinator, name).backups) == [node_b]
    writer.ask(f"attach {name} rw eager")
    writer.ask(f"fill {name}")
    synced = ledger.sync(writer, name)  # returns once b's backup holds it
    writer.ask(f"detach {name}")

    with hosts.cut(0) as link:
        cut = time.monotonic()
        wait_for(lambda: segment(coordinator, name).home == node_b,
                 "b's backup to be promoted", timeout=2 * LAPSE)
        promoted = since(cut)
        successor = clients(1, "b-writer")
        taken = successor.ask(f"attach {name} rw eager")
        assert (taken["version"], taken["sha"]) == (1, synced["sha"])
        successor.ask(f"fill {name}")
        newer = ledger.sync(successor, name)
        assert newer["version"] == 2
        successor.ask(f"detach {name}")
        link.heal()
        back = await_state(coordinator, node_a, types_pb2.NODE_STATE_READY, time.monotonic())

    reader = clients(0, "a-reader")

    def current_on_a():
        seen = reader.ask(f"attach {name} r eager")
        assert "error" not in seen, seen
        assert (seen["version"], seen["sha"]) in ((1, synced["sha"]), (2, newer["sha"])), seen
        if seen["version"] == 2:
            return seen
        reader.ask(f"detach {name}")  # a's stale copy, until a has re-read the record
        return None

    wait_for(current_on_a, "a to drop its stale copy", timeout=LAPSE)
    dropped = since(cut)
    assert segment(coordinator, name).home == node_b
    ledger.check()
    print(f"\nbacked home cut: b promoted {promoted} s after the cut, a up again {back} s "
          f"after the heal, its stale copy gone {dropped} s after the cut")
