"""The client's side of its guardian process (vas/guardian.py: why it exists, what it
does, its protocol).

One ``Guardian`` per client process, made by ``current()`` at the first lazy
mapping that registers its faults (``Connection.guard_faults``, called by
vas/mapping.py). It makes the control socketpair at once and starts the
process from a short thread, so the first lazy attach does not wait for the
spawn (``subprocess.Popen``, a vfork+exec that closes every other fd: ~0.5 ms
idle, tens of ms on a loaded VM) nor for the guardian's Python to start (the
datagrams and the fds they carry wait in the socket until it reads them; an
in-flight fd keeps its file open). Every later lazy attach costs one
non-blocking ``sendmsg`` here (its uffd), and the unmap another (DROP).

If the process cannot be started, each mapping registered meanwhile is
fetched whole (its ``fallback``), and later lazy attaches are told so
(``add`` returns False) and fetch eagerly too: without a guardian, an agent's
death would leave their unfetched pages reading zeros. A guardian is made
anew in a forked child (the parent's socket is closed there).
"""
from __future__ import annotations

import enum
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

from vas import guardian as program

log = logging.getLogger(__name__)

#: Send buffer of the control socket: room for thousands of messages queued while
#: the guardian starts.
_SEND_BUFFER = 1 << 20


class _Start(enum.Enum):
    STARTING = "starting"  # the socketpair exists; the process is being spawned
    RUNNING = "running"
    FAILED = "failed"      # no guardian: lazy mappings are fetched whole


class Guardian:
    """The guardian process of this client process and the socket to it.

    Thread-safe: messages are single datagrams sent without blocking. Methods:
    ``watch`` (a connection's agent socket), ``add`` (a lazy mapping's uffd),
    ``drop`` (it was unmapped).
    """

    def __init__(self):
        self.pid = os.getpid()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        ours.setblocking(False)  # a send never waits (finalizers send too)
        self._sock = ours
        self._lock = threading.Lock()  # _state and _fallbacks
        self._state = _Start.STARTING
        self._fallbacks: list[Callable[[], None]] = []
        self._keys = iter(range(1, 1 << 32))
        self.process: subprocess.Popen | None = None
        threading.Thread(target=self._spawn, args=(theirs,), name="vas-guard-start",
                         daemon=True).start()

    def _spawn(self, theirs: socket.socket) -> None:
        """Start the process (in the "vas-guard-start" thread); on failure run the
        fallbacks of the mappings added meanwhile."""
        error = None
        try:
            try:
                self.process = _start_process(theirs)
            except (OSError, subprocess.SubprocessError) as exc:
                error = exc
            with self._lock:
                self._state = _Start.FAILED if error else _Start.RUNNING
                fallbacks, self._fallbacks = self._fallbacks, []
        finally:
            # Only now: a message sent to a guardian that never started fails on the
            # closed socket, and (the state FAILED already) is not reported as a
            # guardian that stopped taking messages.
            theirs.close()
        if error is None:
            return
        log.error("cannot start the vas guardian process (%s): lazy mappings of this "
                  "process are fetched whole instead", error)
        for fallback in fallbacks:
            try:
                fallback()
            except Exception as exc:  # noqa: BLE001  (one mapping's failure is its own)
                log.warning("fetching a lazy mapping whole failed: %s", exc)

    def watch(self, sock: socket.socket) -> int | None:
        """Have the guardian watch ``sock`` (a connection to the agent); the key of
        that connection, or None if the guardian is gone."""
        key = next(self._keys)
        return key if self._send(program.WATCH, key, fd=sock.fileno()) else None

    def add(self, key: int, attachment_id: int, address: int, size: int, uffd: int,
            fallback: Callable[[], None]) -> bool:
        """Hand the guardian a dup of ``uffd`` (the lazy mapping [address, +size) of
        attachment ``attachment_id`` of connection ``key``). False if there is no
        guardian to take it; ``fallback`` (fetch the mapping whole) runs later if the
        guardian turns out not to start."""
        with self._lock:
            if self._state is _Start.FAILED:
                return False
            if not self._send(program.ADD, key, attachment_id, address, size, uffd):
                return False
            if self._state is _Start.STARTING:
                self._fallbacks.append(fallback)
        return True

    def drop(self, key: int, attachment_id: int) -> None:
        """The mapping of ``attachment_id`` is unmapped: the guardian closes its uffd.
        Safe in a finalizer (one non-blocking send, no lock)."""
        self._send(program.DROP, key, attachment_id)

    def closing(self, key: int) -> None:
        """The client closes connection ``key`` itself: the guardian still poisons its
        mappings' missing pages at the hang-up, without reporting the agent gone."""
        self._send(program.CLOSING, key)

    def _send(self, kind: int, key: int, attachment_id: int = 0, address: int = 0,
              size: int = 0, fd: int = -1) -> bool:
        data = program.MESSAGE.pack(kind, key, attachment_id, address, size)
        try:
            if fd >= 0:
                socket.send_fds(self._sock, [data], [fd])
            else:
                self._sock.send(data)
            return True
        except OSError as exc:  # EPIPE: the guardian died; EAGAIN: it is stuck
            if self._state is not _Start.FAILED:
                log.error("the vas guardian process does not take messages (%s): lazy "
                          "mappings are fetched whole from now on", exc)
            self._state = _Start.FAILED
            return False

    def _forget_in_child(self) -> None:
        """After a fork, in the child: the parent's guardian is not ours."""
        try:
            self._sock.close()
        except OSError:
            pass


_guardian: Guardian | None = None
_guardian_lock = threading.Lock()


def current() -> Guardian:
    """This process's Guardian, started on first use (anew in a forked child)."""
    global _guardian
    with _guardian_lock:
        if _guardian is None or _guardian.pid != os.getpid():
            _guardian = Guardian()
        return _guardian


def _after_fork_in_child() -> None:
    global _guardian, _guardian_lock
    _guardian_lock = threading.Lock()  # another thread may have held it at the fork
    if _guardian is not None:
        _guardian._forget_in_child()
        _guardian = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _start_process(theirs: socket.socket) -> subprocess.Popen:
    """The guardian process (vas/guardian.py), handed ``theirs`` (its end of the socket)."""
    from vas import _native

    if not sys.executable:
        raise OSError("sys.executable is unknown")
    return subprocess.Popen(
        [sys.executable, "-I", "-S", program.__file__, _native.__file__, str(theirs.fileno())],
        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        start_new_session=True)
