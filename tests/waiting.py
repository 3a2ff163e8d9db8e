"""Waiting on a condition with a deadline: the tests' one polling loop (never sleep-and-hope)."""
from __future__ import annotations

import time


def wait_for(condition, what: str = "condition", timeout: float = 15.0, interval: float = 0.02):
    """Poll ``condition()`` until it returns a truthy value and return that value;
    fail the test with "timed out waiting for WHAT" after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
