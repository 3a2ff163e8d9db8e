"""vas._native's userfaultfd write-protect, applied from another process: what the agent
does to a writer on the home node whose lock it revokes (node/revoke.py).

The writer is a child process that registers its own shared writable mapping and passes
the userfaultfd (and the memfd) here; this process write-protects the range, then the
child stores, loads or has the kernel store: stores end it with SIGBUS and never reach
the memfd, loads work, a system call gets EFAULT. Also pinned: the ioctl answers ESRCH
once that process is gone, ENOENT on a range not registered for write-protect, and
closing the userfaultfd lifts the protection (why the agent keeps it open). A test
skips, with the reason, where the kernel lacks the features.
Real syscalls, no mocks; fixtures (with the fd-leak check) in conftest.py beside this file.
"""
import errno
import os
import signal
import socket
import subprocess
import sys

import pytest

from native_checks import PS
from vas import _native

WAIT = 10.0  # seconds: the bound on every wait in these tests
WP_FEATURES = _native.UFFD_FEATURE_WP_HUGETLBFS_SHMEM | _native.UFFD_FEATURE_SIGBUS

# The writer: maps a memfd shared and writable, stores into page 0, loads page 1,
# registers the mapping for write-protect on a user-mode-only userfaultfd with
# SIGBUS, passes (uffd, memfd) with "address size" over the socket (fd argv[2]), waits
# for one command and runs it: "store PAGE", "load PAGE", "kernel-store PAGE"
# (read(2) from a pipe into the page), "exit".
_WP_WRITER = """
import os, socket, sys
from vas import _native
PS = _native.PAGE_SIZE
sock = socket.socket(fileno=int(sys.argv[2]))
fd = _native.memfd_create("wp-writer")
_native.fallocate(fd, 0, 8 * PS)
m = _native.mmap(fd, 8 * PS, writable=True)
view = memoryview(m)
view[0] = 1
assert view[PS] == 0
uffd = _native.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | _native.UFFD_USER_MODE_ONLY)
_native.uffd_api(uffd, int(sys.argv[1]))
_native.uffd_register(uffd, m.address, 8 * PS, _native.UFFDIO_REGISTER_MODE_WP)
socket.send_fds(sock, [f"{m.address} {8 * PS}".encode()], [uffd, fd])
os.close(uffd)
action, page = (sock.recv(64).decode().split() + ["0"])[:2]
at = int(page) * PS + 8
if action == "store":
    view[at] = 0x43
elif action == "load":
    print("loaded", view[at], flush=True)
elif action == "kernel-store":
    r, w = os.pipe()
    os.write(w, b"K")
    try:
        os.readv(r, [view[at:at + 1]])
    except OSError as exc:
        print("readv", exc.errno, flush=True)
print("done", flush=True)
"""


class WpWriter:
    """A _WP_WRITER process; ``uffd``, ``memfd``, ``address``, ``size`` as it sent them."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WP_WRITER, str(WP_FEATURES), str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, text=True)
        theirs.close()
        self.sock = ours
        msg, fds, _, _ = socket.recv_fds(ours, 64, 2)
        self.uffd, self.memfd = fds
        address, size = msg.split()
        self.address, self.size = int(address), int(size)

    def run(self, command: str) -> tuple[int, str]:
        """Send ``command``; (exit code, what it printed)."""
        self.sock.send(command.encode())
        out, _ = self.process.communicate(timeout=WAIT)
        return self.process.returncode, out

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT)
        self.process.stdout.close()
        self.sock.close()
        for fd in (self.uffd, self.memfd):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def wp_writer():
    try:
        probe = _native.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | _native.UFFD_USER_MODE_ONLY)
    except OSError as e:
        pytest.skip(f"userfaultfd unavailable: {e}")
    try:
        missing = WP_FEATURES & ~_native.uffd_api(probe)
    finally:
        os.close(probe)
    if missing:
        pytest.skip(f"kernel lacks userfaultfd features 0x{missing:x}")
    writers = []

    def make():
        writer = WpWriter()
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.close()


def byte_at(writer, page):
    return os.pread(writer.memfd, 1, page * PS + 8)


@pytest.mark.parametrize("page", [0, 1, 5], ids=["stored-to", "loaded", "never-touched"])
def test_uffd_writeprotect_from_another_process_ends_its_stores_with_sigbus(wp_writer, page):
    w = wp_writer()
    assert _native.uffd_writeprotect(w.uffd, w.address, w.size,
                                      _native.UFFDIO_WRITEPROTECT_MODE_WP) is None
    code, out = w.run(f"store {page}")
    assert (code, out) == (-signal.SIGBUS, "")
    assert byte_at(w, page) == b"\0"  # the store never reached the memfd
    with pytest.raises(OSError) as info:  # that process is gone
        _native.uffd_writeprotect(w.uffd, w.address, w.size, _native.UFFDIO_WRITEPROTECT_MODE_WP)
    assert info.value.errno == errno.ESRCH


def test_uffd_writeprotect_leaves_loads_and_fails_kernel_stores(wp_writer):
    os.pwrite((w := wp_writer()).memfd, b"L", 6 * PS + 8)
    _native.uffd_writeprotect(w.uffd, w.address, w.size, _native.UFFDIO_WRITEPROTECT_MODE_WP)
    assert w.run("load 6") == (0, f"loaded {ord('L')}\ndone\n")
    w2 = wp_writer()
    _native.uffd_writeprotect(w2.uffd, w2.address, w2.size, _native.UFFDIO_WRITEPROTECT_MODE_WP)
    assert w2.run("kernel-store 7") == (0, f"readv {errno.EFAULT}\ndone\n")
    assert byte_at(w2, 7) == b"\0"


def test_uffd_writeprotect_lifted_by_closing_the_uffd(wp_writer):
    """Why the agent keeps a revoked writer's uffd open: closing it unprotects."""
    w = wp_writer()
    _native.uffd_writeprotect(w.uffd, w.address, w.size, _native.UFFDIO_WRITEPROTECT_MODE_WP)
    os.close(w.uffd)
    w.uffd = -1
    assert w.run("store 2") == (0, "done\n")
    assert byte_at(w, 2) == b"\x43"


def test_uffd_writeprotect_needs_a_wp_registration(memfd, mapper):
    try:
        uffd = _native.userfaultfd()
    except OSError as e:
        pytest.skip(f"userfaultfd unavailable: {e}")
    try:
        _native.uffd_api(uffd)
        m = mapper(memfd(1), PS)
        with pytest.raises(OSError) as info:
            _native.uffd_writeprotect(uffd, m.address, PS, _native.UFFDIO_WRITEPROTECT_MODE_WP)
        assert info.value.errno == errno.ENOENT
    finally:
        os.close(uffd)
