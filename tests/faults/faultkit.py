"""Helpers of the fault tests (fixtures are in conftest.py).

    restart(node)                    # kill -9 an agent, start it again with the same id
    outcome, seconds = bounded(call, 20)   # the test fails if call() hangs
    usage(node), open_fds(node.pid)  # what an agent holds right now
"""
from __future__ import annotations

import concurrent.futures
import os
import time

import pytest

import vas
from vas.cluster import NodeProcess

#: Capacity of each agent of the ``pair`` fixture.
PAIR_MEMORY = 256 << 20


def restart(node: NodeProcess, timeout: float = 60.0) -> float:
    """Kill ``node`` with SIGKILL (no clean-up runs) and start it again with the same id,
    socket and coordinator; the seconds from the kill until it serves again."""
    started = time.monotonic()
    node.kill()
    node.start(timeout)
    return time.monotonic() - started


def bounded(call, timeout: float):
    """(result or exception raised, seconds) of ``call()`` run in a helper thread; the
    test fails if it takes longer than ``timeout`` (a hang), leaving the thread behind
    (a daemon pool thread: the agents are stopped at teardown, which ends it)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    started = time.monotonic()
    future = pool.submit(call)
    try:
        try:
            outcome = future.result(timeout)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"{call!r} did not return within {timeout} s (a hang)")
        except Exception as exc:  # noqa: BLE001  the caller inspects it
            outcome = exc
        return outcome, time.monotonic() - started
    finally:
        pool.shutdown(wait=False)


def usage(node: NodeProcess) -> tuple[int, int]:
    """(memory_used, segments held) as ``node``'s agent counts them right now (Hello)."""
    with vas.connect(node.socket) as client:
        return client.local_node.memory_used, client.local_node.segments


def open_fds(pid: int) -> int:
    """How many fds process ``pid`` has open (/proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))
