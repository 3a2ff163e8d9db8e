"""Human sizes: parse "64MiB" / "1GiB" / "4096" and print bytes readably."""
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


def format_size(num: int) -> str:
    """``num`` bytes in the largest binary unit that keeps it >= 1: "64.0 MiB"."""
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
