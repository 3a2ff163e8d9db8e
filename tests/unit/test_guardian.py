"""The guardian process (vas/guard.py, vas/guardian.py) without daemons.

A child process plays the client: it maps a sparse memfd the way a lazy attach
does, registers it on a userfaultfd, hands it to its guardian with a socketpair
standing in for the agent connection, and closes its own uffd. Nothing resolves
its faults while that "connection" is up; once its far end is closed the
guardian must poison the next touch (SIGBUS), and a fault already waiting must be
woken and poisoned too.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import pytest

from vas import guard
from vas.core import fetch

from waiting import in_userfault, wait_for

needs_poison = pytest.mark.skipif(not fetch.userfaultfd_available(),
                                  reason="userfaultfd with shmem faults and UFFDIO_POISON "
                                  "(Linux 6.6) unavailable")

CLIENT = r"""
import mmap, os, socket, subprocess, sys, time
import numpy as np
from vas import _native, guard
from vas.core.fetch import lazy_features

PS = _native.PAGE_SIZE
fd = _native.memfd_create("lazy")
_native.ftruncate(fd, 16 * PS)
os.pwrite(fd, b"\x07" * PS, 0)
ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
m = mmap.mmap(ro, 16 * PS, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
view = memoryview(m)
base = int(np.frombuffer(view, dtype=np.uint8, count=1).ctypes.data)
uffd = _native.userfaultfd()
_native.uffd_api(uffd, lazy_features())
_native.uffd_register(uffd, base, 16 * PS, _native.UFFDIO_REGISTER_MODE_MISSING
                      | _native.UFFDIO_REGISTER_MODE_MINOR)
_native.uffd_continue(uffd, base, PS)  # page 0 mapped, as after a resolved fault
# The "agent": a process holding the far end of our connection, and never reading it.
conn, far_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         pass_fds=[far_end.fileno()])
far_end.close()
g = guard.current()
key = g.watch(conn)
assert g.add(key, 1, base, 16 * PS, uffd, fallback=lambda: None)
os.close(uffd)  # the guardian holds the registration now; nobody resolves its faults
while g.process is None:
    time.sleep(0.001)
print("ready", g.process.pid, agent.pid, view[0], flush=True)
how = sys.stdin.readline().strip()
if how == "touch":  # the test kills the agent before or while we wait in the fault
    print("page 0", view[0], flush=True)  # mapped before: its bytes
    print("touch", view[5 * PS], flush=True)
elif how == "drop":
    g.drop(key, 1)
    print("dropped", flush=True)
    sys.stdin.readline()
agent.kill()
"""


def _client():
    return subprocess.Popen([sys.executable, "-c", CLIENT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(client) -> tuple[int, int]:
    """(guardian pid, fake agent pid) once the client is set up."""
    words = client.stdout.readline().split()
    assert words[:1] == ["ready"] and words[3] == "7", (words, client.stderr.read())
    return int(words[1]), int(words[2])


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"
    except OSError:
        return True


def _finish(client) -> None:
    """Kill and reap the client; its pipes are closed, not read to EOF (its guardian or
    agent may still hold their write ends)."""
    if client.poll() is None:
        client.kill()
    client.wait(30)
    for stream in (client.stdin, client.stdout, client.stderr):
        with contextlib.suppress(OSError):
            stream.close()


@needs_poison
@pytest.mark.parametrize("agent_dies", ["before the touch", "during the touch"])
def test_the_guardian_poisons_once_the_agent_connection_is_gone(agent_dies):
    client = _client()
    try:
        guardian, agent = _ready(client)
        if agent_dies == "before the touch":
            os.kill(agent, signal.SIGKILL)
        client.stdin.write("touch\n")
        client.stdin.flush()
        if agent_dies == "during the touch":  # a fault nobody read: woken, then poisoned
            wait_for(lambda: in_userfault(client.pid), "the client to wait in its fault", 30)
            os.kill(agent, signal.SIGKILL)
        out, err = client.communicate(timeout=60)
        assert client.returncode == -signal.SIGBUS, (out, err)
        assert "page 0 7" in out and "touch" not in out
        assert "lazy mapping(s) not fetched yet raise SIGBUS" in err
        wait_for(lambda: _gone(guardian), "the guardian to end with its client", 30)
    finally:
        _finish(client)
        if not _gone(agent):
            os.kill(agent, signal.SIGKILL)


@needs_poison
def test_the_guardian_closes_a_dropped_uffd_and_ends_with_its_client():
    client = _client()
    try:
        guardian, agent = _ready(client)

        def uffds() -> int:
            count = 0
            for fd in os.listdir(f"/proc/{guardian}/fd"):
                with contextlib.suppress(FileNotFoundError):  # closed since the listing
                    count += os.readlink(f"/proc/{guardian}/fd/{fd}") == "anon_inode:[userfaultfd]"
            return count

        wait_for(lambda: uffds() == 1, "the guardian to hold the uffd", 30)
        client.stdin.write("drop\n")
        client.stdin.flush()
        assert client.stdout.readline() == "dropped\n"
        wait_for(lambda: uffds() == 0, "the guardian to close the dropped uffd", 30)
        client.stdin.write("exit\n")
        client.stdin.flush()
        client.communicate(timeout=60)
        assert client.returncode == 0
        wait_for(lambda: _gone(guardian), "the guardian to end with its client", 30)
    finally:
        _finish(client)


def test_without_a_guardian_mappings_are_fetched_whole(monkeypatch, caplog):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    guardian = guard.Guardian()
    fetched = threading.Event()
    r, w = os.pipe()
    try:
        key = guardian.watch(_FdOnly(r))
        added = key is not None and guardian.add(key, 1, 0, 4096, w, fallback=fetched.set)
        # Added while the spawn was in flight: its fallback runs when the spawn fails;
        # else refused at once (the caller fetches it whole itself).
        assert fetched.wait(30) if added else not added
        wait_for(lambda: guardian._state is guard._Start.FAILED, "the spawn to fail", 30)
        assert not guardian.add(key or 0, 2, 0, 4096, w, fallback=lambda: None)
        wait_for(lambda: "cannot start the vas guardian process" in caplog.text,
                 "the spawn's failure logged", 30)
        assert "does not take messages" not in caplog.text
    finally:
        os.close(r)
        os.close(w)
        guardian._sock.close()


class _FdOnly:
    """Stands in for a socket: ``watch`` only asks its ``fileno()``."""

    def __init__(self, fd: int):
        self._fd = fd

    def fileno(self) -> int:
        return self._fd
