"""What the phases of bench/remote.py share: the payload pattern and its check, deadlines,
loopback byte counts and small statistics.

The pattern (``fill``) is a random 1 MiB block repeated, each page stamped with a
position- and seed-dependent 8-byte value; ``checksum`` reads every page (1/512 of the
bytes), so a page that did not arrive changes it.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import signal
import statistics
import sys
import zlib

import numpy as np

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STAMP_MUL = np.uint64(0x9E3779B97F4A7C15)
# The entry point: children of the phases run it with its hidden --tcp-sender/--vas-fill.
REMOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote.py")


# -- helpers ------------------------------------------------------------------------------

def import_ray():
    """Ray itself, not bench/ray.py: a bench script's folder is first on sys.path. Only
    the import skips the folder (Ray's workers get the driver's path and import the bench
    modules by it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        import ray
    finally:
        sys.path[:] = saved
    return ray


class PhaseTimeout(Exception):
    """A phase ran past its deadline."""


class CheckFailed(Exception):
    """The bytes read back are not the bytes written."""


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Raise PhaseTimeout in this (main) thread if the block runs longer than ``seconds``."""
    def expired(signum, frame):
        raise PhaseTimeout(f"{what} took longer than {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stamps(first_page: int, count: int, seed: int) -> np.ndarray:
    """The 8-byte stamp at the start of each page: position- and seed-dependent."""
    pages = np.arange(first_page, first_page + count, dtype=np.uint64)
    return pages * STAMP_MUL + np.uint64(seed)


def stamp_byte(page: int, seed: int) -> int:
    """The first byte of page ``page`` (little-endian low byte of its stamp)."""
    return int(stamps(page, 1, seed)[0] & np.uint64(0xFF))


def fill(array: np.ndarray, seed: int) -> None:
    """Fill a page-aligned uint8 array (size a multiple of 1 MiB) with the bench pattern:
    a random 1 MiB block repeated, then each page's first 8 bytes set to its stamp."""
    block = np.random.default_rng(seed).integers(0, 256, MiB, dtype=np.uint8)
    array.reshape(-1, MiB)[:] = block
    array.view(np.uint64).reshape(-1, PAGE // 8)[:, 0] = stamps(0, array.size // PAGE, seed)


def checksum(array: np.ndarray) -> int:
    """CRC32 of 8 bytes every 512 of every page (reads every page, 1/512 of the bytes)."""
    sample = np.ascontiguousarray(array.reshape(-1, PAGE)[:, ::512])
    return zlib.crc32(sample.tobytes())


def lo_bytes() -> int:
    """Bytes sent on the loopback interface so far (0 when /proc/net/dev is unreadable)."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])  # transmit bytes
    except OSError:
        pass
    return 0


def fresh_buffer(size: int) -> np.ndarray:
    """A private anonymous page-aligned buffer, not touched yet (default page size policy)."""
    return np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads, live or ended)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def gbps(size: int, seconds: float) -> float:
    return size / seconds / 1e9


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
