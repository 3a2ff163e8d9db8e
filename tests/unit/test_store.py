"""The agent's memory, capacity and access checks: real memfds and syscalls, no daemons."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap

import pytest

from vas import _native
from vas.core.errors import CapacityExceeded
from vas.node import store
from vas.node.access import may_attach
from vas.node.store import Store
from vas.proto import types_pb2

PS = _native.PAGE_SIZE


@pytest.fixture(autouse=True)
def no_fd_leaks():
    before = set(os.listdir("/proc/self/fd"))
    yield
    leaked = set(os.listdir("/proc/self/fd")) - before
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"leaked fds: {leaked}"


def info(name="seg", segment_id=1, size=4 * PS, mode=0o640, uid=1000, gid=100):
    return types_pb2.SegmentInfo(name=name, id=segment_id, size=size, mode=mode, uid=uid, gid=gid)


# ---------------------------------------------------------------- access checks

@pytest.mark.parametrize("mode, uid, gid, want, allowed", [
    (0o600, 1000, 100, "rw", True),    # owner
    (0o400, 1000, 100, "r", True),
    (0o400, 1000, 100, "rw", False),   # owner without the write bit
    (0o200, 1000, 100, "rw", False),   # "rw" needs read too
    (0o060, 1000, 100, "r", False),    # the owner gets owner bits, even if group bits allow
    (0o640, 2000, 100, "r", True),     # group
    (0o640, 2000, 100, "rw", False),
    (0o660, 2000, 100, "rw", True),
    (0o604, 2000, 100, "r", False),    # group bits apply to the group, not other bits
    (0o604, 2000, 200, "r", True),     # other
    (0o606, 2000, 200, "rw", True),
    (0o640, 2000, 200, "r", False),
    (0o000, 0, 0, "rw", True),         # root bypasses
])
def test_may_attach_follows_file_rules(mode, uid, gid, want, allowed):
    assert may_attach(info(mode=mode), uid, gid, want) is allowed


# ---------------------------------------------------------------- capacity

def test_reserve_refuses_beyond_capacity_with_a_stable_message():
    s = Store(10 * PS, "node n1")
    s.reserve(6 * PS, "a")
    with pytest.raises(CapacityExceeded) as err:
        s.reserve(5 * PS, "b")
    assert str(err.value) == (
        "node n1 has no room for segment b of 20 KiB: 16 KiB of 40 KiB free")
    s.reserve(4 * PS, "b")
    assert (s.used, s.free) == (10 * PS, 0)
    s.unreserve(4 * PS)
    assert s.used == 6 * PS


def test_hold_turns_a_reservation_into_held_bytes_and_drop_frees_it():
    s = Store(8 * PS)
    s.reserve(4 * PS, "seg")
    s.hold(4 * PS)
    assert (s.held, s.reserved, s.count, s.usage()) == (4 * PS, 0, 1, (4 * PS, 1))
    s.drop(4 * PS)
    assert (s.used, s.count) == (0, 0)
    with pytest.raises(ValueError):
        s.drop(4 * PS)
    with pytest.raises(ValueError):  # nothing reserved to hold
        s.hold(PS)


def test_memory_release_is_idempotent_and_closes_everything():
    memory = store.Memory.allocate("mem", 4 * PS, mapped=True)
    with memoryview(memory.mapping) as view:
        view[0] = 1
    memory.release()
    memory.release()
    assert (memory.fd, memory.ro_fd, memory.mapping) == (-1, -1, None)


# ---------------------------------------------------------------- memfds

def test_allocate_reserves_every_page_and_seals_the_size():
    fd, ro_fd = store.allocate("a/b", 16 * PS)
    try:
        st = os.fstat(fd)
        assert st.st_size == 16 * PS
        assert st.st_blocks * 512 >= 16 * PS          # fallocate reserved the pages
        assert st.st_mode & 0o777 == 0o600
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:vas:a/b")
        with pytest.raises(PermissionError):
            os.ftruncate(fd, PS)                        # F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 32 * PS)                   # F_SEAL_GROW
        with mmap.mmap(fd, 16 * PS) as rw:
            rw[:5] = b"hello"
        with mmap.mmap(ro_fd, 16 * PS, prot=mmap.PROT_READ) as ro:
            assert ro[:5] == b"hello"                   # the same pages
    finally:
        store.release(fd, ro_fd, 16 * PS)


def test_the_read_only_fd_cannot_be_mapped_writable():
    fd, ro_fd = store.allocate("ro", PS)
    try:
        with pytest.raises(PermissionError):
            _native.mmap(ro_fd, PS, writable=True)
        with pytest.raises(PermissionError):
            mmap.mmap(ro_fd, PS, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        m = _native.mmap(ro_fd, PS, writable=False)
        m.close()
    finally:
        store.release(fd, ro_fd, PS)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the fd to another uid")
def test_another_uid_cannot_reopen_the_read_only_fd_for_writing():
    fd, ro_fd = store.allocate("reopen", PS)
    try:
        # Imports first, then drop to "nobody": the interpreter may live where nobody can't read.
        code = textwrap.dedent("""
            import os, sys
            from vas import _native
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            fd = int(sys.argv[1])
            _native.mmap(fd, 4096, writable=False).close()  # the passed fd itself works
            try:
                os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            except PermissionError:
                print("denied")
            else:
                print("opened")
        """)
        out = subprocess.run([sys.executable, "-c", code, str(ro_fd)], pass_fds=[ro_fd],
                             capture_output=True, text=True, timeout=30, cwd="/")
        assert out.stdout.strip() == "denied", out.stderr
    finally:
        store.release(fd, ro_fd, PS)


def test_release_gives_the_memory_back_even_while_mapped():
    fd, ro_fd = store.allocate("punch", 64 * PS)
    keep = os.dup(fd)
    with mmap.mmap(keep, 64 * PS) as mapping:
        mapping[:4] = b"data"
        store.release(fd, ro_fd, 64 * PS)
        assert os.fstat(keep).st_blocks == 0            # punched out, though still mapped
        assert mapping[:4] == b"\0\0\0\0"
    os.close(keep)


def test_allocate_closes_its_fd_when_the_memory_cannot_be_reserved(monkeypatch):
    def fail(fd, offset, length, mode=0):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(_native, "fallocate", fail)
    with pytest.raises(CapacityExceeded, match="cannot reserve 4 KiB of memory for segment x"):
        store.allocate("x", PS)
    # no_fd_leaks checks the memfd was closed
