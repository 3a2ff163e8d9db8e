"""Helpers of the fault tests (fixtures are in conftest.py).

Agents killed and restarted, calls that must not hang, what an agent holds::

    restart(node)                    # kill -9 an agent, start it again with the same id
    outcome, seconds = bounded(call, 20)   # the test fails if call() hangs
    usage(node), open_fds(node.pid)  # what an agent holds right now
    agent_threads(pid), agent_cpu_seconds(pid)   # /proc readers

Child processes as another uid, and the agents' small per-uid limits (``LIMITS``):
a ``Child`` is a Python process that imports everything first, then drops to
uid/gid 65534 (SO_PEERCRED records the identity at connect(); the venv may not
be readable by that uid, so nothing may be imported after the drop). It talks
line by line: ``child.line()`` waits (with a deadline) for its next stdout line
(one JSON object), ``child.send(text)`` writes one to its stdin.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import select
import subprocess
import sys
import textwrap
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


#: uid and gid the children run as.
NOBODY = 65534
#: The agents' limits in these tests (small, so a test reaches them quickly).
WORKERS = 4
CONNECTIONS = 8
ATTACHMENTS = 5
FAULTS = 2
LIMITS = ["--local-workers", str(WORKERS), "--max-connections-per-uid", str(CONNECTIONS),
          "--max-attachments-per-uid", str(ATTACHMENTS), "--max-faults-per-uid", str(FAULTS)]
#: Seconds: bound of every wait for a child's line.
DEADLINE = 60.0

# What every child runs first: its imports, the drop, and a raw local-protocol client
# (requests sent and answers read separately, so a child can have several in flight).
PRELUDE = textwrap.dedent(f'''
    import itertools, json, os, select, socket, sys, time
    import vas, vas.client
    import grpc   # vas.core.errors loads it at the first read of a .code: before the drop
    from vas.core import errors, wire
    from vas.proto import LOCAL_PROTOCOL, local_pb2
    os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})   # after every import

    class Raw:
        """One connection speaking local.proto directly."""

        def __init__(self, path):
            self.sock = wire.new_socket()
            self.sock.connect(path)
            self.ids = itertools.count(1)

        def send(self, fds=(), **body):
            request = local_pb2.LocalRequest(id=next(self.ids), **body)
            wire.send_message(self.sock, request, fds)
            return request.id

        def answer(self, request_id):
            """The answer to ``request_id``: raises its vas error; (response, fds)."""
            response, fds = wire.recv_message(self.sock, local_pb2.LocalResponse)
            if response is None:
                raise errors.Unavailable("the agent closed the connection")
            assert response.id == request_id, (response.id, request_id)
            if response.code:
                for fd in fds:
                    os.close(fd)
                raise errors.from_number(response.code, response.message)
            return response, fds

        def call(self, fds=(), **body):
            return self.answer(self.send(fds, **body))

        def hello(self):
            return self.call(hello=local_pb2.HelloRequest(protocol=LOCAL_PROTOCOL))[0].hello

    def say(**what):
        print(json.dumps(what), flush=True)

    def outcome(call):
        """"ok", or the error as "Class: message"."""
        try:
            call()
            return "ok"
        except errors.VasError as exc:
            return f"{{type(exc).__name__}}: {{exc}}"
''')


class Child:
    """A Python child running PRELUDE + code as uid 65534 (see the module docstring)."""

    def __init__(self, code: str, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd="/")

    def line(self, timeout: float = DEADLINE) -> dict:
        """Its next stdout line, parsed as JSON; fails after ``timeout`` seconds or at its exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for a line of the child\n{self._stderr()}"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                text = self.proc.stdout.readline()
                assert text, f"the child exited ({self.proc.wait()})\n{self._stderr()}"
                return json.loads(text)

    def ready(self) -> bool:
        """Whether its next stdout line (or its exit) can be read without waiting."""
        return bool(select.select([self.proc.stdout], [], [], 0)[0])

    def send(self, text: str = "go") -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = DEADLINE) -> None:
        """Wait for the child to exit 0."""
        code = self.proc.wait(timeout)
        assert code == 0, f"the child failed ({code})\n{self._stderr()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.proc.stderr.read()[-3000:]


def agent_threads(pid: int) -> int:
    """The number of threads of process ``pid`` (/proc/PID/status Threads:)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no Threads: line for pid {pid}")


def agent_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (/proc/PID/stat utime + stime)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
