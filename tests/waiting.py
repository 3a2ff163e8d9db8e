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


def in_userfault(pid: int) -> bool:
    """Whether process ``pid``'s main thread sleeps in a userfaultfd page fault (a
    condition for ``wait_for``: the kernel names the wait in /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/wchan") as wchan:
            return wchan.read() == "handle_userfault"
    except OSError:
        return False
