"""Histories of writers and readers under faults, and the one checker of them (used by
tests/faults/test_history.py and by the chaos run, tests/chaos/).

Every 4-byte word a writer stores says which version it belongs to and which write made
it: ``mask ^ (version << 12 | tag)``, with a per-segment random ``mask`` (so zeros and
stray bytes never decode as a plausible write) and a ``tag`` unique to each write among
the writes of one version (writer ``i`` cycles through tags ``1 + i * TAG_SPAN ...``).
Writers log each write before it starts ("begin") and after ``sync()`` returned ("ack");
a writer paused past its lease writes with the reserved ``STALE`` tag into the
attachment it held before the pause, then syncs (a fenced write). Readers attach "r"
lazily or eagerly, refresh, read the whole segment and log every (version, tag) pair
they saw. Logs are JSON lines, one file per process, written before each step completes,
so a process killed mid-way leaves what it did. After a run, ``read_final`` reads every
segment once more on every node given ("final" records).

``check_history`` asserts over the whole history:

- no reader ever saw a zero word of a segment whose published version was above 0 when
  it attached (no silent zeros) nor a word that decodes to no write (no garbage);
- no reader ever saw a ``STALE`` word (no fenced write is visible);
- every word seen belongs to a write that began (it was written by someone) while its
  writer held the lock, or is a byte-wise mix of two such writes of adjacent versions (a
  page fetched while a remote writer's publish landed in the home's pages: there are no
  snapshots; counted as "torn words"); each version was acknowledged to one write only;
- versions a reader process saw of one segment never went back, and acknowledged
  versions grew by one per sync, except over a version whose sync failed with an
  ambiguous error (``AMBIGUOUS``: its publish may have happened while the answer was
  lost, e.g. a coordinator killed mid-call; counted, not a violation);
- a final read holds exactly the bytes of the last acknowledged version of the segment:
  every word is that version's with that write's tag (so nothing acknowledged was lost
  or changed, and no newer unacknowledged write is visible at rest) -- or, at that
  version, every word of the next write begun and never acknowledged: a home writer's
  stores are in the home's pages as it makes them, also when its sync then fails.

Readers and writers may fail with vas errors (Unavailable while their agent restarts,
Fenced, Busy) or die of SIGBUS (a lazy page that can no longer be fetched; a home
writer's store after its lock was revoked): failures, never wrong bytes; ``Crew``
restarts them.

    crew = Crew(logdir, {"h/a": 0}, writer_sockets=[s1], reader_sockets=[s3], seed=7)
    with crew:                      # started; stopped (SIGCONT, join, SIGKILL) on exit
        crew.revive()               # start again those that died: Counter of exit codes
        crew.pause_writer(0, 5.0, probe_socket=s3)
    read_final(logdir, {"h/a": 0}, [s1, s3], timeout=30)
    problems, figures = check_history(logdir)
"""
from __future__ import annotations

import collections
import faulthandler
import itertools
import json
import multiprocessing
import os
import random
import signal
import time
import zlib

import numpy as np

import vas

SEGMENT_BYTES = 4 << 20
STALE = 0xFFF
#: Tags of writer ``i`` are ``1 + i * TAG_SPAN ...`` (three writers fit below STALE).
TAG_SPAN = 1300
#: Errors of a sync whose publish may still have happened (the answer was lost): the
#: version it would have had may be taken, so the next sync can skip it. (vas maps
#: DEADLINE_EXCEEDED to Unavailable too.)
AMBIGUOUS = ("Unavailable",)
#: Seconds a writer waits, paused by the harness's hold, before writing anyway.
_HOLD_LIMIT = 30.0
#: Bytes of one read call (piece by piece, so that a read is often under way when a
#: fault hits).
_READ_STEP = 256 << 10


def mask(name: str) -> np.ndarray:
    """Random words with the top bit set: a written word (version < 2**19) is never 0."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.integers(1 << 31, 1 << 32, SEGMENT_BYTES // 4, dtype=np.uint32)


def words(version: int, tag: int, segment_mask: np.ndarray) -> np.ndarray:
    return segment_mask ^ np.uint32(((version & 0xFFFFF) << 12) | tag)


class Log:
    """JSON lines, flushed at once (the process may be killed at any moment)."""

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)

    def __call__(self, **record) -> None:
        record["t"] = time.monotonic()
        self._file.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------- processes

_STACKS = []  # the files faulthandler writes to: kept open for the process's life


def _stacks_on_request(logdir: str, name: str) -> None:
    """SIGUSR1 (Crew.stop asks a stuck process where it is) writes every thread's stack
    to ``NAME-PID.stacks`` beside the logs: a multiprocessing child's stderr may be
    nobody's, and a run kept with ``--keep`` then says where a stuck process waited."""
    _STACKS.append(open(os.path.join(logdir, f"{name}-{os.getpid()}.stacks"), "w"))
    faulthandler.register(signal.SIGUSR1, file=_STACKS[-1])

def writer(index: int, socket: str, logdir: str, segments: dict, stop, paused_at, hold,
           holding, seed: int) -> None:
    """Attach a random segment "rw", write and sync it three times, detach; until
    ``stop``. ``segments`` maps names to their home's index: while ``hold`` is set, the
    writer waits (``holding`` set) inside an attachment of a segment homed on node 0,
    for the harness to pause it there."""
    _stacks_on_request(logdir, f"writer{index}")
    log = Log(os.path.join(logdir, f"writer{index}-{os.getpid()}.jsonl"))
    rng = random.Random(seed)
    tags = itertools.cycle(range(1 + index * TAG_SPAN, (index + 1) * TAG_SPAN))
    masks = {name: mask(name) for name in segments}
    client = None
    while not stop.is_set():
        try:
            client = client if client is not None and not client.closed else vas.connect(socket)
            name = rng.choice(sorted(segments))
            m = client.attach(name, "rw", fetch="eager")
        except vas.VasError as exc:
            log(kind="attach-failed", error=type(exc).__name__)
            stop.wait(0.05)
            continue
        attached = time.monotonic()
        try:
            version = m.version
            for _ in range(3):
                if hold.value and segments[name] == 0:
                    holding.set()
                    deadline = time.monotonic() + _HOLD_LIMIT
                    while hold.value and time.monotonic() < deadline:
                        time.sleep(0.01)
                stale = 0 < paused_at.value and attached < paused_at.value
                tag = STALE if stale else next(tags)
                log(kind="begin", name=name, id=m.info.id, version=version + 1, tag=tag)
                np.frombuffer(m.buffer, np.uint32)[:] = words(version + 1, tag, masks[name])
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


def read_once(client, name: str, fetch: str, segment_mask: np.ndarray, log,
              kind: str = "read") -> None:
    """Attach, refresh, read every word of ``name`` and log the (version, tag) pairs."""
    with client.attach(name, "r", fetch=fetch) as m:
        attached_version = m.version
        version = m.refresh()
        seen = np.concatenate([np.frombuffer(m.read(at, _READ_STEP), np.uint32)
                               for at in range(0, m.size, _READ_STEP)])
        zeros = int(np.count_nonzero(seen == 0))
        decoded = seen[seen != 0] ^ segment_mask[seen != 0]
        pairs = collections.Counter(decoded.tolist())
        log(kind=kind, name=name, id=m.info.id, fetch=fetch,
            attached_version=attached_version, version=version, zeros=zeros,
            pairs={f"{p >> 12}:{p & 0xFFF}": n for p, n in pairs.items()}, words=len(seen))


def reader(index: int, socket: str, logdir: str, segments: dict, stop, seed: int) -> None:
    _stacks_on_request(logdir, f"reader{index}")
    log = Log(os.path.join(logdir, f"reader{index}-{os.getpid()}.jsonl"))
    rng = random.Random(seed)
    masks = {name: mask(name) for name in segments}
    client = None
    while not stop.is_set():
        name, fetch = rng.choice(sorted(segments)), rng.choice(("lazy", "eager"))
        try:
            client = client if client is not None and not client.closed else vas.connect(socket)
            read_once(client, name, fetch, masks[name], log)
        except vas.VasError as exc:
            log(kind="read-failed", name=name, error=type(exc).__name__)
            stop.wait(0.05)


class Crew:
    """The writer and reader processes of a run (spawned; writer ``i`` on
    ``writer_sockets[i]``, reader ``i`` on ``reader_sockets[i]``), restarted when they
    die, all stopped on exit (SIGCONT first: one may be paused)."""

    def __init__(self, logdir: str, segments: dict, writer_sockets: list[str],
                 reader_sockets: list[str], seed: int):
        self._ctx = multiprocessing.get_context("spawn")
        self.stop_event = self._ctx.Event()
        self._logdir, self._segments = logdir, segments
        self._writer_sockets, self._reader_sockets = writer_sockets, reader_sockets
        self._rng = random.Random(seed)
        self._pauses = [self._ctx.Value("d", 0.0) for _ in writer_sockets]
        self._holds = [self._ctx.Value("i", 0) for _ in writer_sockets]
        self._holdings = [self._ctx.Event() for _ in writer_sockets]
        self.writers: list = []
        self.readers: list = []
        #: Processes that did not stop when asked (killed at the deadline of ``stop``).
        self.stuck: list[str] = []
        self._probe_log = Log(os.path.join(logdir, "reader-probe.jsonl"))

    def _start_writer(self, i: int):
        proc = self._ctx.Process(name=f"writer{i}", target=writer, args=(
            i, self._writer_sockets[i], self._logdir, self._segments, self.stop_event,
            self._pauses[i], self._holds[i], self._holdings[i], self._rng.random()))
        proc.start()
        return proc

    def _start_reader(self, i: int):
        proc = self._ctx.Process(name=f"reader{i}", target=reader, args=(
            i, self._reader_sockets[i], self._logdir, self._segments, self.stop_event,
            self._rng.random()))
        proc.start()
        return proc

    def __enter__(self) -> "Crew":
        self.writers = [self._start_writer(i) for i in range(len(self._writer_sockets))]
        self.readers = [self._start_reader(i) for i in range(len(self._reader_sockets))]
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def revive(self) -> collections.Counter:
        """Start again every writer and reader that exited (SIGBUS or a crash); the
        exits by kind ("reader exit -7", ...)."""
        exits: collections.Counter = collections.Counter()
        for i, proc in enumerate(self.readers):
            if not proc.is_alive():
                exits[f"reader exit {proc.exitcode}"] += 1
                self.readers[i] = self._start_reader(i)
        for i, proc in enumerate(self.writers):  # a revoked home writer's store: SIGBUS
            if not proc.is_alive():
                exits[f"writer exit {proc.exitcode}"] += 1
                self._pauses[i].value = 0.0
                self.writers[i] = self._start_writer(i)
        return exits

    def pause_writer(self, i: int, seconds: float, probe_socket: str) -> bool:
        """SIGSTOP writer ``i`` for ``seconds`` while it holds an attachment of a segment
        homed on node 0 (past its lease: the caller picks ``seconds``), SIGCONT, and when
        it has made its stale write, read those segments on ``probe_socket``: a fenced
        write must not be there. False if it did not get to hold one within 10 s."""
        self._holds[i].value = 1
        try:
            if not self._holdings[i].wait(10):
                return False
            self._pauses[i].value = time.monotonic()
            os.kill(self.writers[i].pid, signal.SIGSTOP)
            self.stop_event.wait(seconds)
            os.kill(self.writers[i].pid, signal.SIGCONT)
        finally:
            self._holds[i].value = 0
            self._holdings[i].clear()
        self._probe(i, probe_socket)
        return True

    def _probe(self, i: int, socket: str) -> None:
        deadline = time.monotonic() + 10
        while self._pauses[i].value and self.writers[i].is_alive() \
                and time.monotonic() < deadline:
            time.sleep(0.01)  # a home writer's stale store ends it with SIGBUS instead
        try:
            with vas.connect(socket) as client:
                for name in (n for n, home in self._segments.items() if home == 0):
                    try:
                        read_once(client, name, "eager", mask(name), self._probe_log)
                    except vas.VasError as exc:
                        self._probe_log(kind="read-failed", name=name,
                                        error=type(exc).__name__)
        except vas.VasError as exc:  # the probe's agent may be down right now (chaos)
            self._probe_log(kind="read-failed", name="", error=type(exc).__name__)

    def stop(self, timeout: float = 20.0, on_stuck=None) -> None:
        """Stop every process: ask, SIGCONT (one may be paused), join, SIGKILL at the
        end; ``on_stuck(name)`` is called before a process still running then is killed."""
        self.stop_event.set()
        for proc in self.writers + self.readers:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + timeout
        for proc in self.writers + self.readers:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                self.stuck.append(proc.name)
                os.kill(proc.pid, signal.SIGUSR1)  # its threads' stacks, to its .stacks file
                if on_stuck is not None:
                    on_stuck(proc.name)
                proc.join(1)
                proc.kill()
                proc.join(5)


def read_final(logdir: str, segments: dict, sockets: list[str], timeout: float) -> None:
    """Read every segment eagerly on every agent of ``sockets`` once more ("final"
    records); a copy that cannot be read within ``timeout`` seconds is logged as
    "final-failed" (``check_history`` then needs another copy of that segment)."""
    log = Log(os.path.join(logdir, "final.jsonl"))
    deadline = time.monotonic() + timeout
    for socket in sockets:
        for name in sorted(segments):
            error = ""
            while time.monotonic() < deadline:
                try:
                    with vas.connect(socket) as client:
                        read_once(client, name, "eager", mask(name), log, kind="final")
                    break
                except vas.VasError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    time.sleep(0.2)
            else:
                log(kind="final-failed", name=name, socket=socket, error=error)


# ---------------------------------------------------------------------- the checker

def _records(logdir: str):
    for entry in sorted(os.listdir(logdir)):
        if not entry.endswith(".jsonl"):  # stacks of a stuck process: not records
            continue
        with open(os.path.join(logdir, entry)) as lines:
            for line in lines:
                if line.endswith("\n"):  # a line cut by a kill is not a record
                    yield entry, json.loads(line)


class _Checker:
    """One pass over a history (writes first); ``problems`` and ``figures`` at the end."""

    def __init__(self):
        self.problems: list[str] = []
        self.figures: collections.Counter = collections.Counter()
        self.begun: set[tuple[int, int, int]] = set()
        self.tags: dict[tuple[int, int], set[int]] = collections.defaultdict(set)  # (id, v)
        self.acked: dict[tuple[int, int], int] = {}
        self.last_acked: dict[int, int] = {}
        self.last_version: dict[tuple[str, int], int] = {}
        self.seen_versions: set[tuple[int, int]] = set()
        self.final_names: dict[str, int] = collections.Counter()
        self.ambiguous: set[tuple[int, int]] = set()
        self.gaps: list[tuple[str, dict]] = []

    def explain_gaps(self) -> None:
        """A sync that returned more than its base + 1 is explained only when every
        version skipped was the one of a sync that failed with an ambiguous error."""
        for source, record in self.gaps:
            skipped = range(record["base"] + 1, record["version"])
            if record["version"] > record["base"] and all(
                    (record["id"], v) in self.ambiguous for v in skipped):
                self.figures["versions skipped after an ambiguous sync"] += len(skipped)
            else:
                self.problems.append(f"{source}: sync of {record['name']} returned version "
                                     f"{record['version']} on top of {record['base']}")

    def begin(self, source: str, record: dict) -> None:
        self.begun.add((record["id"], record["version"], record["tag"]))
        self.tags[(record["id"], record["version"])].add(record["tag"])
        self.figures["stale writes"] += record["tag"] == STALE

    def sync_failed(self, source: str, record: dict) -> None:
        if record["error"] in AMBIGUOUS:
            self.ambiguous.add((record["id"], record["version"]))

    def ack(self, source: str, record: dict) -> None:
        key = (record["id"], record["version"])
        if record["version"] != record["base"] + 1:
            self.gaps.append((source, record))
        if key in self.acked and self.acked[key] != record["tag"]:
            self.problems.append(f"version {key[1]} of {record['name']} (id {key[0]}) "
                                 f"acknowledged to two writes")
        self.acked[key] = record["tag"]
        self.last_acked[key[0]] = max(self.last_acked.get(key[0], 0), key[1])
        if record["tag"] == STALE:
            self.problems.append(f"{source}: a fenced write of {record['name']} was "
                                 f"acknowledged as version {record['version']}")

    def read(self, source: str, record: dict) -> None:
        self.figures["words verified"] += record["words"]
        self.seen_versions.add((record["id"], record["version"]))
        segment = (source, record["id"])
        if record["version"] < self.last_version.get(segment, 0):
            self.problems.append(f"{source}: {record['name']} went back from version "
                                 f"{self.last_version[segment]} to {record['version']}")
        self.last_version[segment] = record["version"]
        if record["zeros"] and record["attached_version"] > 0:
            self.problems.append(f"{source}: {record['zeros']} zero words in {record['name']} "
                                 f"({record['fetch']}) at version {record['version']}")
        for pair, count in record["pairs"].items():
            version, tag = map(int, pair.split(":"))
            if tag == STALE:
                self.problems.append(f"{source}: {count} words of a fenced write visible in "
                                     f"{record['name']}")
            elif (record["id"], version, tag) in self.begun:
                continue
            elif self._torn(record["id"], version, tag):
                self.figures["torn words (a fetch racing a publish)"] += count
            else:
                self.problems.append(f"{source}: {count} words of {record['name']} decode to "
                                     f"version {version} tag {tag}, which nobody wrote")

    def _torn(self, segment_id: int, version: int, tag: int) -> bool:
        """Whether (version, tag) is a byte-wise mix of two writes begun at the same or
        adjacent versions: a page read while a publish landed in the home's pages (no
        snapshots: semantics "What is not promised"), never bytes nobody wrote."""
        word = _plain(version, tag)
        writes = [_plain(v, t) for v in range(version - 2, version + 3)
                  for t in self.tags.get((segment_id, v), ())]
        return any(all(byte in (_byte(first, i), _byte(second, i)) for i, byte in
                       enumerate(_byte(word, i) for i in range(4)))
                   for first in writes for second in writes
                   if first != second and abs((first >> 12) - (second >> 12)) <= 1)

    def _unsynced_home_write(self, record: dict, last: int) -> bool:
        """Whether a final copy at version ``last`` holds, in every word, a write begun
        as version ``last`` + 1 and never acknowledged: a home writer's stores land in
        the home's pages as it makes them, and stay there when its sync fails (the
        version does not move; semantics "What is not promised")."""
        if record["version"] != last or len(record["pairs"]) != 1:
            return False
        version, tag = map(int, next(iter(record["pairs"])).split(":"))
        return (version == last + 1 and (record["id"], version, tag) in self.begun
                and (record["id"], version) not in self.acked)

    def final(self, source: str, record: dict) -> None:
        """A read after the run: all of it, and exactly the last acknowledged version."""
        self.read(source, record)
        self.final_names[record["name"]] += 1
        last = self.last_acked.get(record["id"], 0)
        if last == 0:
            self.figures["final copies never written"] += 1
            return
        expected = f"{last}:{self.acked[(record['id'], last)]}"
        if self._unsynced_home_write(record, last):
            self.figures["final copies holding a home writer's unsynced write"] += 1
        elif record["version"] != last or record["pairs"] != {expected: record["words"]}:
            other = {p: n for p, n in record["pairs"].items() if p != expected}
            self.problems.append(
                f"final read of {record['name']} (id {record['id']}) at version "
                f"{record['version']}: expected every word to be version:tag {expected} (the "
                f"last acknowledged write), {sum(other.values())} words are not: "
                f"{dict(list(other.items())[:5])}")
        else:
            self.figures["final bytes verified"] += 4 * record["words"]


def _plain(version: int, tag: int) -> int:
    """The word of (version, tag) before the segment's mask (``words``)."""
    return ((version & 0xFFFFF) << 12) | tag


def _byte(word: int, index: int) -> int:
    return (word >> (8 * index)) & 0xFF


def check_history(logdir: str) -> tuple[list[str], collections.Counter]:
    """The violations of the module docstring's promises, and the figures. A segment that
    had a "final-failed" copy must have a "final" record on another copy."""
    checker = _Checker()
    steps = {"begin": checker.begin, "ack": checker.ack, "sync-failed": checker.sync_failed,
             "read": checker.read, "final": checker.final}
    failed_final = set()
    # Writes first (a read may come from a file listed before its writer's); final reads last.
    order = {"read": 1, "final": 2}
    for source, record in sorted(_records(logdir), key=lambda e: order.get(e[1]["kind"], 0)):
        checker.figures[record["kind"]] += 1
        if record["kind"] == "final-failed":
            failed_final.add(record["name"])
        step = steps.get(record["kind"])
        if step:
            step(source, record)
    checker.explain_gaps()
    for name in sorted(failed_final - set(checker.final_names)):
        checker.problems.append(f"{name}: no copy could be read after the run")
    checker.figures["bytes verified"] = 4 * checker.figures["words verified"]
    checker.figures["versions acknowledged"] = len(checker.acked)
    checker.figures["versions seen by readers"] = len(checker.seen_versions)
    return checker.problems, checker.figures
