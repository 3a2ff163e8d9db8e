"""Fuzz vas._native in this process: ``python native_fuzz.py EXAMPLES [--derandomize]``
(the suite's fixed inputs, else random ones) prints one JSON
line ``{"calls": {function: count}}`` and exits 0, or fails with the first input that
raised anything but the documented errors (ValueError, OverflowError, TypeError,
OSError). A crash of the extension ends the process with a signal: test_fuzz_native.py
runs this in a child so that the test reports it instead of dying with it.

Inputs are hostile where the extension must check them (types, negative, unaligned,
overflowing and huge sizes, offsets and addresses; closed fds, fds of the wrong kind)
but never ask the kernel for real harm: no length that would allocate gigabytes
(fallocate, populate), no userfaultfd registration over this process's own memory
(a fault there would wait for ever), no blocking fd to read.
"""
from __future__ import annotations

import collections
import json
import os
import socket
import sys

from hypothesis import HealthCheck, given, settings, strategies as st

from vas import _native

PAGE = _native.PAGE_SIZE
#: Sizes the kernel may honour cheaply: none allocates more than 1 MiB.
SMALL = st.one_of(st.sampled_from([0, 1, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE]),
                  st.integers(0, 1 << 20))
#: Sizes the extension (or the kernel, before allocating) must refuse.
HOSTILE = st.sampled_from([-1, -PAGE, -(1 << 63), (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
                           1 << 64, 1 << 100, -(1 << 100)])
SIZES = st.one_of(SMALL, HOSTILE)
#: Addresses where nothing of this process lives: the kernel half, unaligned ones, 0.
ADDRESSES = st.one_of(st.sampled_from([0, 1, PAGE - 1, 1 << 47, (1 << 64) - PAGE,
                                       (1 << 64) - 1, 1 << 64, -PAGE]),
                      st.integers(1 << 47, (1 << 64) - 1))
WRONG_TYPES = st.sampled_from([None, "4096", 4096.0, b"x", [], object(), True])
EXPECTED = (ValueError, OverflowError, TypeError, OSError)
CALLS: collections.Counter = collections.Counter()


class Fds:
    """One fd of each kind, opened once: the kinds a hostile caller may pass."""

    def __init__(self):
        self.memfd = _native.memfd_create("fuzz")
        os.ftruncate(self.memfd, 4 * PAGE)
        self.uffd = _native.userfaultfd()  # non-blocking: uffd_read never waits
        _native.uffd_api(self.uffd)
        read_end, self._write_end = os.pipe2(os.O_NONBLOCK)
        self._pair = socket.socketpair()
        self._pair[0].setblocking(False)
        self.kinds = {
            "memfd": self.memfd, "uffd": self.uffd, "pipe": read_end,
            "socket": self._pair[0].fileno(), "devnull": os.open(os.devnull, os.O_RDONLY),
            "directory": os.open("/", os.O_RDONLY | os.O_DIRECTORY),
            "closed": self._closed(), "negative": -1, "huge": 1 << 31,
        }

    @staticmethod
    def _closed() -> int:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.close(fd)
        return fd


FDS = Fds()
FD = st.one_of(st.sampled_from(sorted(FDS.kinds)).map(FDS.kinds.get), WRONG_TYPES)
NOT_UFFD = st.sampled_from(sorted(set(FDS.kinds) - {"uffd"})).map(FDS.kinds.get)


def call(name: str, function, *args, **kwargs):
    CALLS[name] += 1
    try:
        return function(*args, **kwargs)
    except EXPECTED:
        return None


def close_result(result) -> None:
    if isinstance(result, int) and result > 2 and result not in FDS.kinds.values():
        os.close(result)
    elif isinstance(result, _native.Mapping):
        result.close()


def _memory_calls(draw):
    which = draw(st.sampled_from(["memfd_create", "fallocate", "ftruncate", "mmap",
                                  "madvise", "chunk_hashes"]))
    if which == "memfd_create":
        name = draw(st.one_of(st.text(max_size=300), WRONG_TYPES))
        return which, _native.memfd_create, (name,), {"flags": draw(
            st.one_of(st.integers(-(1 << 31), (1 << 31) - 1), WRONG_TYPES))}
    if which == "fallocate":
        mode = draw(st.sampled_from([0, _native.FALLOC_FL_KEEP_SIZE, -1, 1 << 40,
                                     _native.FALLOC_FL_PUNCH_HOLE
                                     | _native.FALLOC_FL_KEEP_SIZE]))
        return which, _native.fallocate, (draw(FD), draw(SIZES), draw(SIZES), mode), {}
    if which == "ftruncate":  # a memfd only: truncating a real file would harm it
        return which, _native.ftruncate, (draw(st.sampled_from(
            [FDS.memfd, -1, FDS.kinds["closed"], FDS.kinds["pipe"]])), draw(SIZES)), {}
    if which == "mmap":
        length = draw(SIZES)
        populate = draw(st.booleans()) and isinstance(length, int) and length <= 1 << 20
        return which, _native.mmap, (draw(FD), length), {
            "writable": draw(st.one_of(st.booleans(), WRONG_TYPES)),
            "offset": draw(SIZES), "address": draw(st.one_of(ADDRESSES, WRONG_TYPES)),
            "fixed": draw(st.booleans()), "populate": populate}
    if which == "madvise":
        advice = draw(st.one_of(st.integers(-5, 120), WRONG_TYPES))
        return which, _madvise, (advice,), {
            "offset": draw(SIZES), "length": draw(st.one_of(SIZES, st.none()))}
    buffer = draw(st.one_of(st.binary(max_size=3 * PAGE), WRONG_TYPES))
    return which, _native.chunk_hashes, (buffer, draw(st.one_of(SIZES, WRONG_TYPES))), {}


def _madvise(advice, **kwargs) -> None:
    """Mapping.madvise on a fresh mapping of the memfd (unmapped after)."""
    with _native.mmap(FDS.memfd, 4 * PAGE, writable=True) as mapping:
        mapping.madvise(advice, **kwargs)


def _uffd_calls(draw):
    which = draw(st.sampled_from(["userfaultfd", "uffd_api", "uffd_register",
                                  "uffd_unregister", "uffd_copy", "uffd_copy_from",
                                  "uffd_zeropage", "uffd_continue", "uffd_poison",
                                  "uffd_wake", "uffd_writeprotect", "uffd_read"]))
    function = getattr(_native, which)
    if which == "userfaultfd":  # always non-blocking: a later read must not wait
        return which, function, (draw(st.sampled_from(
            [os.O_NONBLOCK | os.O_CLOEXEC, os.O_NONBLOCK | _native.UFFD_USER_MODE_ONLY,
             -1, 1 << 40])),), {}
    if which == "uffd_api":
        return which, function, (draw(NOT_UFFD),), {"features": draw(SIZES)}
    if which == "uffd_read":
        return which, function, (draw(FD),), {"max_events": draw(SIZES)}
    fd = draw(FD)
    address, length = draw(ADDRESSES), draw(SIZES)
    if which == "uffd_copy":
        return which, function, (fd, address, draw(st.one_of(st.binary(max_size=PAGE),
                                                             WRONG_TYPES))), {}
    if which == "uffd_copy_from":
        return which, function, (fd, address, draw(ADDRESSES), length), {}
    if which in ("uffd_register", "uffd_writeprotect"):
        return which, function, (fd, address, length, draw(SIZES)), {}
    if which in ("uffd_unregister", "uffd_wake"):
        return which, function, (fd, address, length), {}
    return which, function, (fd, address, length), {"mode": draw(SIZES)}


def main(examples: int, derandomize: bool) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data):
        drawer = data.draw(st.sampled_from([_memory_calls, _uffd_calls]))
        which, function, args, kwargs = data.draw(st.composite(
            lambda draw: drawer(draw))())
        close_result(call(which, function, *args, **kwargs))

    fuzz()
    print(json.dumps({"calls": CALLS}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), derandomize="--derandomize" in sys.argv[2:])
