"""One thread that calls ``action(key, retries)`` at monotonic deadlines.

Used for the expiry of segments created with a ttl (node/homes.py): a heap of
(deadline, key, retries), one thread sleeping until the earliest.
"""
from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable

from vas.node import locks

log = logging.getLogger(__name__)


class Timer:
    """``arm(key, deadline)`` then ``run(stop)`` in a thread; ``wake()`` after ``stop`` is set."""

    def __init__(self, action: Callable[[int, int], None], name: str):
        self._action = action
        self._name = name
        self._cv = threading.Condition(locks.Lock(f"timer {name}", locks.Rank.TIMER))
        self._heap: list[tuple[float, int, int]] = []
        self._stopped = False

    def arm(self, key: int, deadline: float, retries: int = 0) -> None:
        """Call the action for ``key`` at ``deadline`` (``time.monotonic()``)."""
        with self._cv:
            heapq.heappush(self._heap, (deadline, key, retries))
            if self._heap[0][1] == key:  # a new earliest deadline: wake the thread
                self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def run(self) -> None:
        while True:
            with self._cv:
                if self._stopped:
                    return
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap))
                if not due:
                    # A bounded sleep even with nothing armed: stop() also notifies.
                    self._cv.wait(min(self._heap[0][0] - now, 60.0) if self._heap else 60.0)
                    continue
            for _, key, retries in due:
                try:
                    self._action(key, retries)
                except Exception:  # one bad key must not end the timer
                    log.exception("%s timer failed for %d", self._name, key)
