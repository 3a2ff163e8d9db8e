"""vas._native.chunk_hashes: XXH64 (seed 0) of every chunk of a buffer.

Checked against a reference XXH64 written from the specification; a changed byte
changes only its chunk's hash; mappings and non-contiguous buffers.
Real syscalls, no mocks; fixtures (with the fd-leak check) in conftest.py beside this file.
"""
import os
import struct

import pytest

from native_checks import PS
from vas import _native


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
