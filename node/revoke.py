"""Revoking a home writer's stores: userfaultfd write-protect of its mapping.

Why it exists: a writer on the segment's home node maps the home memfd itself,
shared and writable, so local readers see its stores at once (zero-copy). The
fencing token cannot keep that writer's late stores out of the home pages:
they need no publish. So a home "rw" attach is *revocable*
(``AttachResponse.revocable``): before the client hands the mapping to its
caller, it registers it on a userfaultfd in write-protect mode (made with
UFFD_USER_MODE_ONLY, features UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
UFFD_FEATURE_SIGBUS) and passes that fd to the agent (RegisterFaults, purpose
WRITE_PROTECT), which keeps it in the attachment's ``Guard``. Whenever the
agent lets the writer lock go without the writer's Detach -- the lease would
lapse before it could be renewed (client silent, coordinator unreachable), a
renewal or a publish found it lapsed, a force delete, the socket's EOF -- it
first write-protects the whole mapping (``Guard.revoke``: UFFDIO_WRITEPROTECT
acts on the address space of the process that made the fd, whoever calls it),
and only then marks the lease fenced and lets the lock go. Every later store
of that process into the mapping faults, and with the SIGBUS feature the
kernel answers the fault with SIGBUS at once (a syscall that would store there
fails with EFAULT): nothing has to resolve it, the stale writer ends with a
clear failure instead of hanging, and its store never reaches the pages.
Loads keep working. Stores made while the lease held were visible to local
readers at once, as before.

What the kernel does (measured on 6.18; docs/ARCHITECTURE.md "Revoking a home
writer"): pages never touched are protected too (a shmem mapping keeps a PTE
marker in their place; UFFD_FEATURE_WP_UNPOPULATED is for anonymous memory
only); the protection survives the writer's MADV_DONTNEED and mprotect;
closing the fd lifts it (a store blocked on it then lands); and the kernel
does not check that the registration found at an address is the fd's own.
Hence two rules:

- a revoked guard's fd stays open for as long as the mapping may exist: until
  the client's Detach (the client unmaps before it sends one) or, after the
  socket's EOF, until the process has exited (its pidfd, polled by
  ``Revocations.reap`` from the heartbeat thread);
- the mapping is write-protected once, when the guard is revoked, never later
  through a kept fd: by then the address may hold another mapping.

Life cycle (one transition table, ``Guard._move``)::

    AWAITING ──► ARMED ──► REVOKING ──► REVOKED ──► CLOSED
       │           └──────────────────────────────► CLOSED   (Detach: unmapped)
       ├──► REVOKED   (the lock ended before the registration came: none is taken)
       └──► CLOSED

The ioctl runs outside the guard's lock (REVOKING; ~0.1 s per populated GiB);
``close`` waits for it, so the fd is never closed under it.

The agent stores for the writer too: a large ``Mapping.write`` asks it to copy
the bytes out of the client's memory (``WriteFrom``, node/writers.py), which
the page-table protection cannot stop. Each step of such a copy runs inside
``storing``: only while the guard is ARMED, and ``revoke`` (like ``close``) waits
for the step under way before it protects anything, so no copied byte lands
once the lock is being revoked either.
"""
from __future__ import annotations

import enum
import errno
import logging
import os
import select
import signal
import socket
import threading
from contextlib import contextmanager

from vas import _native
from vas.core.errors import Fenced, InvalidArgument
from vas.node import locks

log = logging.getLogger(__name__)

#: getsockopt(SOL_SOCKET, SO_PEERPIDFD) (Linux 6.5): a pidfd of the process at the
#: other end of a Unix socket. Python 3.11 lacks the name; 77 is its value in
#: asm-generic/socket.h (x86, arm, riscv, ...).
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
#: Attempts of a write-protect that fails for another reason than "process gone"
#: or "range unmapped" (ENOMEM while allocating page tables for the markers).
_ATTEMPTS = 3


class GuardState(enum.Enum):
    AWAITING = "awaiting"  # attach answered; the client has not registered its mapping yet
    ARMED = "armed"        # the agent holds the fd: stores land, and can be revoked
    REVOKING = "revoking"  # the write-protect ioctl is running
    REVOKED = "revoked"    # write-protected (or never registered): stores fault with SIGBUS
    CLOSED = "closed"      # the fd is closed: the mapping is gone


_MOVES = {GuardState.AWAITING: {GuardState.ARMED, GuardState.REVOKED, GuardState.CLOSED},
          GuardState.ARMED: {GuardState.REVOKING, GuardState.CLOSED},
          GuardState.REVOKING: {GuardState.REVOKED},
          GuardState.REVOKED: {GuardState.CLOSED},
          GuardState.CLOSED: set()}


def pidfd_of(session) -> int:
    """A pidfd of the client process of ``session`` (the peer of its socket), or -1.

    SO_PEERPIDFD names exactly the process that connected, whatever its pid
    namespace; pidfd_open of the SO_PEERCRED pid is the fallback for kernels
    before 6.5 (the caller is alive: it is making a request).
    """
    sock = session.sock
    if sock is not None:
        try:
            return sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
        except OSError:
            pass
    if session.pid > 0:
        try:
            return os.pidfd_open(session.pid)
        except OSError:
            pass
    return -1


def uffd_features(fd: int) -> int | None:
    """The features userfaultfd ``fd`` was set up with (``API:`` of its /proc fdinfo:
    api:features:ioctls in hex), or None when that cannot be read."""
    try:  # os-level calls: a Python file object costs ~3x as much here
        info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(info, 4096)
        finally:
            os.close(info)
        start = text.index(b"\nAPI:\t") + 6
        return int(text[start:].split(b":")[1], 16)
    except (OSError, IndexError, ValueError):
        return None


class Guard:
    """The write-protect registration of one revocable "rw" attachment (the module
    docstring). ``name`` is the segment's; ``pidfd`` the client process's (or -1),
    owned by the guard from its creation."""

    __slots__ = ("name", "pid", "pidfd", "uffd", "address", "size", "gone", "state", "_cv",
                 "_on_closed", "_storing")

    def __init__(self, name: str, pid: int, pidfd: int):
        self.name, self.pid, self.pidfd = name, pid, pidfd
        self.uffd, self.address, self.size = -1, 0, 0
        self.gone = False  # the write-protect found the mapping (or the process) gone
        self.state = GuardState.AWAITING
        self._cv = threading.Condition(locks.Lock(f"guard {name}", locks.Rank.WRITE_GUARD))
        self._on_closed = None
        self._storing = 0  # copies into the home pages on the writer's behalf under way

    def _move(self, to: GuardState) -> None:
        """The one transition function (the caller holds the lock)."""
        if to not in _MOVES[self.state]:
            raise RuntimeError(f"write guard of {self.name}: {self.state.value} -> {to.value}")
        self.state = to

    def arm(self, uffd: int, address: int, size: int, fenced: Fenced) -> None:
        """Take the client's registration (``uffd`` is taken over only on success).

        :raises InvalidArgument: ``uffd`` was made without UFFD_FEATURE_SIGBUS (a
            revoked writer's store would wait for an answer that never comes, and
            closing the fd one day would let it land).
        :raises Fenced: ``fenced``, when the writer lock ended before it came (the
            guard was revoked with nothing to protect: the client unmaps).
        """
        features = uffd_features(uffd)
        if features is not None and not features & _native.UFFD_FEATURE_SIGBUS:
            raise InvalidArgument(f"the userfaultfd of a revocable attachment of {self.name} "
                                  "needs UFFD_FEATURE_SIGBUS")
        with self._cv:
            if self.state is not GuardState.AWAITING:
                raise fenced
            self.uffd, self.address, self.size = uffd, address, size
            self._move(GuardState.ARMED)

    @property
    def armed(self) -> bool:
        return self.state is GuardState.ARMED

    @contextmanager
    def storing(self, fenced: Fenced):
        """Run the block as a store of the writer made by the agent (one step of a
        ``WriteFrom`` copy): only while ARMED, else ``fenced``; ``revoke`` and
        ``close`` wait for it to end."""
        with self._cv:
            if self.state is not GuardState.ARMED:
                raise fenced
            self._storing += 1
        try:
            yield
        finally:
            with self._cv:
                self._storing -= 1
                self._cv.notify_all()

    def revoke(self) -> None:
        """Write-protect the whole mapping, once; return when it is protected (also
        when another thread did it). Called before the writer lock is let go."""
        with self._cv:
            if self.state is GuardState.AWAITING:
                self._move(GuardState.REVOKED)  # nothing registered: nothing mapped for the caller
                return
            if self.state is GuardState.REVOKING:
                self._cv.wait_for(lambda: self.state is not GuardState.REVOKING)
            if self.state is not GuardState.ARMED:
                return
            self._move(GuardState.REVOKING)  # no new step of a copy starts
            self._cv.wait_for(lambda: not self._storing)  # the one under way ends
            uffd, address, size = self.uffd, self.address, self.size
        try:
            self.gone = self._write_protect(uffd, address, size)
        finally:
            with self._cv:
                self._move(GuardState.REVOKED)
                self._cv.notify_all()

    def _write_protect(self, uffd: int, address: int, size: int) -> bool:
        """UFFDIO_WRITEPROTECT of the mapping; True if it is gone (the process exited:
        ESRCH; the range is no longer registered, i.e. unmapped: ENOENT). Any other
        failure leaves stores possible: the process is killed instead."""
        error = None
        for _ in range(_ATTEMPTS):
            try:
                _native.uffd_writeprotect(uffd, address, size, _native.UFFDIO_WRITEPROTECT_MODE_WP)
                log.info("write-protected the home mapping of %s in process %d (%d bytes)",
                         self.name, self.pid, size)
                return False
            except OSError as exc:
                if exc.errno in (errno.ESRCH, errno.ENOENT):
                    log.debug("home mapping of %s in process %d is gone (%s)", self.name,
                              self.pid, exc)
                    return True
                error = exc
        log.error("cannot write-protect the home mapping of %s in process %d (%s): killing "
                  "the process, its late stores must not reach the home pages", self.name,
                  self.pid, error)
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except OSError as exc:
            log.critical("cannot kill process %d either (%s): its stores may still reach the "
                         "home pages of %s", self.pid, exc, self.name)
        return False

    def exited(self) -> bool:
        """Whether the client process has exited (its pidfd is readable)."""
        if self.pidfd < 0:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def when_closed(self, callback) -> None:
        """Call ``callback()`` once this guard is closed (now, if it is already): what
        its process still maps keeps counting until then (Agent.end_attachment)."""
        with self._cv:
            if self.state is not GuardState.CLOSED:
                self._on_closed = callback
                return
        callback()

    def close(self) -> None:
        """The mapping is gone: close the fd (which would lift a protection) and the pidfd."""
        with self._cv:
            self._cv.wait_for(lambda: self.state is not GuardState.REVOKING
                              and not self._storing)
            if self.state is GuardState.CLOSED:
                return
            self._move(GuardState.CLOSED)
            fds, self.uffd, self.pidfd = (self.uffd, self.pidfd), -1, -1
            on_closed, self._on_closed = self._on_closed, None
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        if on_closed is not None:
            on_closed()

    def __repr__(self) -> str:
        return f"<Guard {self.name} pid={self.pid} {self.state.value}>"


class Revocations:
    """Revoked guards whose process may still map them: kept (their fd open, so the
    protection holds) until it exits. ``reap`` runs in the heartbeat thread."""

    def __init__(self):
        self._lock = locks.Lock("kept write guards", locks.Rank.KEPT_GUARDS)
        self._kept: list[Guard] = []

    def keep(self, guard: Guard) -> None:
        """``guard`` was revoked at its connection's EOF: close it now if its mapping
        or process is gone, else once the process exits."""
        if guard.uffd < 0 or guard.gone or guard.exited():
            guard.close()
            return
        if guard.pidfd < 0:
            log.warning("write-protected home mapping of %s in process %d kept until the "
                        "agent stops (no pidfd to see its exit)", guard.name, guard.pid)
        with self._lock:
            self._kept.append(guard)

    def reap(self) -> None:
        """Close the kept guards whose process has exited."""
        with self._lock:
            kept = list(self._kept)
        done = [guard for guard in kept if guard.exited()]
        if not done:
            return
        with self._lock:
            self._kept = [guard for guard in self._kept if guard not in done]
        for guard in done:
            guard.close()

    def count(self) -> int:
        with self._lock:
            return len(self._kept)

    def close_all(self) -> None:
        """At shutdown: the home pages go with the agent."""
        with self._lock:
            kept, self._kept = self._kept, []
        for guard in kept:
            guard.close()
