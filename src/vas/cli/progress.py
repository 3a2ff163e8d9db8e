"""The one-line progress display of ``vasctl seg put`` and ``seg get``.

Drawn on stderr only when stderr is a terminal (and, for ``get`` to stdout, when
stdout is not that terminal too), redrawn at most every 0.1 s: bytes done, the
total and percentage when known, the mean rate since the start and the time
left at that rate. Piped or redirected, it draws nothing.

    put big [#########                     ] 9.0 MiB / 30.0 MiB  30%  85.3 MiB/s  ETA 0:00
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from vas.core.sizes import format_size

#: Seconds between two redraws.
REDRAW_SECONDS = 0.1
#: Width of the bar, characters.
BAR_WIDTH = 30


def format_eta(seconds: float) -> str:
    """Seconds as H:MM:SS, or M:SS under an hour.

    >>> format_eta(75.4)
    '1:15'
    """
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def show_progress(to_stdout: bool) -> bool:
    """Whether ``get`` draws progress: only on a terminal stderr, and never where it would
    mix with data written to that terminal (``to_stdout``: the data goes to stdout)."""
    return sys.stderr.isatty() and not (to_stdout and sys.stdout.isatty())


class Progress:
    """A one-line progress display; ``advance`` after each piece, ``finish`` at the end.

    :param label: what moves, e.g. "get NAME".
    :param total: bytes expected, None when unknown (stdin).
    :param enabled: draw at all; default: whether ``out`` is a terminal.
    """

    def __init__(self, label: str, total: int | None, enabled: bool | None = None,
                 out: TextIO | None = None):
        self.label = label
        self.total = total
        self.done = 0
        self.out = out or sys.stderr
        self.enabled = self.out.isatty() if enabled is None else enabled
        self._start = time.monotonic()
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= REDRAW_SECONDS:
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The text drawn at ``now`` (monotonic seconds)."""
        elapsed = max((time.monotonic() if now is None else now) - self._start, 1e-6)
        rate = self.done / elapsed
        speed = f"{format_size(int(rate))}/s"
        if not self.total:
            return f"{self.label} {format_size(self.done)}  {speed}"
        frac = min(1.0, self.done / self.total)
        eta = format_eta((self.total - self.done) / rate) if rate > 0 else "-"
        return (f"{self.label} [{'#' * int(frac * BAR_WIDTH):<{BAR_WIDTH}}] "
                f"{format_size(self.done)} / {format_size(self.total)} {frac:4.0%}  "
                f"{speed}  ETA {eta}")

    def _draw(self, now: float | None = None) -> None:
        # \r back to the line's start, \033[K clears what a longer line left behind.
        self.out.write(f"\r{self.line(now)}\033[K")
        self.out.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw()
            self.out.write("\n")
            self.out.flush()
