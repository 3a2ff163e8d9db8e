"""Human sizes: parse "64MiB" / "1GiB" / "4096" and print bytes readably.

``format_size`` is for tables and progress ("64.0 MiB"); ``human_size`` for messages
("4 GiB", "3.9 GiB"): every message that states a size uses it, so no one reads
"4227854336 of 4294967296 bytes". Exact byte counts stay in JSON output.
"""
from __future__ import annotations

import re

from vas.core.errors import InvalidArgument

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes in ``text``: "4096", "64KiB", "1.5GiB", "10MB" (KB/MB/GB are powers of 1000).

    >>> parse_size("64MiB")
    67108864
    """
    match = _SIZE_RE.fullmatch(str(text))
    unit = match and _UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise InvalidArgument(f"invalid size {text!r}: expected a number with an optional unit "
                              "(B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    value = float(match.group(1)) * unit
    if value != int(value):
        raise InvalidArgument(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _binary_unit(num: int) -> tuple[str, int]:
    """The largest binary unit that keeps ``num`` >= 1 (TiB at most), with its bytes."""
    for power, unit in enumerate(_BINARY_UNITS):
        if abs(num) < 1024 ** (power + 1) or unit == _BINARY_UNITS[-1]:
            return unit, 1024 ** power
    raise AssertionError("unreachable")


def format_size(num: int) -> str:
    """``num`` bytes in the largest binary unit that keeps it >= 1, one decimal: "64.0 MiB"
    (the fixed decimal keeps table columns and progress bars steady)."""
    unit, scale = _binary_unit(num)
    return f"{num} B" if scale == 1 else f"{num / scale:.1f} {unit}"


def human_size(num: int) -> str:
    """``num`` (>= 0) bytes for a message: whole units without a decimal ("4 GiB",
    "8 KiB"), others cut to one decimal, never rounded up to the next unit's worth: a
    node with 8 KiB used of 256 MiB has "255.9 MiB" free, not "256.0". A size that still
    reads as whole (just over it) says its bytes too: a limit and a size one byte over it
    never print alike.

    >>> human_size(4227854336), human_size(4 << 30), human_size(8193)
    ('3.9 GiB', '4 GiB', '8.0 KiB (8193 bytes)')
    """
    unit, scale = _binary_unit(num)
    if num % scale == 0:
        return f"{num // scale} {unit}"
    tenths = num * 10 // scale
    text = f"{tenths // 10}.{tenths % 10} {unit}"
    return f"{text} ({num} bytes)" if tenths % 10 == 0 else text
