"""vas._native's memory calls: memfd_create, fallocate, ftruncate, mmap and Mapping, madvise.

Sharing through one memfd, offsets, fixed addresses, read-only fds, zero-copy views
(numpy), export counting that refuses close(), idempotent close, unmapping on dealloc,
madvise and its bounds.
Real syscalls, no mocks; fixtures (with the fd-leak check) in conftest.py beside this file.
"""
import errno
import mmap
import os
import re
import struct
import threading
import time

import pytest

from native_checks import PS, exact, ro_reopen
from vas import _native


# --------------------------------------------------------------------------
# memfd, fallocate, ftruncate, mmap


def test_memfd_fallocate_mmap_round_trip(memfd, mapper):
    fd = memfd(pages=4)
    st = os.fstat(fd)
    assert st.st_size == 4 * PS
    assert st.st_blocks * 512 >= 4 * PS  # reserved, not sparse
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:vas-test")
    assert not os.get_inheritable(fd)  # MFD_CLOEXEC by default

    m = mapper(fd, 4 * PS)
    assert (m.size, m.writable, m.closed, m.exports) == (4 * PS, True, False, 0)
    assert m.address % PS == 0
    view = memoryview(m)
    assert (view.format, view.ndim, view.nbytes, view.readonly) == ("B", 1, 4 * PS, False)
    view[PS:PS + 5] = b"hello"
    assert os.pread(fd, 5, PS) == b"hello"
    os.pwrite(fd, b"world", 3 * PS)
    assert bytes(view[3 * PS:3 * PS + 5]) == b"world"
    assert m.exports == 1
    view.release()
    assert m.exports == 0


def test_memfd_name_limit():
    os.close(_native.memfd_create("n" * 249))
    with pytest.raises(ValueError, match=exact("memfd name too long")):
        _native.memfd_create("n" * 250)
    with pytest.raises(ValueError, match=exact("memfd name too long")):
        _native.memfd_create("\u00e9" * 125)  # 250 bytes of UTF-8
    fd = _native.memfd_create("seal", _native.MFD_ALLOW_SEALING)
    try:
        assert os.get_inheritable(fd)  # flags replace the default MFD_CLOEXEC
    finally:
        os.close(fd)


def test_two_mappings_of_one_memfd_share_bytes(memfd, mapper):
    fd = memfd(pages=2)
    a, b = mapper(fd, 2 * PS), mapper(fd, 2 * PS)
    assert a.address != b.address
    with memoryview(a) as va, memoryview(b) as vb:
        va[PS - 3:PS + 3] = b"abcdef"
        assert bytes(vb[PS - 3:PS + 3]) == b"abcdef"
        vb[0] = 0x7F
        assert va[0] == 0x7F


def test_mmap_at_an_offset(memfd, mapper):
    fd = memfd(pages=3)
    os.pwrite(fd, b"third page", 2 * PS)
    m = mapper(fd, PS, offset=2 * PS, populate=True)
    with memoryview(m) as v:
        assert bytes(v[:10]) == b"third page"


def test_numpy_view_is_zero_copy(memfd, mapper):
    np = pytest.importorskip("numpy")
    fd = memfd(pages=2)
    m = mapper(fd, 2 * PS)
    arr = np.frombuffer(m, dtype=np.uint64)
    assert arr.size == 2 * PS // 8
    assert arr.ctypes.data == m.address
    assert m.exports == 1
    arr[1] = 0x1122334455667788
    assert os.pread(fd, 8, 8) == struct.pack("<Q", 0x1122334455667788)
    os.pwrite(fd, struct.pack("<Q", 42), PS)
    assert arr[PS // 8] == 42
    with pytest.raises(BufferError):
        m.close()
    del arr
    assert m.exports == 0
    m.close()


def test_read_only_fd_cannot_be_mapped_writable(memfd, mapper):
    fd = memfd(pages=1)
    os.pwrite(fd, b"ro", 0)
    ro = ro_reopen(fd)
    try:
        with pytest.raises(PermissionError) as info:
            _native.mmap(ro, PS, writable=True)
        assert info.value.errno == errno.EACCES
        m = mapper(ro, PS, writable=False)
    finally:
        os.close(ro)  # the mapping outlives the fd
    assert m.writable is False
    with memoryview(m) as v:
        assert v.readonly
        assert bytes(v[:2]) == b"ro"
        with pytest.raises(TypeError):
            v[0] = 1
    with pytest.raises(BufferError, match=exact("mapping is read-only")):
        os.readv(fd, [m])  # asks for a writable buffer
    assert m.exports == 0


def test_close_refuses_while_exported_and_is_idempotent(memfd):
    m = _native.mmap(memfd(1), PS, writable=True)
    view = memoryview(m)
    view2 = memoryview(m)
    with pytest.raises(BufferError,
                       match=exact("cannot close mapping: 2 buffer(s) still exported")):
        m.close()
    view2.release()
    with pytest.raises(BufferError,
                       match=exact("cannot close mapping: 1 buffer(s) still exported")):
        m.close()
    assert not m.closed
    view.release()
    m.close()
    assert m.closed
    m.close()  # no-op
    assert m.closed
    with pytest.raises(ValueError, match=exact("mapping is closed")):
        memoryview(m)
    with pytest.raises(ValueError, match=exact("mapping is closed")):
        m.madvise(_native.MADV_WILLNEED)
    assert m.size == PS  # still readable after close


def test_context_manager_repr_and_read_only_attributes(memfd):
    with _native.mmap(memfd(1), PS, writable=False) as m:
        assert re.fullmatch(
            rf"<vas\._native\.Mapping address=0x{m.address:x} size={PS} writable=False>",
            repr(m))
        for attr in ("address", "size", "writable", "closed", "exports"):
            with pytest.raises(AttributeError):
                setattr(m, attr, 1)
    assert m.closed
    assert repr(m).endswith(" closed>")


def test_dealloc_unmaps(memfd):
    fd = memfd(1)
    m = _native.mmap(fd, PS, writable=True)
    address = m.address
    with pytest.raises(FileExistsError):
        _native.mmap(fd, PS, writable=True, address=address, fixed=True)
    del m
    _native.mmap(fd, PS, writable=True, address=address, fixed=True).close()


def test_weakref_callback_runs_after_the_last_view_and_the_munmap(memfd):
    import weakref

    fd = memfd(1)
    m = _native.mmap(fd, PS, writable=False)
    address = m.address
    seen = []

    def address_free() -> None:  # the range can be mapped again: it was unmapped
        _native.mmap(fd, PS, writable=False, address=address, fixed=True).close()
        seen.append("unmapped")

    weakref.finalize(m, address_free)
    view = memoryview(m)
    del m
    assert seen == [] and view[0] == 0  # the view holds the mapping
    view.release()
    assert seen == ["unmapped"]


def test_fixed_mapping(memfd, mapper):
    fd = memfd(pages=2)
    probe = _native.mmap(fd, 2 * PS, writable=True)
    address = probe.address
    probe.close()

    m = mapper(fd, 2 * PS, address=address, fixed=True)
    assert m.address == address

    taken = address + PS
    with pytest.raises(FileExistsError) as info:
        _native.mmap(fd, 2 * PS, writable=True, address=taken, fixed=True)
    assert info.value.errno == errno.EEXIST
    assert info.value.strerror == (
        f"address range 0x{taken:x}-0x{taken + 2 * PS:x} is already mapped")
    assert re.escape(f"0x{taken:x}-0x{taken + 2 * PS:x}") in re.escape(str(info.value))

    # without fixed the address is only a hint
    other = mapper(fd, PS, address=address)
    assert other.address != address


def test_madvise(memfd, mapper):
    fd = memfd(pages=4)
    m = mapper(fd, 4 * PS)
    m.madvise(_native.MADV_POPULATE_WRITE)
    m.madvise(_native.MADV_SEQUENTIAL, PS)
    m.madvise(_native.MADV_NORMAL, 0, 0)
    m.madvise(_native.MADV_WILLNEED, offset=PS, length=PS)
    with memoryview(m) as v:
        v[0:4] = b"keep"
        v[2 * PS:2 * PS + 4] = b"gone"
        m.madvise(_native.MADV_DONTNEED, 0, PS)  # shared: the memfd keeps it
        assert bytes(v[0:4]) == b"keep"
        m.madvise(_native.MADV_REMOVE, 2 * PS, PS)  # punches a hole
        assert bytes(v[2 * PS:2 * PS + 4]) == b"\0\0\0\0"
    m.madvise(_native.MADV_POPULATE_READ, 3 * PS, None)


@pytest.mark.parametrize("advice", [12345, -1, 100, 101])
def test_madvise_refuses_advice_beyond_the_mapping(memfd, mapper, advice):
    """Found fuzzing: any advice went to the kernel, and to root MADV_HWPOISON (100) and
    MADV_SOFT_OFFLINE (101) take physical pages out of service for the whole machine."""
    m = mapper(memfd(pages=1), PS)
    with pytest.raises(ValueError, match=f"^advice {advice} is not allowed$"):
        m.madvise(advice)
    m.madvise(mmap.MADV_DONTFORK)  # what vas.pages and vas.mapping use
    m.madvise(mmap.MADV_DOFORK)


@pytest.mark.parametrize("offset, length, msg", [
    (0, 4 * PS + 1, f"range [0, {4 * PS + 1}) is outside the mapping of {4 * PS} bytes"),
    (4 * PS, 1, f"range [{4 * PS}, {4 * PS + 1}) is outside the mapping of {4 * PS} bytes"),
    (5 * PS, None, f"range [{5 * PS}, {5 * PS}) is outside the mapping of {4 * PS} bytes"),
    (3 * PS, 2 ** 62, f"range [{3 * PS}, {3 * PS + 2 ** 62}) is outside the mapping "
                      f"of {4 * PS} bytes"),
    (1, None, "offset must be a non-negative multiple of the page size"),
    (-PS, None, "offset must be a non-negative multiple of the page size"),
    (0, -1, "length must be >= 0"),
])
def test_madvise_bounds(memfd, mapper, offset, length, msg):
    m = mapper(memfd(4), 4 * PS)
    with pytest.raises(ValueError, match=exact(msg)):
        m.madvise(_native.MADV_WILLNEED, offset, length)


def test_madvise_to_the_end_at_the_end_is_empty(memfd, mapper):
    m = mapper(memfd(4), 4 * PS)
    m.madvise(_native.MADV_WILLNEED, 4 * PS)


def test_madvise_rechecks_closed_after_argument_conversion(memfd):
    m = _native.mmap(memfd(1), PS, writable=True)

    class ClosesTheMapping:
        def __index__(self):
            m.close()
            return PS

    with pytest.raises(ValueError, match=exact("mapping is closed")):
        m.madvise(_native.MADV_DONTNEED, 0, ClosesTheMapping())


def test_fallocate_punch_hole_and_ftruncate(memfd):
    fd = memfd(pages=2)
    os.pwrite(fd, b"x" * 2 * PS, 0)
    _native.fallocate(fd, PS, PS, _native.FALLOC_FL_PUNCH_HOLE | _native.FALLOC_FL_KEEP_SIZE)
    assert os.fstat(fd).st_size == 2 * PS
    assert os.pread(fd, 2 * PS, 0) == b"x" * PS + b"\0" * PS
    _native.ftruncate(fd, 3)
    assert os.fstat(fd).st_size == 3
    _native.ftruncate(fd, 0)
    assert os.fstat(fd).st_size == 0
    with pytest.raises(OSError) as info:
        _native.fallocate(fd, 0, PS, 0x7F00)
    assert info.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)


def _idle_threads() -> set[int]:
    """Thread ids of this process in scheduling class SCHED_IDLE (/proc stat field 41)."""
    found = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        if int(fields[38]) == os.SCHED_IDLE:  # field 41; fields[0] is field 3
            found.add(int(tid))
    return found


def test_fallocate_idle_runs_on_an_idle_class_helper_thread(memfd):
    # A watcher looks for a SCHED_IDLE thread while idle fallocates of 64 MiB run
    # (each ~10-30 ms): the helper must show up, and the caller's class stay as it was.
    size = 64 << 20
    fd = memfd(pages=0, reserve=False)
    _native.ftruncate(fd, size)
    seen: set[int] = set()
    done = threading.Event()

    def watch():
        while not done.is_set() and not seen:
            seen.update(_idle_threads())

    watcher = threading.Thread(target=watch)
    watcher.start()
    deadline = time.monotonic() + 20
    try:
        while not seen and time.monotonic() < deadline:
            _native.fallocate(fd, 0, size, idle=True)
            assert os.fstat(fd).st_blocks * 512 >= size  # allocated by the helper
            _native.fallocate(fd, 0, size,
                              _native.FALLOC_FL_PUNCH_HOLE | _native.FALLOC_FL_KEEP_SIZE)
    finally:
        done.set()
        watcher.join(10)
    assert seen, "no SCHED_IDLE thread seen during idle fallocates"
    assert threading.get_native_id() not in seen
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert not _idle_threads(), "the helper outlived its call"


def test_fallocate_idle_reports_errno_and_checks_arguments(memfd):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        _native.fallocate(r, 0, PS, idle=True)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        _native.fallocate(memfd(1), 0, PS, 0x7F00, idle=True)
    assert info.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
    with pytest.raises(ValueError, match=exact("offset must be >= 0")):
        _native.fallocate(memfd(1), -1, PS, idle=True)
