"""The shape of vas._native and its error conventions.

Constants against the system's, signatures and docstrings; Mapping cannot be made from
Python; every bounds check raises ValueError with its exact message before any syscall;
syscall failures are OSError from errno.
Real syscalls, no mocks; fixtures (with the fd-leak check) in conftest.py beside this file.
"""
import errno
import inspect
import mmap as pymmap
import os

import pytest

from native_checks import PS, exact
from vas import _native


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
    assert _native.UFFD_FEATURE_POISON == 1 << 14
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
        "uffd_poison", "uffd_wake", "uffd_writeprotect", "uffd_read", "process_vm_readv")}
    assert sig["memfd_create"] == f"(name, flags={os.MFD_CLOEXEC})"
    assert sig["fallocate"] == "(fd, offset, length, mode=0, *, idle=False)"
    assert sig["mmap"] == ("(fd, length, *, writable, offset=0, address=0, "
                           "fixed=False, populate=False)")
    assert sig["chunk_hashes"] == "(buffer, chunk_size, /)"
    assert sig["userfaultfd"] == f"(flags={os.O_CLOEXEC | os.O_NONBLOCK})"
    assert sig["uffd_copy"] == "(fd, dst, src, mode=0)"
    assert sig["uffd_copy_from"] == "(fd, dst, src_address, length, mode=0)"
    assert sig["uffd_read"] == "(fd, max_events=64)"
    assert sig["uffd_poison"] == "(fd, address, length, mode=0)"
    assert sig["uffd_writeprotect"] == "(fd, address, length, mode)"
    assert sig["process_vm_readv"] == "(pid, dst, address)"
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
# errors: OSError from errno, exact ValueError messages of the bounds checks


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
    (lambda fd: _native.uffd_poison(-1, PS + 1, PS), "address must be a multiple of the page size"),
    (lambda fd: _native.uffd_poison(-1, PS, PS - 1),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_poison(-1, PS, 0),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_poison(-1, 2 ** 64 - PS, PS), "address + length overflows"),
    (lambda fd: _native.uffd_read(-1, 0), "max_events must be 1..4096"),
    # Found fuzzing: the buffer of 2**63-1 events was allocated (MemoryError, or GiBs).
    (lambda fd: _native.uffd_read(-1, 2 ** 63 - 1), "max_events must be 1..4096"),
    (lambda fd: _native.uffd_read(-1, 4097), "max_events must be 1..4096"),
    (lambda fd: _native.uffd_writeprotect(-1, PS + 1, PS, 1),
     "address must be a multiple of the page size"),
    (lambda fd: _native.uffd_writeprotect(-1, PS, 0, 1),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_writeprotect(-1, PS, PS - 1, 1),
     "length must be a positive multiple of the page size"),
    (lambda fd: _native.uffd_writeprotect(-1, 2 ** 64 - PS, PS, 1), "address + length overflows"),
    (lambda fd: _native.process_vm_readv(0, bytearray(8), PS), "pid must be > 0"),
    (lambda fd: _native.process_vm_readv(os.getpid(), bytearray(8), 2 ** 64 - 4),
     "address + length overflows"),
])
def test_value_error_messages(memfd, call, msg):
    with pytest.raises(ValueError, match=exact(msg)):
        call(memfd(1))


def test_process_vm_readv_copies_from_a_process_and_reports_bad_ranges():
    import numpy as np

    source = np.frombuffer(os.urandom(3 * PS + 5), dtype=np.uint8)
    target = bytearray(source.nbytes)
    assert _native.process_vm_readv(os.getpid(), target, source.ctypes.data) == source.nbytes
    assert bytes(target) == source.tobytes()
    with memoryview(target) as view, view[PS:2 * PS] as part:  # a slice lands in place
        assert _native.process_vm_readv(os.getpid(), part, source.ctypes.data) == PS
    assert bytes(target[PS:2 * PS]) == source[:PS].tobytes()
    with pytest.raises(OSError) as raised:  # nothing mapped at page 0
        _native.process_vm_readv(os.getpid(), bytearray(8), 0)
    assert raised.value.errno == errno.EFAULT
    with pytest.raises(TypeError):  # the destination must be writable
        _native.process_vm_readv(os.getpid(), b"12345678", source.ctypes.data)
