"""Client processes a test starts and waits for with a deadline, never leaving one behind."""
from __future__ import annotations

import queue
import time


def run_workers(processes: list, results, deadline: float) -> list:
    """Start ``processes``, take one report each from the queue ``results`` until
    ``deadline`` (a ``time.monotonic()`` value), join them, and kill any still alive
    then; the reports received (fewer than the processes when some did not report)."""
    reports = []
    try:
        for process in processes:
            process.start()
        for _ in processes:
            try:
                reports.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                break
        for process in processes:
            process.join(max(0.1, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return reports
