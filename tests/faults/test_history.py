"""A bounded history-checking run: writers and readers on several nodes while agents are
killed and restarted and writers are paused past their lease.

Segments are homed on node1 (two) and node2 (one), written from node1 and node2 and read
on node3 (a node with no writer, so its readers only ever see published bytes). Every
2 s one fault, in turn: a writer paused past its lease while it holds an attachment of
a segment homed on node1 (writer 0 is its home writer, writer 1 a remote one), after
which it writes a fenced ``STALE`` write; or the readers' agent killed with SIGKILL and
started again. What the words encode, what the processes log and what the checker
asserts are in tests/history.py (shared with the chaos run, tests/chaos/).
"""
from __future__ import annotations

import collections
import os
import time

import pytest

import vas
from history import SEGMENT_BYTES, Crew, check_history

#: Homed on node1 (two) and node2 (one); written from node1 and node2, read on node3.
SEGMENTS = {"hist/a": 0, "hist/b": 0, "hist/c": 1}
WRITER_NODES = (0, 1)
READER_NODE = 2
READERS = 3
WRITER_TTL = 2
#: Seconds of load at least (longer runs: VAS_HISTORY_SECONDS), and between two
#: faults. The run goes on until ROUND faults have come, one of each kind with both
#: writers: writer 0 (a home writer) paused at ~2 s (a pause lasts 5 s), the readers'
#: agent killed at ~9 s, writer 1 (a remote writer) paused at ~11.5 s. The suite ran
#: 18 s with 4.5 s between faults before, for the same three faults.
RUN_SECONDS = float(os.environ.get("VAS_HISTORY_SECONDS", "10"))
ROUND = 3
FAULT_EVERY = 2.0


@pytest.fixture
def world(cluster):
    return cluster(nodes=3, writer_ttl=WRITER_TTL)


def test_history_under_faults_has_no_wrong_byte(world, tmp_path):
    for name, node in SEGMENTS.items():
        with vas.connect(world.nodes[node].socket) as c:
            c.create(name, SEGMENT_BYTES, mode=0o644)
    logdir = os.environ.get("VAS_HISTORY_LOGS") or str(tmp_path)
    reader_socket = world.nodes[READER_NODE].socket
    injected: collections.Counter = collections.Counter()
    with Crew(logdir, SEGMENTS, [world.nodes[i].socket for i in WRITER_NODES],
              [reader_socket] * READERS, seed=7) as crew:
        end = time.monotonic() + RUN_SECONDS
        turn = 0
        while time.monotonic() < end or turn < ROUND:
            crew.stop_event.wait(FAULT_EVERY)
            injected.update(crew.revive())
            if turn % 2 == 0:
                if crew.pause_writer(turn // 2 % len(WRITER_NODES), 2.5 * WRITER_TTL,
                                     probe_socket=reader_socket):
                    injected["writer paused past its lease"] += 1
            else:
                node = world.nodes[READER_NODE]
                node.kill()
                node.start()
                injected["reader's agent killed -9 and restarted"] += 1
            turn += 1
    problems, figures = check_history(logdir)
    print(f"faults injected: {dict(injected)}; history: {dict(figures)}")
    assert injected["reader's agent killed -9 and restarted"] >= 1, dict(injected)
    assert injected["writer paused past its lease"] >= 1, dict(injected)
    assert figures["read"] > 20 and figures["ack"] > 10, dict(figures)
    assert not problems, "\n".join(problems[:20])
