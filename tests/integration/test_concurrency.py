"""Concurrency stress over a real 2-agent cluster, with the agents' lock-order checker on.

Several client processes (spawned, each with a connection to both agents) create,
attach ("r" and "rw", fetch lazy and eager, on the home node and on the other node),
write, sync, refresh, wait, detach and delete over 24 segments of 1-4 MiB at once, for
a bounded number of operations. The agents run with ``VAS_LOCK_CHECK=1``
(``vas.node.locks``), so every lock-order inversion and every lock held across a
network call is logged; the test fails on any such line, and on any traceback in the
agents' logs.

What the data checks rely on
----------------------------
Version ``v >= 1`` of incarnation ``id`` of segment ``name`` is one pattern over the
whole segment: byte ``o`` is ``(base[o] + v) mod 256``, ``base`` being random bytes
seeded by ``(name, id)``; version 0 is the zeros of a fresh segment. A writer attaches
"rw" (``m.version`` is then the current version ``v``: it holds the lock), writes
the pattern of ``v + 1`` and syncs; sync must return exactly ``v + 1``. Every byte
read thus tells which version it belongs to, without any ambiguity within 256
versions, even when a read overlaps a write (shared pages are not snapshots: a home
reader sees a home writer's stores at once, and the spec only promises release
consistency).

After each ``sync()`` returned ``v``, the writer records ``v`` in a table shared by
all clients (``published``). A reader reads the table (``floor``) before its attach or
``refresh()``, copies the whole segment, then reads the table again (``ceiling``). The
release-consistency promise (a reader that refreshes after ``sync()`` returned sees
every write made before it) means every byte belongs to a version in
``[floor, ceiling + 1]`` (``+ 1``: the one writer may be writing the next version
already). Also: a version returned by attach/refresh/sync is never below ``floor`` nor
below one this process saw before for that incarnation, and across all clients each
version of an incarnation is published exactly once, 1, 2, 3, ... without gaps.

Races are part of the load: ``Busy`` (the writer lock is taken), ``NotFound`` (deleted
meanwhile), ``AlreadyExists`` (created meanwhile) are counted; any other error fails
(an attach on the home node racing with the create of the same name there included).

Lazy readers of the six "churn" names (the only ones deleted) ``prefetch()`` before
reading: a demand fault on a replica whose home copy was freed by a delete raises
SIGBUS (see ARCHITECTURE, "Lazy attach", Failures), which would end the worker; a
prefetch of those pages raises ``Unavailable`` ("home node N no longer holds segment
X ...", docs/errors.md), counted here as the delete it is (``NotFound``). The other
names are read by demand faults.
"""
from __future__ import annotations

import collections
import faulthandler
import multiprocessing
import os
import random
import re
import signal
import time
import traceback
import zlib

import numpy as np

import vas
from vas.node.locks import MARKER
from workers import dump_stacks, run_workers

MiB = 1 << 20
PAGE = 4096

NAMES = [f"stress/{i:02d}" for i in range(24)]
#: 1 MiB to 4 MiB, most not a multiple of the 256 KiB publish chunk.
SIZES = {name: MiB + ((i * 97) % 769) * PAGE for i, name in enumerate(NAMES)}
#: Only these are deleted (and created again).
CHURN = frozenset(NAMES[-6:])
WORKERS = 4
#: Operations per worker, and seconds: whichever ends first.
OPERATIONS = 160
BUDGET = 25.0
#: Attachments a worker keeps open between operations (refreshed later).
HELD = 4
#: Seconds the whole test may take to start and finish its workers.
DEADLINE = 50.0
#: What a race may raise.
EXPECTED = (vas.Busy, vas.NotFound, vas.AlreadyExists)
_OPS = ("create", "delete", "write", "read", "refresh")
_WEIGHTS = (10, 4, 30, 36, 20)


class DataError(AssertionError):
    """Bytes or versions a client saw break the promises the module docstring lists."""


def _base(name: str, segment_id: int, size: int) -> np.ndarray:
    """The random bytes under every version of incarnation ``segment_id`` of ``name``."""
    generator = np.random.Generator(np.random.PCG64([zlib.crc32(name.encode()), segment_id]))
    return np.frombuffer(generator.bytes(size), np.uint8)


class _Worker:
    """One client process's load: ``run()`` performs bounded random operations."""

    def __init__(self, index: int, sockets: list[str], published, published_lock, seed: int):
        self.index = index
        self.rng = random.Random(seed)
        self.clients = [vas.connect(socket) for socket in sockets]
        self.published = published          # "name#id" -> newest version a sync returned
        self.published_lock = published_lock
        self.ops: collections.Counter = collections.Counter()
        self.expected: collections.Counter = collections.Counter()
        self.seen: dict[tuple[str, int], int] = {}  # newest version this process saw
        self.held: list[tuple[vas.Mapping, str]] = []  # open "r" attachments and their kind
        self.syncs: list[tuple[str, int, int]] = []
        self.figures: collections.Counter = collections.Counter()
        self._bases: collections.OrderedDict = collections.OrderedDict()

    # ------------------------------------------------------------------ checks

    def base(self, name: str, segment_id: int, size: int) -> np.ndarray:
        key = (name, segment_id)
        if key not in self._bases:
            self._bases[key] = _base(name, segment_id, size)
            if len(self._bases) > 8:
                self._bases.popitem(last=False)
        return self._bases[key]

    def published_version(self, name: str, segment_id: int) -> int:
        return self.published.get(f"{name}#{segment_id}", 0)

    def saw(self, m: vas.Mapping, version: int, floor: int, what: str) -> None:
        """``version`` came back from ``what``: never below ``floor`` nor an earlier sighting."""
        key = (m.name, m.info.id)
        if version < floor:
            raise DataError(f"{what} of {m.name} (id {key[1]}) returned version {version}, "
                            f"but version {floor} was published before it started")
        if version < self.seen.get(key, 0):
            raise DataError(f"{what} of {m.name} (id {key[1]}) returned version {version} after "
                            f"this process saw version {self.seen[key]}: versions went back")
        self.seen[key] = version

    def verify(self, m: vas.Mapping, floor: int, reported: int, kind: str) -> None:
        """Every byte of ``m`` belongs to a version in [floor, published + 1]; ``reported``
        is the version the agent said ``m`` has, ``kind`` how it is attached."""
        name, segment_id, size = m.name, m.info.id, m.size
        data = np.frombuffer(m.read(0, size), np.uint8)
        ceiling = self.published_version(name, segment_id) + 1
        relative = data - self.base(name, segment_id, size) - np.uint8(floor % 256)
        span = ceiling - floor
        ok = relative <= span if span < 255 else np.ones(size, bool)
        zeros = data == 0
        if floor == 0:
            ok |= zeros  # version 0: the zeros of a fresh segment
        if not ok.all():
            at = int(np.flatnonzero(~ok)[0])
            raise DataError(
                f"{name} (id {segment_id}, {kind}, {m.fetch}): byte {at} "
                f"is {data[at]}, version {(floor + int(relative[at])) % 256} mod 256, outside "
                f"the versions [{floor}, {ceiling}] published around the read")
        self.figures["bytes verified"] += size
        versions = floor + relative.astype(np.int64)
        if floor == 0:
            versions[zeros] = 0
        oldest, newest = int(versions.min()), int(versions.max())
        if oldest != newest:
            self.figures["reads overlapping a write"] += 1
        if oldest < reported:
            # Allowed (only a finished sync() is a promise), but worth a figure: the home
            # adopts a remote writer's version before its bytes land.
            self.figures["reads older than the version reported"] += 1

    @staticmethod
    def kind(m: vas.Mapping, client: vas.Client, fetch: str) -> str:
        """"home lazy", "remote rw", ...: where ``m`` is attached, and how."""
        return f"{'home' if m.info.home == client.local_node.id else 'remote'} {fetch}"

    # ------------------------------------------------------------------ operations

    def run(self, operations: int, deadline: float) -> None:
        for number in range(operations):
            if time.monotonic() > deadline:
                break
            op = self.rng.choices(_OPS, _WEIGHTS)[0] if number >= 6 else "create"
            name = self.rng.choice(sorted(CHURN) if op == "delete" else NAMES)
            client = self.rng.choice(self.clients)
            try:
                getattr(self, op)(client, name)
            except EXPECTED as exc:
                self.expected[f"{op}: {type(exc).__name__}"] += 1
        for m, _ in self.held:
            m.detach()
        self.held.clear()

    def create(self, client: vas.Client, name: str) -> None:
        client.create(name, SIZES[name], mode=0o644)
        self.ops["create"] += 1

    def delete(self, client: vas.Client, name: str) -> None:
        client.delete(name)
        self.ops["delete"] += 1

    def write(self, client: vas.Client, name: str) -> None:
        m = client.attach(name, "rw")
        try:
            segment_id = m.info.id
            floor = self.published_version(name, segment_id)
            version = m.version
            self.saw(m, version, floor, '"rw" attach')
            kind = self.kind(m, client, "rw")
            self.verify(m, floor, version, kind)
            base = self.base(name, segment_id, m.size)
            for _ in range(self.rng.choice((1, 1, 2))):
                m.write(0, base + np.uint8((version + 1) % 256))
                self.figures["bytes written"] += m.size
                ranges = [(0, m.size)] if self.rng.random() < 0.25 else None
                new = m.sync(ranges)
                if new != version + 1:
                    raise DataError(f"sync of {name} (id {segment_id}) returned version {new}, "
                                    f"not {version + 1}: another writer published meanwhile")
                with self.published_lock:
                    key = f"{name}#{segment_id}"
                    self.published[key] = max(self.published.get(key, 0), new)
                self.syncs.append((name, segment_id, new))
                self.saw(m, new, new, "sync")
                version = new
            self.ops[f"write {kind}"] += 1
        finally:
            m.detach()

    def read(self, client: vas.Client, name: str) -> None:
        fetch = self.rng.choice(("lazy", "eager"))
        before = self.published.copy()  # the id is learned from the attach
        m = client.attach(name, "r", fetch=fetch)
        try:
            kind = self.kind(m, client, fetch)
            floor = before.get(f"{name}#{m.info.id}", 0)
            self.saw(m, m.version, floor, "attach")
            self._check(m, floor, m.version, kind)
            self.ops[f"read {kind}"] += 1
        except BaseException:
            m.detach()
            raise
        self.held.append((m, kind))
        if len(self.held) > HELD:
            self.held.pop(0)[0].detach()

    def refresh(self, client: vas.Client, name: str) -> None:
        if not self.held:
            return self.read(client, name)
        index = self.rng.randrange(len(self.held))
        m, kind = self.held[index]
        try:
            floor = self.published_version(m.name, m.info.id)
            version = m.refresh()
            self.saw(m, version, floor, "refresh")
            self._check(m, floor, version, kind)
            if self.rng.random() < 0.15:
                newest = m.wait(version, timeout=0.05)
                self.saw(m, newest, version, "wait")
            self.ops[f"refresh {kind}"] += 1
        except EXPECTED:
            self.held.pop(index)
            m.detach()
            raise
        if self.rng.random() < 0.3:
            self.held.pop(index)
            m.detach()

    def _check(self, m: vas.Mapping, floor: int, reported: int, kind: str) -> None:
        if m.name in CHURN and m.fetch == "lazy":
            try:  # see the module docstring: no demand fault on a deletable name
                m.prefetch()
            except vas.Unavailable as exc:
                if "no longer holds segment" not in str(exc) and "was deleted" not in str(exc):
                    raise
                raise vas.NotFound(f"deleted while read: {exc}") from exc
        self.verify(m, floor, reported, kind)

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _work(index: int, sockets: list[str], published, published_lock, barrier, results,
          seed: int, operations: int, budget: float, stacks: str) -> None:
    """A spawned client process: run the load, put a report in ``results``, exit 1 on
    any error that is not an expected race. SIGUSR1 writes its threads' stacks to
    ``stacks`` (asked for when it does not report in time)."""
    faulthandler.register(signal.SIGUSR1, open(stacks, "w"), all_threads=True)
    report = {"worker": index, "error": None}
    worker = None
    try:
        worker = _Worker(index, sockets, published, published_lock, seed)
        barrier.wait()  # all connected: start together
        worker.run(operations, time.monotonic() + budget)
    except BaseException:
        report["error"] = traceback.format_exc()
    if worker is not None:
        report.update(ops=dict(worker.ops), expected=dict(worker.expected),
                      figures=dict(worker.figures), syncs=worker.syncs)
        try:
            worker.close()
        except BaseException:
            report["error"] = report["error"] or traceback.format_exc()
    results.put(report)
    results.close()
    results.join_thread()
    os._exit(1 if report["error"] else 0)


def _gaps(syncs) -> list[str]:
    """Incarnations whose published versions are not exactly 1, 2, ..., n once each."""
    by_segment = collections.defaultdict(list)
    for name, segment_id, version in syncs:
        by_segment[(name, segment_id)].append(version)
    return [f"{name} (id {segment_id}): {sorted(versions)}"
            for (name, segment_id), versions in by_segment.items()
            if sorted(versions) != list(range(1, len(versions) + 1))]


def _problems(lines: list[str]) -> collections.Counter:
    """Lock-order violations and tracebacks in an agent's log, each told once with its
    count: the message (without time and thread) and the innermost frames of its stack."""
    found = collections.Counter()
    for index, line in enumerate(lines):
        if MARKER in line:
            message = re.sub(r" \(thread [^)]*\)$", "", line[line.index(MARKER):])
        elif line.startswith("Traceback"):
            message = f"{lines[index - 1] if index else ''}".split(" ", 2)[-1]
        else:
            continue
        frames, end = [], index + 1
        while end < len(lines) and lines[end].startswith(" "):
            if lines[end].lstrip().startswith("File "):
                frames.append(lines[end].strip())
            end += 1
        raised = f" -> {lines[end]}" if line.startswith("Traceback") and end < len(lines) else ""
        site = " <- ".join(re.sub(r'^File "(?:.*/)?([^/"]+)", line (\d+), in (\S+)$',
                                  r"\3 (\1:\2)", frame) for frame in reversed(frames[-3:]))
        found[f"{message}{raised} [at {site or '?'}]"] += 1
    return found


def test_concurrent_clients_keep_data_and_lock_order(cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("VAS_LOCK_CHECK", "1")  # agents inherit the environment
    started = time.monotonic()
    # The default writer lease (10 s), not test_publish's 2 s: no client here stops, so a
    # Fenced would be a keepalive failure under load, not a race to count.
    running = cluster(nodes=2, memory=512 * MiB)
    for node in running.nodes:
        with open(f"/proc/{node.pid}/environ", "rb") as environ:
            assert b"VAS_LOCK_CHECK=1" in environ.read().split(b"\0"), f"{node.name} unchecked"
    sockets = [node.socket for node in running.nodes]
    load_started = time.monotonic()
    context = multiprocessing.get_context("spawn")  # no fork of a process with gRPC threads
    with context.Manager() as manager:
        published, published_lock = manager.dict(), context.Lock()
        barrier = context.Barrier(WORKERS, timeout=30)
        results = context.Queue()
        workers = [context.Process(target=_work, name=f"vas-stress-{i}", daemon=True,
                                   args=(i, sockets, published, published_lock, barrier,
                                         results, 1000 + i, OPERATIONS, BUDGET,
                                         str(tmp_path / f"worker-{i}.stacks")))
                   for i in range(WORKERS)]
        stuck: list[str] = []

        def on_stuck(process) -> None:
            path = tmp_path / f"worker-{workers.index(process)}.stacks"
            stuck.append(f"{process.name}:\n{dump_stacks(process, str(path))}")

        reports = run_workers(workers, results, started + DEADLINE, on_stuck)
    load_seconds = time.monotonic() - load_started

    errors = [f"worker {r['worker']}:\n{r['error']}" for r in reports if r["error"]]
    assert not errors, "\n".join(errors)
    exits = [p.exitcode for p in workers]  # -9: killed at the deadline; -N: died of signal N
    assert len(reports) == WORKERS, (f"only workers {sorted(r['worker'] for r in reports)} of "
                                     f"{WORKERS} reported in time; exit codes {exits}; "
                                     "stacks of those still running:\n" + "\n".join(stuck))
    assert exits == [0] * WORKERS
    for report in reports:
        ops = report["ops"]
        assert sum(ops.values()) > 0 and report["syncs"], report
        assert any(op.startswith("read") for op in ops) and \
            any(op.startswith("write") for op in ops), report
    syncs = [s for r in reports for s in r["syncs"]]
    assert not _gaps(syncs), "versions published twice or skipped:\n" + "\n".join(_gaps(syncs))

    # Both agents' logs, complete once they stopped (SIGTERM: a clean exit is 0).
    running.stop()
    assert [node.proc.returncode for node in running.nodes] == [0, 0]
    logged, bad = collections.Counter(), []
    for node in running.nodes:
        with open(node.log_path, errors="replace") as log:
            lines = log.read().splitlines()
        bad += [f"{count:4d} x {node.name}: {problem}"
                for problem, count in _problems(lines).most_common()]
        logged.update(level for line in lines for level in ("ERROR", "WARNING")
                      if f" {level} " in line)
    assert not bad, "the agents' logs have (with counts):\n" + "\n".join(bad)

    total = sum((collections.Counter(r["ops"]) for r in reports), collections.Counter())
    expected = sum((collections.Counter(r["expected"]) for r in reports), collections.Counter())
    figures = sum((collections.Counter(r["figures"]) for r in reports), collections.Counter())
    print(f"\n{sum(total.values())} operations by {WORKERS} client processes in "
          f"{load_seconds:.1f} s (with their start; the whole test "
          f"{time.monotonic() - started:.1f} s); {len(syncs)} versions published; "
          f"{figures['bytes verified'] / MiB:.0f} MiB verified, "
          f"{figures['bytes written'] / MiB:.0f} MiB written")
    print("operations:", dict(sorted(total.items())))
    print("expected races:", dict(sorted(expected.items())))
    print("figures:", {k: v for k, v in sorted(figures.items()) if not k.startswith("bytes")},
          "agents' log lines:", dict(logged))
    for kind in ("read home", "read remote", "write home", "write remote", "refresh remote"):
        assert any(op.startswith(kind) for op in total), f"no {kind!r} operation ran: {total}"
