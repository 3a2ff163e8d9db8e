"""Tests of the C extension vas._native: real syscalls, no mocks."""
import ctypes
import errno
import inspect
import mmap as pymmap
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest

from vas import _native

PS = _native.PAGE_SIZE
WAIT = 10.0  # seconds: the bound on every wait in these tests


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


def ro_reopen(fd):
    """The memfd reopened read-only, as a read-only attachment gets it."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def exact(msg):
    return re.escape(msg) + "$"


# --------------------------------------------------------------------------
# constants and API shape


def test_constants_match_the_system():
    assert _native.PAGE_SIZE == os.sysconf("SC_PAGE_SIZE")
    assert _native.MFD_CLOEXEC == os.MFD_CLOEXEC
    assert _native.MFD_ALLOW_SEALING == os.MFD_ALLOW_SEALING
    for name in ("MADV_NORMAL", "MADV_SEQUENTIAL", "MADV_WILLNEED",
                 "MADV_DONTNEED", "MADV_REMOVE"):
        assert getattr(_native, name) == getattr(pymmap, name)
    assert (_native.MADV_POPULATE_READ, _native.MADV_POPULATE_WRITE) == (22, 23)
    assert (_native.FALLOC_FL_KEEP_SIZE, _native.FALLOC_FL_PUNCH_HOLE) == (1, 2)
    assert (_native.UFFDIO_REGISTER_MODE_MISSING, _native.UFFDIO_REGISTER_MODE_WP,
            _native.UFFDIO_REGISTER_MODE_MINOR) == (1, 2, 4)
    assert _native.UFFD_FEATURE_MISSING_SHMEM == 1 << 5
    assert _native.UFFD_FEATURE_MINOR_SHMEM == 1 << 10
    assert _native.UFFD_FEATURE_SIGBUS == 1 << 7
    assert _native.UFFD_FEATURE_WP_HUGETLBFS_SHMEM == 1 << 12
    assert _native.UFFD_USER_MODE_ONLY == 1
    assert (_native.UFFDIO_WRITEPROTECT_MODE_WP, _native.UFFDIO_WRITEPROTECT_MODE_DONTWAKE) == (1, 2)
    assert _native.UFFD_EVENT_PAGEFAULT == 0x12
    assert _native.UFFD_PAGEFAULT_FLAG_WRITE == 1 << 0
    assert _native.UFFD_PAGEFAULT_FLAG_MINOR == 1 << 2


def test_signatures():
    sig = {name: str(inspect.signature(getattr(_native, name))) for name in (
        "memfd_create", "fallocate", "ftruncate", "mmap", "chunk_hashes",
        "userfaultfd", "uffd_api", "uffd_register", "uffd_unregister",
        "uffd_copy", "uffd_copy_from", "uffd_zeropage", "uffd_continue",
        "uffd_wake", "uffd_writeprotect", "uffd_read")}
    assert sig["memfd_create"] == f"(name, flags={os.MFD_CLOEXEC})"
    assert sig["fallocate"] == "(fd, offset, length, mode=0)"
    assert sig["mmap"] == ("(fd, length, *, writable, offset=0, address=0, "
                           "fixed=False, populate=False)")
    assert sig["chunk_hashes"] == "(buffer, chunk_size, /)"
    assert sig["userfaultfd"] == f"(flags={os.O_CLOEXEC | os.O_NONBLOCK})"
    assert sig["uffd_copy"] == "(fd, dst, src, mode=0)"
    assert sig["uffd_copy_from"] == "(fd, dst, src_address, length, mode=0)"
    assert sig["uffd_read"] == "(fd, max_events=64)"
    assert sig["uffd_writeprotect"] == "(fd, address, length, mode)"
    assert str(inspect.signature(_native.Mapping.madvise)) == \
        "(self, /, advice, offset=0, length=None)"
    for name in sig:
        assert getattr(_native, name).__doc__


def test_mapping_cannot_be_created_from_python():
    with pytest.raises(TypeError, match=exact("cannot create 'Mapping' instances")):
        _native.Mapping()


def test_mmap_writable_is_required(memfd):
    with pytest.raises(TypeError, match="writable"):
        _native.mmap(memfd(1), PS)


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
    with pytest.raises(OSError) as info:
        m.madvise(12345)
    assert info.value.errno == errno.EINVAL


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


def test_errors_come_from_errno():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        _native.fallocate(r, 0, PS)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        _native.mmap(r, PS, writable=False)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        _native.ftruncate(r, 0)
    assert info.value.errno == errno.EBADF


LL_MAX = 2 ** 63 - 1


@pytest.mark.parametrize("call, msg", [
    (lambda fd: _native.fallocate(fd, -1, PS), "offset must be >= 0"),
    (lambda fd: _native.fallocate(fd, 0, 0), "length must be > 0"),
    (lambda fd: _native.fallocate(fd, 0, -PS), "length must be > 0"),
    (lambda fd: _native.fallocate(fd, LL_MAX, 1), "offset + length overflows"),
    (lambda fd: _native.ftruncate(fd, -1), "length must be >= 0"),
    (lambda fd: _native.mmap(fd, 0, writable=True),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.mmap(fd, -PS, writable=True),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.mmap(fd, PS + 1, writable=True),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.mmap(fd, PS, writable=True, offset=-PS),
     "offset must be a non-negative multiple of the page size"),
    (lambda fd: _native.mmap(fd, PS, writable=True, offset=100),
     "offset must be a non-negative multiple of the page size"),
    (lambda fd: _native.mmap(fd, PS, writable=True, address=PS + 1),
     "address must be a multiple of the page size"),
    (lambda fd: _native.mmap(fd, PS, writable=True, fixed=True),
     "fixed mapping needs an address"),
    (lambda fd: _native.mmap(fd, PS, writable=True, address=2 ** 64 - PS, fixed=True),
     "address + length overflows"),
    (lambda fd: _native.mmap(fd, 2 * PS, writable=True, offset=(LL_MAX // PS) * PS),
     "offset + length overflows"),
    (lambda fd: _native.chunk_hashes(b"abc", 0), "chunk_size must be a positive multiple of 8"),
    (lambda fd: _native.chunk_hashes(b"abc", 12), "chunk_size must be a positive multiple of 8"),
    (lambda fd: _native.chunk_hashes(b"abc", -8), "chunk_size must be a positive multiple of 8"),
    (lambda fd: _native.uffd_register(-1, PS + 1, PS, 1),
     "address must be a multiple of the page size"),
    (lambda fd: _native.uffd_register(-1, PS, 0, 1),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_register(-1, 2 ** 64 - PS, PS, 1), "address + length overflows"),
    (lambda fd: _native.uffd_unregister(-1, PS, 100),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_wake(-1, 7, PS), "address must be a multiple of the page size"),
    (lambda fd: _native.uffd_copy(-1, PS, b"x" * (PS - 1)),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_copy(-1, PS, b""),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_copy(-1, 1, b"x" * PS), "address must be a multiple of the page size"),
    (lambda fd: _native.uffd_copy_from(-1, PS, PS, 0),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_copy_from(-1, PS + 8, PS, PS),
     "address must be a multiple of the page size"),
    (lambda fd: _native.uffd_copy_from(-1, PS, 2 ** 64 - 1, PS), "address + length overflows"),
    (lambda fd: _native.uffd_zeropage(-1, PS, -PS),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_continue(-1, 3, PS), "address must be a multiple of the page size"),
    (lambda fd: _native.uffd_read(-1, 0), "max_events must be > 0"),
    (lambda fd: _native.uffd_writeprotect(-1, PS + 1, PS, 1),
     "address must be a multiple of the page size"),
    (lambda fd: _native.uffd_writeprotect(-1, PS, 0, 1),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_writeprotect(-1, PS, PS - 1, 1),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_writeprotect(-1, 2 ** 64 - PS, PS, 1), "address + length overflows"),
])
def test_value_error_messages(memfd, call, msg):
    with pytest.raises(ValueError, match=exact(msg)):
        call(memfd(1))


# --------------------------------------------------------------------------
# chunk_hashes (XXH64, seed 0)

M64 = 2 ** 64 - 1
P1, P2, P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
P4, P5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M64


def _round(acc, lane):
    return _rotl((acc + lane * P2) & M64, 31) * P1 & M64


def xxh64(data):
    """Reference XXH64 with seed 0, straight from the specification."""
    n, i = len(data), 0
    if n >= 32:
        v = [(P1 + P2) & M64, P2, 0, (-P1) & M64]
        while i + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], int.from_bytes(data[i + 8 * k:i + 8 * k + 8], "little"))
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & M64
        for k in range(4):
            h = ((h ^ _round(0, v[k])) * P1 + P4) & M64
    else:
        h = P5
    h = (h + n) & M64
    while i + 8 <= n:
        h ^= _round(0, int.from_bytes(data[i:i + 8], "little"))
        h = (_rotl(h, 27) * P1 + P4) & M64
        i += 8
    if i + 4 <= n:
        h ^= int.from_bytes(data[i:i + 4], "little") * P1 & M64
        h = (_rotl(h, 23) * P2 + P3) & M64
        i += 4
    while i < n:
        h ^= data[i] * P5 & M64
        h = _rotl(h, 11) * P1 & M64
        i += 1
    h ^= h >> 33
    h = h * P2 & M64
    h ^= h >> 29
    h = h * P3 & M64
    return h ^ (h >> 32)


def unpack(hashes):
    return list(struct.unpack(f"<{len(hashes) // 8}Q", hashes))


def test_chunk_hashes_is_xxh64():
    assert xxh64(b"") == 0xEF46DB3751D8E999  # the published test vector
    assert _native.chunk_hashes(b"", 8) == b""
    data = os.urandom(1000)
    for n in (1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 100, 1000):
        assert unpack(_native.chunk_hashes(data[:n], 1024)) == [xxh64(data[:n])]
    assert unpack(_native.chunk_hashes(data, 96)) == [
        xxh64(data[i:i + 96]) for i in range(0, 1000, 96)]


def test_chunk_hashes_detects_the_changed_chunk():
    data = bytearray(os.urandom(10 * 4096 + 100))
    hashes = _native.chunk_hashes(data, 4096)
    assert len(hashes) == 8 * 11  # the last chunk is short
    assert _native.chunk_hashes(bytes(data), 4096) == hashes  # equal data, equal hashes
    assert len(set(unpack(hashes))) == 11
    data[5 * 4096 + 17] ^= 1
    changed = unpack(_native.chunk_hashes(data, 4096))
    assert [i for i, (a, b) in enumerate(zip(unpack(hashes), changed)) if a != b] == [5]
    data[-1] ^= 0x80
    changed2 = unpack(_native.chunk_hashes(data, 4096))
    assert [i for i, (a, b) in enumerate(zip(changed, changed2)) if a != b] == [10]
    assert len(_native.chunk_hashes(data, 8)) == 8 * ((len(data) + 7) // 8)
    assert len(_native.chunk_hashes(data, 2 ** 40)) == 8


def test_chunk_hashes_of_a_mapping(memfd, mapper):
    fd = memfd(pages=3)
    os.pwrite(fd, b"segment bytes", PS)
    m = mapper(fd, 3 * PS, writable=False)
    hashes = _native.chunk_hashes(m, PS)
    assert m.exports == 0
    assert unpack(hashes) == [xxh64(os.pread(fd, PS, i * PS)) for i in range(3)]
    assert hashes[:8] == hashes[16:] != hashes[8:16]


def test_chunk_hashes_rejects_non_contiguous_buffers():
    with pytest.raises(BufferError):
        _native.chunk_hashes(memoryview(bytes(64))[::2], 8)
    with pytest.raises(TypeError):
        _native.chunk_hashes("text", 8)


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


# --------------------------------------------------------------------------
# userfaultfd write-protect, from another process (what the agent does to a
# revoked writer: node/revoke.py)

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
    uffd = uffd_open(0)
    try:
        m = mapper(memfd(1), PS)
        with pytest.raises(OSError) as info:
            _native.uffd_writeprotect(uffd, m.address, PS, _native.UFFDIO_WRITEPROTECT_MODE_WP)
        assert info.value.errno == errno.ENOENT
    finally:
        os.close(uffd)
