"""A bounded history-checking run: writers and readers on several nodes while agents are
killed and restarted and writers are paused past their lease.

Every 4-byte word a writer stores says which version it belongs to and which write made
it: ``mask ^ (version << 12 | tag)``, with a per-segment random ``mask`` (so zeros and
stray bytes never decode as a plausible write) and a ``tag`` unique to each write.
Writers log each write before it starts ("begin") and after ``sync()`` returned ("ack");
a writer paused past its lease writes with the reserved ``STALE`` tag into the
attachment it held before the pause, then syncs (a fenced write). Readers, on a node
with no writer (so they only ever see published bytes), attach "r" lazily or eagerly,
refresh, read the whole segment and log every (version, tag) pair they saw. Logs are
JSON lines, one file per process, written before each step completes, so a process
killed mid-way leaves what it did.

The checker asserts over the whole history:

- no reader ever saw a zero word of a segment whose published version was above 0 when
  it attached (no silent zeros) nor a word that decodes to no write (no garbage);
- no reader ever saw a ``STALE`` word (no fenced write is visible);
- every word seen belongs to a write that began (it was written by someone) while its
  writer held the lock; each version was acknowledged to one write only;
- versions a reader process saw of one segment never went back, and acknowledged
  versions grew by one per sync.

Readers and writers may fail with vas errors (Unavailable while their agent restarts,
Fenced, Busy) or die of SIGBUS (a lazy page that can no longer be fetched; a home
writer's store after its lock was revoked): failures, never wrong bytes; the harness
restarts them.
"""
from __future__ import annotations

import collections
import json
import multiprocessing
import os
import random
import signal
import time
import zlib

import numpy as np
import pytest

import vas

SEGMENT_BYTES = 4 << 20
#: Homed on node1 (two) and node2 (one); written from node1 and node2, read on node3.
SEGMENTS = {"hist/a": 0, "hist/b": 0, "hist/c": 1}
WRITER_NODES = (0, 1)
READER_NODE = 2
READERS = 3
WRITER_TTL = 2
#: Seconds of load (18 in the suite: two faults of each kind; longer runs with
#: VAS_HISTORY_SECONDS), and between two faults.
RUN_SECONDS = float(os.environ.get("VAS_HISTORY_SECONDS", "18"))
FAULT_EVERY = 4.5
STALE = 0xFFF
#: Tags of writer ``i`` start at ``1 + i * _TAG_SPAN`` (STALE excluded).
_TAG_SPAN = 2000


def _mask(name: str) -> np.ndarray:
    """Random words with the top bit set: a written word (version < 2**19) is never 0."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.integers(1 << 31, 1 << 32, SEGMENT_BYTES // 4, dtype=np.uint32)


def _words(version: int, tag: int, mask: np.ndarray) -> np.ndarray:
    return mask ^ np.uint32(((version & 0xFFFFF) << 12) | tag)


class _Log:
    """JSON lines, flushed at once (the process may be killed at any moment)."""

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)

    def __call__(self, **record) -> None:
        record["t"] = time.monotonic()
        self._file.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------- processes

def _writer(index: int, socket: str, logdir: str, stop, paused_at, hold, holding,
            seed: int) -> None:
    log = _Log(os.path.join(logdir, f"writer{index}-{os.getpid()}.jsonl"))
    rng = random.Random(seed)
    tags = iter(range(1 + index * _TAG_SPAN, (index + 1) * _TAG_SPAN))
    masks = {name: _mask(name) for name in SEGMENTS}
    client = None
    while not stop.is_set():
        try:
            client = client if client is not None and not client.closed else vas.connect(socket)
            name = rng.choice(sorted(SEGMENTS))
            m = client.attach(name, "rw", fetch="eager")
        except vas.VasError as exc:
            log(kind="attach-failed", error=type(exc).__name__)
            stop.wait(0.05)
            continue
        attached = time.monotonic()
        try:
            version = m.version
            for _ in range(3):
                if hold.value and SEGMENTS[name] == 0:
                    # The harness pauses us while we hold this attachment of a segment
                    # homed on node1: writer 0 is its home writer, writer 1 a remote one.
                    holding.set()
                    deadline = time.monotonic() + 30
                    while hold.value and time.monotonic() < deadline:
                        time.sleep(0.01)
                stale = 0 < paused_at.value and attached < paused_at.value
                tag = STALE if stale else next(tags)
                log(kind="begin", name=name, id=m.info.id, version=version + 1, tag=tag)
                np.frombuffer(m.buffer, np.uint32)[:] = _words(version + 1, tag, masks[name])
                try:
                    got = m.sync()
                except vas.VasError as exc:
                    log(kind="sync-failed", name=name, id=m.info.id, version=version + 1,
                        tag=tag, error=type(exc).__name__)
                    break
                finally:
                    if stale:
                        paused_at.value = 0.0
                log(kind="ack", name=name, id=m.info.id, version=got, tag=tag, base=version)
                version = got
        finally:
            try:
                m.detach()
            except vas.VasError:
                pass


def _read_once(client, name: str, fetch: str, mask: np.ndarray, log) -> None:
    """Attach, refresh, read every word of ``name`` and log the (version, tag) pairs."""
    with client.attach(name, "r", fetch=fetch) as m:
        attached_version = m.version
        version = m.refresh()
        # Piece by piece, so that a read is often under way when a fault hits.
        step = 256 << 10
        words = np.concatenate([np.frombuffer(m.read(at, step), np.uint32)
                                for at in range(0, m.size, step)])
        zeros = int(np.count_nonzero(words == 0))
        decoded = words[words != 0] ^ mask[words != 0]
        pairs = collections.Counter(decoded.tolist())
        log(kind="read", name=name, id=m.info.id, fetch=fetch,
            attached_version=attached_version, version=version, zeros=zeros,
            pairs={f"{p >> 12}:{p & 0xFFF}": n for p, n in pairs.items()}, words=len(words))


def _reader(index: int, socket: str, logdir: str, stop, seed: int) -> None:
    log = _Log(os.path.join(logdir, f"reader{index}-{os.getpid()}.jsonl"))
    rng = random.Random(seed)
    masks = {name: _mask(name) for name in SEGMENTS}
    client = None
    while not stop.is_set():
        name, fetch = rng.choice(sorted(SEGMENTS)), rng.choice(("lazy", "eager"))
        try:
            client = client if client is not None and not client.closed else vas.connect(socket)
            _read_once(client, name, fetch, masks[name], log)
        except vas.VasError as exc:
            log(kind="read-failed", name=name, error=type(exc).__name__)
            stop.wait(0.05)


# ---------------------------------------------------------------------- the checker

def _records(logdir: str):
    for entry in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, entry)) as lines:
            for line in lines:
                if line.endswith("\n"):  # a line cut by a kill is not a record
                    yield entry, json.loads(line)


def check_history(logdir: str) -> tuple[list[str], collections.Counter]:
    """The violations of the module docstring's promises, and the figures."""
    problems: list[str] = []
    figures: collections.Counter = collections.Counter()
    begun: set[tuple[int, int, int]] = set()
    acked: dict[tuple[int, int], int] = {}
    last_version: dict[tuple[str, int], int] = {}
    # Writes first: a read may come from a file listed before its writer's.
    records = sorted(_records(logdir), key=lambda entry: entry[1]["kind"] == "read")
    for source, record in records:
        kind = record["kind"]
        figures[kind] += 1
        if kind == "begin":
            begun.add((record["id"], record["version"], record["tag"]))
            figures["stale writes"] += record["tag"] == STALE
        elif kind == "ack":
            key = (record["id"], record["version"])
            if record["version"] != record["base"] + 1:
                problems.append(f"{source}: sync of {record['name']} returned version "
                                f"{record['version']} on top of {record['base']}")
            if key in acked and acked[key] != record["tag"]:
                problems.append(f"version {key[1]} of {record['name']} (id {key[0]}) "
                                f"acknowledged to two writes")
            acked[key] = record["tag"]
            if record["tag"] == STALE:
                problems.append(f"{source}: a fenced write of {record['name']} was "
                                f"acknowledged as version {record['version']}")
        elif kind == "read":
            figures["words verified"] += record["words"]
            segment = (source, record["id"])
            if record["version"] < last_version.get(segment, 0):
                problems.append(f"{source}: {record['name']} went back from version "
                                f"{last_version[segment]} to {record['version']}")
            last_version[segment] = record["version"]
            if record["zeros"] and record["attached_version"] > 0:
                problems.append(f"{source}: {record['zeros']} zero words in {record['name']} "
                                f"({record['fetch']}) at version {record['version']}")
            for pair, count in record["pairs"].items():
                version, tag = map(int, pair.split(":"))
                if tag == STALE:
                    problems.append(f"{source}: {count} words of a fenced write visible in "
                                    f"{record['name']}")
                elif (record["id"], version, tag) not in begun:
                    problems.append(f"{source}: {count} words of {record['name']} decode to "
                                    f"version {version} tag {tag}, which nobody wrote")
    return problems, figures


# ---------------------------------------------------------------------- the run

@pytest.fixture
def world(cluster):
    return cluster(nodes=3, writer_ttl=WRITER_TTL)


def test_history_under_faults_has_no_wrong_byte(world, tmp_path):
    for name, node in SEGMENTS.items():
        with vas.connect(world.nodes[node].socket) as c:
            c.create(name, SEGMENT_BYTES, mode=0o644)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    logdir = os.environ.get("VAS_HISTORY_LOGS") or str(tmp_path)
    pauses = [ctx.Value("d", 0.0) for _ in WRITER_NODES]
    holds = [ctx.Value("i", 0) for _ in WRITER_NODES]
    holdings = [ctx.Event() for _ in WRITER_NODES]
    rng = random.Random(7)
    injected: collections.Counter = collections.Counter()

    def start_writer(i):
        proc = ctx.Process(target=_writer, args=(i, world.nodes[WRITER_NODES[i]].socket,
                                                 logdir, stop, pauses[i], holds[i],
                                                 holdings[i], rng.random()))
        proc.start()
        return proc

    def start_reader(i):
        proc = ctx.Process(target=_reader, args=(i, world.nodes[READER_NODE].socket, logdir,
                                                 stop, rng.random()))
        proc.start()
        return proc

    probe_log = _Log(os.path.join(logdir, "reader-probe.jsonl"))

    def probe(i):
        """Right after writer ``i``'s stale write (it clears its pause mark then), read
        every segment homed on node1 from node3: a fenced write must not be there."""
        deadline = time.monotonic() + 10
        while pauses[i].value and writers[i].is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # a home writer's stale store ends it with SIGBUS instead
        with vas.connect(world.nodes[READER_NODE].socket) as c:
            for name in (n for n, home in SEGMENTS.items() if home == 0):
                try:
                    _read_once(c, name, "eager", _mask(name), probe_log)
                except vas.VasError as exc:
                    probe_log(kind="read-failed", name=name, error=type(exc).__name__)

    writers = [start_writer(i) for i in range(len(WRITER_NODES))]
    readers = [start_reader(i) for i in range(READERS)]
    try:
        end = time.monotonic() + RUN_SECONDS
        turn = 0
        while time.monotonic() < end:
            stop.wait(FAULT_EVERY)
            for i, proc in enumerate(readers):  # SIGBUS or a crash: start another
                if not proc.is_alive():
                    injected[f"reader exit {proc.exitcode}"] += 1
                    readers[i] = start_reader(i)
            for i, proc in enumerate(writers):  # a revoked home writer's store: SIGBUS
                if not proc.is_alive():
                    injected[f"writer exit {proc.exitcode}"] += 1
                    pauses[i].value = 0.0
                    writers[i] = start_writer(i)
            if turn % 2 == 0:
                i = turn // 2 % len(writers)
                holds[i].value = 1  # pause it while it holds an attachment
                if holdings[i].wait(10):
                    pauses[i].value = time.monotonic()
                    os.kill(writers[i].pid, signal.SIGSTOP)
                    stop.wait(2.5 * WRITER_TTL)
                    os.kill(writers[i].pid, signal.SIGCONT)
                    holds[i].value = 0
                    injected["writer paused past its lease"] += 1
                    probe(i)
                holds[i].value = 0
                holdings[i].clear()
            else:
                node = world.nodes[READER_NODE]
                node.kill()
                node.start()
                injected["reader's agent killed -9 and restarted"] += 1
            turn += 1
    finally:
        stop.set()
        for proc in writers + readers:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGCONT)
            proc.join(20)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    problems, figures = check_history(logdir)
    print(f"faults injected: {dict(injected)}; history: {dict(figures)}")
    assert figures["read"] > 20 and figures["ack"] > 10, dict(figures)
    assert not problems, "\n".join(problems[:20])
