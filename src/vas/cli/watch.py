"""``--watch`` of listings (``seg ls``, ``node ls``): print again on every change.

The local agent's protocol has no watch of its own, so the listing is fetched every
``POLL_INTERVAL`` seconds over one connection and printed only when its text differs
from the last one printed (any field: a new segment, a state, a count of attachments).
On a terminal each listing replaces the last (the screen is cleared first); into a pipe
or a file they follow each other, a blank line apart: a stream of JSON values reads with
``jq``, YAML documents each start with ``---``.

It runs until interrupted: Ctrl-C raises KeyboardInterrupt out of the sleep or the
request in progress, and vasctl's main exits 130 as for any interrupted command.
"""
from __future__ import annotations

import io
import sys
import time
from typing import Callable, NoReturn, TextIO, TypeVar

#: Seconds between two fetches of a watched listing.
POLL_INTERVAL = 0.5

#: ANSI: cursor home, then erase the whole screen.
CLEAR_SCREEN = "\033[H\033[2J"

Listing = TypeVar("Listing")


def follow(fetch: Callable[[], Listing], render: Callable[[Listing, TextIO], None],
           out: TextIO | None = None, interval: float = POLL_INTERVAL) -> NoReturn:
    """Print ``render(fetch())`` to ``out`` now and whenever it changes, until interrupted."""
    out = out or sys.stdout
    on_terminal = out.isatty()
    last = None
    while True:
        text = rendered(render, fetch())
        if text != last:
            if on_terminal:
                out.write(CLEAR_SCREEN)
            elif last is not None:
                out.write("\n")
            out.write(text)
            out.flush()
            last = text
        time.sleep(interval)


def rendered(render: Callable[[Listing, TextIO], None], listing: Listing) -> str:
    """What ``render`` prints for ``listing``, as a string."""
    buffer = io.StringIO()
    render(listing, buffer)
    return buffer.getvalue()
