"""Client processes a test starts and waits for with a deadline, never leaving one behind."""
from __future__ import annotations

import os
import queue
import signal
import time


def run_workers(processes: list, results, deadline: float, on_stuck=None) -> list:
    """Start ``processes``, take one report each from the queue ``results`` until
    ``deadline`` (a ``time.monotonic()`` value), join them, and kill any still alive
    then (``on_stuck(process)`` first: e.g. to have it dump its stacks); the reports
    received (fewer than the processes when some did not report)."""
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
                if on_stuck is not None:
                    on_stuck(process)
                process.kill()
                process.join(5)
    return reports


def dump_stacks(process, path: str, wait: float = 2.0) -> str:
    """Ask ``process`` (which registered ``faulthandler`` on SIGUSR1 into ``path``) for
    its threads' stacks; what it wrote, with where its threads wait in the kernel."""
    try:
        os.kill(process.pid, signal.SIGUSR1)
    except ProcessLookupError:
        return ""
    end = time.monotonic() + wait
    while time.monotonic() < end and not (os.path.exists(path) and os.path.getsize(path)):
        time.sleep(0.05)
    time.sleep(0.2)  # the rest of the threads
    text = open(path).read() if os.path.exists(path) else "(no stacks written)"
    try:
        tasks = sorted(os.listdir(f"/proc/{process.pid}/task"))
    except OSError:
        tasks = []
    for task in tasks:
        try:
            with open(f"/proc/{process.pid}/task/{task}/wchan") as wchan:
                text += f"\nthread {task} waits in {wchan.read() or '-'}"
        except OSError:
            pass
    return text
