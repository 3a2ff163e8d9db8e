"""Fixtures of the vas._native tests: every test is checked for leaked fds; memfds and
mappings made through ``memfd`` and ``mapper`` are closed after it."""
import os

import pytest

from native_checks import PS
from vas import _native


@pytest.fixture(autouse=True)
def no_fd_leaks():
    before = set(os.listdir("/proc/self/fd"))
    yield
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}")
              for fd in set(os.listdir("/proc/self/fd")) - before
              if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"leaked fds: {leaked}"


@pytest.fixture
def memfd():
    """Factory of memfds with their pages reserved; closes them afterwards."""
    fds = []

    def make(pages=4, reserve=True, name="vas-test"):
        fd = _native.memfd_create(name)
        fds.append(fd)
        if reserve:
            _native.fallocate(fd, 0, pages * PS)
        else:
            _native.ftruncate(fd, pages * PS)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


@pytest.fixture
def mapper():
    """Factory of Mappings (keyword arguments as _native.mmap); closes them."""
    maps = []

    def make(fd, length, writable=True, **kw):
        m = _native.mmap(fd, length, writable=writable, **kw)
        maps.append(m)
        return m

    yield make
    for m in maps:
        m.close()
