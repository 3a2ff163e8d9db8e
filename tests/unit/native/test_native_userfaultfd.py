"""vas._native's userfaultfd calls: handshake, register, copy, zeropage, continue, wake, read.

Missing faults resolved by copy, minor faults by continue, on shmem (memfd) mappings;
a test skips, with the reason, where the kernel lacks userfaultfd or a feature.
Real syscalls, no mocks; fixtures (with the fd-leak check) in conftest.py beside this file.
"""
import ctypes
import errno
import os
import select
import threading

import pytest

from native_checks import PS
from vas import _native


WAIT = 10.0  # seconds: the bound on every wait in these tests


# --------------------------------------------------------------------------
# userfaultfd


def uffd_open(features):
    """A userfaultfd with `features` enabled, or skip the test."""
    try:
        probe = _native.userfaultfd()
    except OSError as e:
        pytest.skip(f"userfaultfd unavailable: {e}")
    try:
        supported = _native.uffd_api(probe)
    finally:
        os.close(probe)
    missing = features & ~supported
    if missing:
        pytest.skip(f"kernel lacks userfaultfd features 0x{missing:x}")
    fd = _native.userfaultfd()
    assert _native.uffd_api(fd, features) & features == features
    return fd


@pytest.fixture
def uffd_factory():
    fds = []

    def make(features):
        fd = uffd_open(features)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:  # closing also wakes any thread still blocked on a fault
        os.close(fd)


class Reader(threading.Thread):
    """Copies n bytes at address without the GIL (ctypes.memmove drops it),
    so the thread can block on a userfault while the test goes on."""

    def __init__(self, address, n):
        super().__init__(daemon=True)
        self.address, self.n, self.data = address, n, None

    def run(self):
        buf = ctypes.create_string_buffer(self.n)
        ctypes.memmove(buf, self.address, self.n)
        self.data = buf.raw

    def finish(self):
        self.join(WAIT)
        assert not self.is_alive(), "reader still blocked on its page fault"
        return self.data


def wait_fault(uffd):
    poller = select.poll()
    poller.register(uffd, select.POLLIN)
    assert poller.poll(WAIT * 1000), "no userfault event before the deadline"
    events = _native.uffd_read(uffd)
    assert len(events) == 1
    return events[0]


def test_uffd_api_and_read_nothing(uffd_factory):
    fd = uffd_factory(0)
    assert not os.get_inheritable(fd)  # O_CLOEXEC
    assert not os.get_blocking(fd)  # O_NONBLOCK
    assert _native.uffd_read(fd) == []
    with pytest.raises(OSError) as info:
        _native.uffd_api(fd)  # one handshake per fd
    assert info.value.errno == errno.EINVAL


def test_uffd_missing_fault_resolved_by_copy(uffd_factory, memfd, mapper):
    uffd = uffd_factory(_native.UFFD_FEATURE_MISSING_SHMEM)
    fd = memfd(pages=2, reserve=False)  # sparse: the first touch is a missing fault
    m = mapper(fd, 2 * PS)
    ioctls = _native.uffd_register(uffd, m.address, m.size,
                                   _native.UFFDIO_REGISTER_MODE_MISSING)
    assert ioctls & (1 << 0x03)  # _UFFDIO_COPY

    reader = Reader(m.address + PS + 100, 50)
    reader.start()
    event, flags, address = wait_fault(uffd)
    assert event == _native.UFFD_EVENT_PAGEFAULT
    assert not flags & _native.UFFD_PAGEFAULT_FLAG_WRITE
    assert address & ~(PS - 1) == m.address + PS

    payload = bytes(range(256)) * (PS // 256)
    assert _native.uffd_copy(uffd, m.address + PS, payload) == PS
    assert reader.finish() == payload[100:150]
    assert os.pread(fd, PS, PS) == payload  # it landed in the memfd
    with pytest.raises(FileExistsError):
        _native.uffd_copy(uffd, m.address + PS, payload)
    assert _native.uffd_read(uffd) == []
    _native.uffd_unregister(uffd, m.address, m.size)


def test_uffd_copy_from_zeropage_and_wake(uffd_factory, memfd, mapper):
    uffd = uffd_factory(_native.UFFD_FEATURE_MISSING_SHMEM)
    m = mapper(memfd(pages=3, reserve=False), 3 * PS)
    _native.uffd_register(uffd, m.address, m.size, _native.UFFDIO_REGISTER_MODE_MISSING)

    src_fd = memfd(pages=1)
    os.pwrite(src_fd, b"from the agent's mapping", 0)
    src = mapper(src_fd, PS, writable=False)
    assert _native.uffd_copy_from(uffd, m.address, src.address, PS) == PS
    assert _native.uffd_zeropage(uffd, m.address + PS, PS) == PS
    _native.uffd_wake(uffd, m.address, m.size)  # nobody waits: a no-op
    with pytest.raises(FileExistsError):
        _native.uffd_zeropage(uffd, m.address, PS)

    reader = Reader(m.address, 2 * PS)  # both pages are present: no fault
    reader.start()
    data = reader.finish()
    assert data[:24] == b"from the agent's mapping"
    assert data[PS:] == bytes(PS)

    with pytest.raises(OSError) as info:  # the source is not mapped
        _native.uffd_copy_from(uffd, m.address + 2 * PS, 0, PS)
    assert info.value.errno == errno.EFAULT
    _native.uffd_unregister(uffd, m.address, m.size)


def test_uffd_minor_fault_resolved_by_continue(uffd_factory, memfd, mapper):
    uffd = uffd_factory(_native.UFFD_FEATURE_MINOR_SHMEM)
    fd = memfd(pages=1)
    m = mapper(fd, PS)
    payload = os.urandom(PS)
    with mapper(fd, PS) as filler, memoryview(filler) as v:
        v[:] = payload  # the page is in the page cache, not in m's page table
    _native.uffd_register(uffd, m.address, PS, _native.UFFDIO_REGISTER_MODE_MINOR)

    reader = Reader(m.address, PS)
    reader.start()
    event, flags, address = wait_fault(uffd)
    assert event == _native.UFFD_EVENT_PAGEFAULT
    assert flags & _native.UFFD_PAGEFAULT_FLAG_MINOR
    assert address & ~(PS - 1) == m.address

    assert _native.uffd_continue(uffd, m.address, PS) == PS
    assert reader.finish() == payload
    _native.uffd_unregister(uffd, m.address, PS)


def test_uffd_bad_fd_raises_oserror():
    with pytest.raises(OSError) as info:
        _native.uffd_read(-1)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        _native.uffd_copy(-1, PS, bytes(PS))
    assert info.value.errno == errno.EBADF
