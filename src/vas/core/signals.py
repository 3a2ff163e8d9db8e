"""Signal handlers that end a loop waiting on a ``threading.Event``.

Why a thread: a Python handler runs in the main thread between two bytecodes, possibly
while that thread is inside ``event.wait()`` holding the event's internal lock; calling
``event.set()`` right there takes the same non-reentrant lock and deadlocks (seen:
``vasctl up`` hung on a SIGINT). Set from a new thread, the event waits for the lock like
any other caller, and the main thread's wait returns.
"""
from __future__ import annotations

import threading


def setting(event: threading.Event):
    """A signal handler that sets ``event``. Example:
    ``signal.signal(signal.SIGTERM, setting(stop))``."""
    def handle(_signum, _frame) -> None:
        threading.Thread(target=event.set, name="vas-signal", daemon=True).start()
    return handle
