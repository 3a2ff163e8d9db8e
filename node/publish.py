"""Chunk arithmetic of publishing (sync) and refreshing remote copies.

A segment is cut into ``CHUNK``-byte chunks (a multiple of the lazy-fill chunk,
so each hashed chunk covers whole fill chunks of a lazy replica's present map). A remote writer's agent hashes
its replica's chunks (XXH64 in C, ``vas._native.chunk_hashes``) at each sync and
sends only the chunks whose hash changed since the last one; a reader's agent
compares its chunks' hashes with the home's and fetches only those that differ.
"""
from __future__ import annotations

import contextlib

from vas import _native
from vas.core import validate
from vas.core.errors import InvalidArgument
from vas.core.sizes import human_size
from vas.node import lazy

#: Bytes per hashed chunk: what one changed byte costs a sync. A hash is 8 bytes per
#: chunk (1/32768 of the data), so a ChunkHashes reply stays under the agents' 8 MiB
#: message limit for segments up to 256 GiB.
CHUNK = 256 << 10
assert CHUNK % lazy.CHUNK == 0, "a hashed chunk must cover whole lazy-fill chunks"
#: Most bytes in one WritePages message or one run fetched at a time.
RUN = 2 << 20
#: Bytes of hashes ``differing`` compares at once before looking at single hashes.
_BLOCK = 4096


def hashes(view: memoryview) -> bytes:
    """XXH64 of each CHUNK of ``view`` (little-endian uint64s)."""
    return _native.chunk_hashes(view, CHUNK)


def zero_hashes(size: int) -> bytes:
    """The chunk hashes of ``size`` zero bytes (a new segment), without reading its pages.

    >>> zero_hashes(CHUNK + 4096)[:8] == hashes(memoryview(bytes(CHUNK)))
    True
    """
    full, tail = divmod(size, CHUNK)
    out = hashes(memoryview(bytes(CHUNK))) * full
    return out + hashes(memoryview(bytes(tail))) if tail else out


def differing(old: bytes, new: bytes) -> list[int]:
    """Indices of the chunks whose hashes differ between two equal-length hash strings.

    >>> differing(bytes(16), bytes(8) + b"x" * 8)
    [1]
    """
    if len(old) != len(new):
        raise ValueError(f"hash strings of {len(old)} and {len(new)} bytes")
    # Compare blocks of hashes first (memcmp) and words only in the blocks that differ:
    # no numpy here, whose import was a fifth of an agent's start-up CPU.
    found = []
    for start in range(0, len(old), _BLOCK):
        end = start + _BLOCK
        if old[start:end] != new[start:end]:
            found += [i // 8 for i in range(start, min(end, len(old)), 8)
                      if old[i:i + 8] != new[i:i + 8]]
    return found


def chunks_of(ranges, size: int) -> list[int]:
    """Indices of the chunks overlapping any of ``ranges`` ((offset, length) pairs),
    each checked to lie inside a segment of ``size`` bytes.

    >>> chunks_of([(0, 1), (CHUNK, 2 * CHUNK)], 4 * CHUNK)
    [0, 1, 2]
    """
    chunks: set[int] = set()
    for offset, length in ranges:
        validate.check_range(offset, length, size)
        if length:
            chunks.update(range(offset // CHUNK, -(-(offset + length) // CHUNK)))
    return sorted(chunks)


def runs(chunks: list[int], size: int, limit: int = RUN, chunk: int = CHUNK
         ) -> list[tuple[int, int]]:
    """(offset, length) byte runs covering the sorted indices ``chunks`` of ``chunk``-byte
    chunks of a segment of ``size`` bytes, consecutive ones merged up to ``limit`` bytes.

    >>> runs([0, 1, 3], 4 * CHUNK) == [(0, 2 * CHUNK), (3 * CHUNK, CHUNK)]
    True
    """
    out: list[tuple[int, int]] = []
    for index in chunks:
        start, end = index * chunk, min((index + 1) * chunk, size)
        if out and out[-1][0] + out[-1][1] == start and out[-1][1] + end - start <= limit:
            out[-1] = (out[-1][0], out[-1][1] + end - start)
        else:
            out.append((start, end - start))
    return out


@contextlib.contextmanager
def run_views(view: memoryview, chunks: list[int]):
    """(offset, view) of each run of ``chunks`` of ``view`` (``runs``), released on
    leaving, so the mapping under ``view`` can be closed after."""
    pieces = [(offset, view[offset:offset + length])
              for offset, length in runs(chunks, len(view))]
    try:
        yield pieces
    finally:
        for _, piece in pieces:
            piece.release()


def check_runs(runs: list[tuple[int, int]], size: int) -> int:
    """The bytes ``runs`` ((offset, length) pairs) of a publish add up to, each checked to
    lie inside a segment of ``size`` bytes and all together to be at most ``size`` (as
    ``Staged`` checks them), before any byte is received.

    >>> check_runs([(0, 4096), (CHUNK, 8192)], 2 * CHUNK)
    12288
    """
    total = 0
    for offset, length in runs:
        validate.check_range(offset, length, size)
        total += length
    if total > size:
        raise InvalidArgument(f"a publish of {human_size(total)}, more than the segment's "
                              f"{human_size(size)}")
    return total


def pieces_of(runs: list[tuple[int, int]], data: memoryview) -> list[tuple[int, memoryview]]:
    """(offset, bytes) of each of ``runs``, whose bytes follow one another in ``data``.

    >>> [(o, bytes(d)) for o, d in pieces_of([(8, 2), (0, 1)], memoryview(b"abc"))]
    [(8, b'ab'), (0, b'c')]
    """
    pieces, at = [], 0
    for offset, length in runs:
        pieces.append((offset, data[at:at + length]))
        at += length
    return pieces


class Staged:
    """Bytes a remote writer sent for a publish, kept aside until the token is checked.

    Bounds: every piece lies inside the segment, and all pieces together are at
    most the segment's size (a writer never needs to send more).
    """

    def __init__(self, size: int):
        self.size = size
        self.total = 0
        self.pieces: list[tuple[int, bytes]] = []

    def add(self, offset: int, data: bytes) -> None:
        validate.check_range(offset, len(data), self.size)
        self.total += len(data)
        if self.total > self.size:
            raise InvalidArgument(
                f"a publish sent {human_size(self.total)}, more than the segment's "
                f"{human_size(self.size)}")
        if data:
            self.pieces.append((offset, data))


def stale_runs(view: memoryview, remote: bytes, present: bytes | None
               ) -> list[tuple[int, int]]:
    """Byte runs of ``view`` to fetch again so that it matches the home's chunk hashes
    ``remote``. For a lazy replica only its ``present`` fill chunks count (a missing
    one is fetched at the home's newest state when first touched): a hashed chunk
    with any present part is compared, and if it differs only its present parts are
    fetched (so no missing page is filled behind the fault handler's back)."""
    size = len(view)
    if present is None:
        return runs(differing(hashes(view), remote), size)
    per = CHUNK // lazy.CHUNK
    parts = []
    for index in range(-(-size // CHUNK)):
        here = [j for j in range(index * per, min((index + 1) * per, len(present)))
                if present[j]]
        if not here:
            continue
        start = index * CHUNK
        with view[start:min(start + CHUNK, size)] as part:
            if hashes(part) == remote[8 * index:8 * index + 8]:
                continue
        parts += here
    return runs(parts, size, chunk=lazy.CHUNK)
