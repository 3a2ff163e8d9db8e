"""Partitions: a node's link is cut (its bridge-side veth down: every packet dropped,
as behind a pulled cable) while a writer holds a segment's lock, then healed.

- A remote writer on b, cut off: its lock lapses at the coordinator and a writer on
  a (the home) takes it and syncs; b's node lease lapses (listed down). Healed, b
  registers again by itself, the old writer gets Fenced on its next sync and its
  bytes never reach the home, and readers on b read the new version, never b's stale
  copy.
- The home a, cut off while its writer stores: its node lease lapses (its segment
  reads lost at the coordinator), the writer cannot renew and is revoked (a later
  store ends it with SIGBUS). Healed, a registers again under its id with its
  memory: the segment is ready, at the version it had, and the next writer's sync
  takes the next version.
- Every sync acknowledged to a client is recorded (writer, token, version): each
  version was acknowledged to one writer only, and tokens only grow with versions.

Agents run with a 2 s node lease and a 2 s writer lease. Clients are long-lived
processes in the namespaces answering one JSON line per command; every wait has a
deadline, and a cut link is brought up again at the end of its block even when the
test fails. The figures measured (cut -> lock taken over, cut -> node down, heal ->
node up) are printed (``pytest -s``).
"""
from __future__ import annotations

import contextlib
import json
import select
import signal
import time
from dataclasses import dataclass, field

import grpc
import pytest

from vas.core import fetch
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
#: Deadline of a lapse or a return (each is measured in ~1-3 s; see ARCHITECTURE "Partitions").
LAPSE = 5 * NODE_TTL
#: Deadline of one client command.
ANSWER = 30.0

# One command per stdin line, one JSON line per answer; a VasError is answered with
# its class name. "spin" starts a thread storing into the mapping for ever.
_CLIENT = r"""
import hashlib, json, os, sys, threading, vas
c, m = vas.connect(), None
def answer(**fields):
    print(json.dumps(fields), flush=True)
def digest():
    return hashlib.sha256(m.buffer).hexdigest()
def spin():
    while True:
        for offset in range(0, m.size, 4096):
            m.buffer[offset] = 1
for line in sys.stdin:
    verb, *args = line.split()
    try:
        if verb == "create":
            c.create(args[0], int(args[1]), mode=0o644)
            answer()
        elif verb == "attach":
            m = c.attach(args[0], args[1], fetch=args[2])
            answer(version=m.version, token=m.token, sha=digest())
        elif verb == "fill":
            m.write(0, os.urandom(m.size))
            answer(sha=digest())
        elif verb == "sync":
            answer(version=m.sync(), token=m.token, sha=digest())
        elif verb == "refresh":
            answer(version=m.refresh(), sha=digest())
        elif verb == "spin":
            threading.Thread(target=spin, daemon=True).start()
            answer()
        elif verb == "detach":
            m.detach()
            answer()
    except vas.VasError as exc:
        answer(error=type(exc).__name__, message=str(exc))
"""


class Client:
    """A long-lived vas client process inside a host's namespace."""

    def __init__(self, hosts, host: int, label: str):
        self.label = label
        self.process = hosts.spawn(host, _CLIENT)

    def ask(self, command: str, timeout: float = ANSWER) -> dict:
        """Send ``command``; its answer (failing the test after ``timeout`` seconds)."""
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"{self.label} did not answer {command!r} within {timeout} s"
        line = self.process.stdout.readline()
        assert line, f"{self.label} exited ({self.process.poll()}) on {command!r}"
        return json.loads(line)

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

    def sync(self, client: Client, name: str) -> dict:
        """``client`` syncs ``name``; its answer, recorded if acknowledged."""
        answer = client.ask("sync")
        if "error" not in answer:
            self.acks.append((name, client.label, answer["token"], answer["version"]))
        return answer

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


@pytest.fixture
def coordinator(hosts):
    """The coordinator's stub, from the root namespace (never cut off)."""
    with grpc.insecure_channel(hosts.coordinator.address) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)


def node_state(coordinator, node_id: str) -> int:
    nodes = coordinator.ListNodes(pb.ListNodesRequest(include_down=True), timeout=10).nodes
    return next(node.state for node in nodes if node.id == node_id)


def segment(coordinator, name: str) -> types_pb2.SegmentInfo:
    return coordinator.GetSegment(pb.GetSegmentRequest(name=name), timeout=10)


def take_lock(client: Client, name: str) -> dict:
    """A condition for wait_for: ``client``'s "rw" attach of ``name``, or None while Busy."""
    answer = client.ask(f"attach {name} rw eager")
    if answer.get("error") == "Busy":
        return None
    assert "error" not in answer, answer
    return answer


def since(start: float) -> float:
    return round(time.monotonic() - start, 2)


def test_a_cut_remote_writer_is_fenced_and_its_node_rejoins_without_stale_copies(
        hosts, clients, coordinator):
    name, ledger = "part/remote", Ledger()
    home, old = clients(0, "a-writer"), clients(1, "b-writer")
    home.ask(f"create {name} {SIZE}")
    old.ask(f"attach {name} rw eager")
    old.ask("fill")
    synced = ledger.sync(old, name)
    assert synced["version"] == 1
    reader = clients(1, "b-reader")  # shares b's copy with its writer
    assert reader.ask(f"attach {name} r eager")["sha"] == synced["sha"]
    stale = old.ask("fill")["sha"]  # written, never published

    node_b = hosts.nodes[1].node_id
    with hosts.cut(1) as link:
        cut = time.monotonic()
        wait_for(lambda: take_lock(home, name), "a to take b's lapsed lock", timeout=LAPSE)
        taken = since(cut)
        home.ask("fill")
        newer = ledger.sync(home, name)
        assert newer["version"] == 2
        wait_for(lambda: node_state(coordinator, node_b) == types_pb2.NODE_STATE_DOWN,
                 "b listed down", timeout=LAPSE)
        down = since(cut)
        link.heal()
        healed = time.monotonic()
        wait_for(lambda: node_state(coordinator, node_b) == types_pb2.NODE_STATE_READY,
                 "b to register again", timeout=LAPSE)
        back = since(healed)

    late = ledger.sync(old, name)
    assert late["error"] == "Fenced", late
    assert segment(coordinator, name).version == 2
    assert home.ask("refresh") == {"version": 2, "sha": newer["sha"]}  # b's bytes never landed
    assert reader.ask("refresh") == {"version": 2, "sha": newer["sha"]}
    for mode in ("eager", "lazy"):
        fresh = clients(1, f"b-{mode}-reader").ask(f"attach {name} r {mode}")
        assert (fresh["version"], fresh["sha"]) == (2, newer["sha"]), mode
    assert stale != newer["sha"]
    ledger.check()
    print(f"\nremote writer cut: lock taken over {taken} s after the cut, "
          f"node down after {down} s, up again {back} s after the heal")


def test_a_cut_home_loses_its_lease_revokes_its_writer_and_rejoins_with_its_memory(
        hosts, clients, coordinator):
    name, ledger = "part/home", Ledger()
    writer = clients(0, "a-writer")
    writer.ask(f"create {name} {SIZE}")
    writer.ask(f"attach {name} rw eager")
    written = writer.ask("fill")
    assert ledger.sync(writer, name)["version"] == 1
    writer.ask("spin")

    node_a = hosts.nodes[0].node_id
    with hosts.cut(0) as link:
        cut = time.monotonic()
        assert writer.process.wait(LAPSE) == -signal.SIGBUS  # revoked: a store faulted
        revoked = since(cut)
        wait_for(lambda: node_state(coordinator, node_a) == types_pb2.NODE_STATE_DOWN,
                 "a listed down", timeout=LAPSE)
        down = since(cut)
        assert segment(coordinator, name).state == types_pb2.SEGMENT_STATE_LOST
        link.heal()
        healed = time.monotonic()
        wait_for(lambda: node_state(coordinator, node_a) == types_pb2.NODE_STATE_READY,
                 "a to register again", timeout=LAPSE)
        back = since(healed)

    info = segment(coordinator, name)
    assert (info.state, info.version) == (types_pb2.SEGMENT_STATE_READY, 1)
    assert written["sha"]  # the stores made while the lock held stay, unpublished
    successor = clients(0, "a-successor")
    assert wait_for(lambda: take_lock(successor, name), "the lock to be free",
                    timeout=LAPSE)["version"] == 1
    successor.ask("fill")
    newer = ledger.sync(successor, name)
    assert newer["version"] == 2
    fresh = clients(1, "b-reader").ask(f"attach {name} r eager")
    assert (fresh["version"], fresh["sha"]) == (2, newer["sha"])
    ledger.check()
    print(f"\nhome cut: writer revoked (SIGBUS) {revoked} s after the cut, node down "
          f"after {down} s, up again {back} s after the heal")
