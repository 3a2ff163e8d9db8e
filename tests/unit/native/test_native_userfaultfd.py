"""vas._native's userfaultfd calls: handshake, register, copy, zeropage, continue, poison, wake, read.

Missing faults resolved by copy, minor faults by continue, on shmem (memfd) mappings;
a test skips, with the reason, where the kernel lacks userfaultfd or a feature.
Real syscalls, no mocks; fixtures (with the fd-leak check) in conftest.py beside this file.
"""
import ctypes
import errno
import mmap as pymmap
import os
import select
import signal
import subprocess
import sys
import threading

import pytest

from native_checks import PS, ro_reopen
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


class SyscallReader(threading.Thread):
    """Writes n bytes at address into a pipe: the kernel reads the page (a fault taken
    in a system call), so a poisoned page fails the write with EFAULT instead of
    killing the process with SIGBUS."""

    def __init__(self, address, n):
        super().__init__(daemon=True)
        self.address, self.n, self.result = address, n, None

    def run(self):
        r, w = os.pipe()
        try:
            view = (ctypes.c_char * self.n).from_address(self.address)
            self.result = os.write(w, memoryview(view).cast("B"))
        except OSError as exc:
            self.result = exc
        finally:
            os.close(r)
            os.close(w)

    def finish(self):
        self.join(WAIT)
        assert not self.is_alive(), "reader still blocked on its page fault"
        return self.result


def test_uffd_poison_wakes_the_fault_and_fails_later_reads(uffd_factory, memfd):
    np = pytest.importorskip("numpy")
    uffd = uffd_factory(_native.UFFD_FEATURE_MISSING_SHMEM | _native.UFFD_FEATURE_MINOR_SHMEM
                        | _native.UFFD_FEATURE_POISON)
    fd = memfd(pages=4, reserve=False)
    os.pwrite(fd, b"\xab" * PS, 0)  # page 0 in the page cache
    ro = ro_reopen(fd)
    try:
        # A lazy mapping: MAP_PRIVATE PROT_READ of the read-only fd (vas/mapping.py).
        m = pymmap.mmap(ro, 4 * PS, flags=pymmap.MAP_PRIVATE, prot=pymmap.PROT_READ)
    finally:
        os.close(ro)
    view = memoryview(m)
    try:
        base = int(np.frombuffer(view, dtype=np.uint8, count=1).ctypes.data)
        ioctls = _native.uffd_register(uffd, base, 4 * PS, _native.UFFDIO_REGISTER_MODE_MISSING
                                       | _native.UFFDIO_REGISTER_MODE_MINOR)
        assert ioctls & (1 << 0x08)  # _UFFDIO_POISON

        reader = SyscallReader(base + PS, 16)  # blocks on a missing fault
        reader.start()
        event, flags, address = wait_fault(uffd)
        assert address & ~(PS - 1) == base + PS
        assert _native.uffd_poison(uffd, base + PS, PS) == PS  # and wakes the reader
        result = reader.finish()
        assert isinstance(result, OSError) and result.errno == errno.EFAULT
        again = SyscallReader(base + PS + 8, 8)  # the marker stays: no new fault
        again.start()
        assert again.finish().errno == errno.EFAULT
        assert _native.uffd_read(uffd) == []

        # A page in the page cache but not mapped here (a minor fault) is poisoned too;
        # a mapped one is refused with EEXIST.
        os.pwrite(fd, b"\xcd" * PS, 2 * PS)
        assert _native.uffd_poison(uffd, base + 2 * PS, 2 * PS) == 2 * PS
        assert _native.uffd_continue(uffd, base, PS) == PS
        assert view[0] == 0xab
        with pytest.raises(FileExistsError):
            _native.uffd_poison(uffd, base, PS)
        _native.uffd_unregister(uffd, base, 4 * PS)
    finally:
        view.release()
        m.close()


def test_a_touch_of_a_poisoned_page_is_sigbus():
    """What a client thread sees (in a child: the signal ends it)."""
    code = """if True:
        import mmap, os, sys
        import numpy as np
        from vas import _native
        PS = _native.PAGE_SIZE
        fd = _native.memfd_create("poison")
        _native.ftruncate(fd, PS)
        m = mmap.mmap(fd, PS, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        view = memoryview(m)
        base = int(np.frombuffer(view, dtype=np.uint8, count=1).ctypes.data)
        uffd = _native.userfaultfd()
        _native.uffd_api(uffd, _native.UFFD_FEATURE_MISSING_SHMEM | _native.UFFD_FEATURE_POISON)
        _native.uffd_register(uffd, base, PS, _native.UFFDIO_REGISTER_MODE_MISSING)
        _native.uffd_poison(uffd, base, PS)
        print("poisoned", flush=True)
        print(view[0], flush=True)  # SIGBUS here
    """
    if _native.UFFD_FEATURE_POISON & ~_supported_features():
        pytest.skip("the kernel lacks UFFDIO_POISON (Linux 6.6)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout == "poisoned\n", done.stderr
    assert done.returncode == -signal.SIGBUS


def _supported_features() -> int:
    try:
        fd = _native.userfaultfd()
    except OSError as exc:
        pytest.skip(f"userfaultfd unavailable: {exc}")
    try:
        return _native.uffd_api(fd)
    finally:
        os.close(fd)
