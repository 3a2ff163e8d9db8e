"""The guardian process of a vas client: a lazy mapping whose agent is gone raises
SIGBUS on a page not fetched yet, instead of reading zeros or hanging.

Why it exists. A lazy mapping (``fetch="lazy"``, vas/mapping.py) is registered
on a userfaultfd whose faults the local agent resolves (node/faults.py). Were the
agent the only holder of that fd, its death would close it, the registration
would end with it, and the kernel would fill the mapping's missing pages with
zeros: wrong bytes, silently. A thread of the client cannot take over: the
faulting thread sleeps in the kernel, maybe holding the GIL (inside numpy, say).
So each client process that maps something lazily has one guardian process
(started by vas/guard.py) holding a dup of every registered uffd and a dup of
the agent socket each was registered through:

- while that socket is up, the guardian never reads those uffds: the agent
  resolves the faults;
- once it hangs up (POLLHUP/POLLRDHUP: the agent died or closed the connection,
  or the client closed it), the guardian wakes every thread blocked on those
  mappings (faults the dead agent had read but not resolved would otherwise
  wait for ever; woken, they fault again), then reads each fault and poisons
  its page (UFFDIO_POISON): the touching thread gets SIGBUS, as from a
  truncated mmap'd file, and a system call reading the page fails with EFAULT.
  Pages already mapped keep their (correct) bytes;
- it closes a uffd when the client unmapped that mapping (DROP), and exits when
  the client process ends (the control socket hangs up), closing its dups (so
  the agent then sees EOF on the client's connection).

Protocol (vas/guard.py is the other end): a SOCK_SEQPACKET socketpair; each
datagram is one ``MESSAGE`` (kind, connection key, attachment id, address, size)
with at most one fd (SCM_RIGHTS):

- ``WATCH`` key, fd = the agent socket of the client's connection ``key``;
- ``ADD`` key, attachment, address, size, fd = the uffd of that lazy mapping;
- ``DROP`` key, attachment: the mapping is unmapped;
- ``CLOSING`` key: the client closes that connection itself (the hang-up that follows
  is not reported on its stderr as the agent's death).

Run as ``python -I -S PATH/vas/guardian.py NATIVE CONTROL_FD``: a script, so it
imports neither site-packages nor the ``vas`` package (whose core imports grpc:
~40 MB and up to seconds of start-up on a loaded 2-CPU VM), only the standard
library and ``vas._native`` loaded from the path NATIVE. Single-threaded; it
ignores SIGINT and runs in a session of its own, so a Ctrl-C or a signal to the
client's process group leaves it to end with the client.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import struct
import sys

#: One control datagram: kind, connection key, attachment id, address, size.
MESSAGE = struct.Struct("<B3xIQQQ")
WATCH, ADD, DROP, CLOSING = 1, 2, 3, 4
#: Most fault messages read from one uffd at a time.
_READ_BATCH = 64
#: poll() events that end an agent connection (HUP, ERR and NVAL are always reported).
_HANGUP = select.POLLRDHUP


class _Mapping:
    """One guarded lazy mapping: its uffd and registered range."""

    __slots__ = ("uffd", "address", "size")

    def __init__(self, uffd: int, address: int, size: int):
        self.uffd, self.address, self.size = uffd, address, size


class _Connection:
    """One agent connection of the client: its socket (``-1`` once it hung up) and
    its guarded mappings by attachment id. Kept after the hang-up: a mapping the
    client registered just before may be ADDed after it, and is poisoned at once.
    ``closing``: the client said it closes the connection itself (CLOSING)."""

    __slots__ = ("sock", "mappings", "closing")

    def __init__(self, sock: int):
        self.sock = sock
        self.mappings: dict[int, _Mapping] = {}
        self.closing = False


class Watch:
    """The guardian's state and loop (``run``)."""

    def __init__(self, native, control: socket.socket):
        self._native = native
        self._control = control
        self._page = native.PAGE_SIZE
        self._connections: dict[int, _Connection] = {}
        self._sockets: dict[int, int] = {}        # agent socket fd -> connection key
        self._poisoning: dict[int, _Mapping] = {}  # uffd -> mapping, once its agent is gone
        self._poll = select.poll()
        self._poll.register(control, select.POLLIN)

    def run(self) -> None:
        """Serve until the client process ends (EOF on the control socket)."""
        while True:
            for fd, events in self._poll.poll():
                if fd == self._control.fileno():
                    if not self._receive():
                        return
                elif fd in self._sockets:
                    self._hung_up(self._sockets[fd])
                elif fd in self._poisoning:
                    self._poison_faults(self._poisoning[fd])

    # -- control messages ------------------------------------------------------

    def _receive(self) -> bool:
        """Apply every queued control message; False at EOF."""
        while True:
            try:  # non-blocking socket (recv_fds ignores its flags before Python 3.12)
                data, fds, _, _ = socket.recv_fds(self._control, MESSAGE.size, 1)
            except BlockingIOError:
                return True
            if not data:
                return False
            fd = fds[0] if fds else -1
            for extra in fds[1:]:
                os.close(extra)
            if len(data) != MESSAGE.size:
                _say(f"ignoring a malformed control message of {len(data)} bytes")
                if fd >= 0:
                    os.close(fd)
                continue
            self._apply(*MESSAGE.unpack(data), fd)

    def _apply(self, kind: int, key: int, attachment: int, address: int, size: int,
               fd: int) -> None:
        connection = self._connections.get(key)
        if kind == WATCH and fd >= 0 and connection is None:
            self._connections[key] = _Connection(fd)
            self._sockets[fd] = key
            self._poll.register(fd, _HANGUP)
        elif kind == ADD and fd >= 0 and connection is not None:
            mapping = _Mapping(fd, address, size)
            self._forget(connection.mappings.pop(attachment, None))
            connection.mappings[attachment] = mapping
            if connection.sock < 0:  # the agent is gone already
                self._arm(mapping)
        elif kind == DROP and connection is not None:
            self._forget(connection.mappings.pop(attachment, None))
        elif kind == CLOSING and connection is not None:
            connection.closing = True
        else:
            _say(f"ignoring control message kind {kind} for connection {key}")
            if fd >= 0:
                os.close(fd)

    def _forget(self, mapping: _Mapping | None) -> None:
        if mapping is None:
            return
        if self._poisoning.pop(mapping.uffd, None) is not None:
            self._poll.unregister(mapping.uffd)
        os.close(mapping.uffd)

    # -- the agent is gone -------------------------------------------------------

    def _hung_up(self, key: int) -> None:
        """Connection ``key`` hung up: poison the faults of its mappings from now on."""
        connection = self._connections[key]
        self._poll.unregister(connection.sock)
        del self._sockets[connection.sock]
        os.close(connection.sock)
        connection.sock = -1  # kept: an ADD sent before the hang-up may still come
        if not connection.mappings:
            return
        if not connection.closing:
            _say(f"the agent connection of process {os.getppid()} is gone: pages of its "
                 f"{len(connection.mappings)} lazy mapping(s) not fetched yet raise SIGBUS")
        for mapping in connection.mappings.values():
            self._arm(mapping)

    def _arm(self, mapping: _Mapping) -> None:
        """Read and poison ``mapping``'s faults from now on, after waking the threads
        whose faults the agent read but never resolved (they fault again)."""
        self._poisoning[mapping.uffd] = mapping
        self._poll.register(mapping.uffd, select.POLLIN)
        try:
            self._native.uffd_wake(mapping.uffd, mapping.address, mapping.size)
        except OSError:  # the range is gone (unmapped): nothing waits there
            pass

    def _poison_faults(self, mapping: _Mapping) -> None:
        native = self._native
        try:
            events = native.uffd_read(mapping.uffd, _READ_BATCH)
        except OSError as exc:
            _say(f"reading userfaults failed ({exc}): no longer guarding a mapping")
            self._poisoning.pop(mapping.uffd, None)
            self._poll.unregister(mapping.uffd)
            return
        for event, _flags, address in events:
            if event != native.UFFD_EVENT_PAGEFAULT:
                continue
            page = address & ~(self._page - 1)
            try:
                native.uffd_poison(mapping.uffd, page, self._page)
            except FileExistsError:  # mapped meanwhile: the thread only needs waking
                _wake(native, mapping.uffd, page, self._page)
            except OSError as exc:  # EAGAIN (the mapping changes), ESRCH (process gone)
                _say(f"UFFDIO_POISON at 0x{page:x} failed: {exc}")
                _wake(native, mapping.uffd, page, self._page)


def _wake(native, uffd: int, address: int, length: int) -> None:
    try:
        native.uffd_wake(uffd, address, length)
    except OSError:
        pass


def _say(message: str) -> None:
    """One line on the client's stderr; never fatal (that pipe may be gone)."""
    try:
        print(f"vas guardian (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _load_native(path: str):
    """``vas._native`` from its file (the ``vas`` package is not imported here)."""
    from importlib.machinery import ExtensionFileLoader
    from importlib.util import module_from_spec, spec_from_file_location

    loader = ExtensionFileLoader("vas._native", path)
    spec = spec_from_file_location("vas._native", path, loader=loader)
    module = module_from_spec(spec)
    loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: guardian.py NATIVE_PATH CONTROL_FD (started by vas, not by hand)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    native = _load_native(argv[1])
    control = socket.socket(fileno=int(argv[2]))
    control.setblocking(False)
    Watch(native, control).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
