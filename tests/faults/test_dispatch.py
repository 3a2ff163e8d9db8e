"""The local worker pool (vas.node.dispatch): per-uid quota, root's worker, order.

Threads offer tasks from a queue, as node/local.py's threads offer the
requests they read. Tasks block on events the test sets, so every assertion is
about a state the pool reached (waited for with a deadline), never about timing.
"""
from __future__ import annotations

import functools
import queue
import threading

import pytest

import waiting
from vas.node.dispatch import Dispatcher

DEADLINE = 10.0
wait_for = functools.partial(waiting.wait_for, timeout=DEADLINE)


class Tasks:
    """Tasks that record when they start and end only when released."""

    def __init__(self):
        self.started: list[str] = []
        self.release = threading.Event()
        self._lock = threading.Lock()

    def task(self, name: str, blocking: bool = True):
        def run():
            with self._lock:
                self.started.append(name)
            if blocking:
                assert self.release.wait(DEADLINE), f"task {name} was never released"
        return run

    def of(self, prefix: str) -> list[str]:
        with self._lock:
            return [name for name in self.started if name.startswith(prefix)]


class FakeServer:
    """``workers + 1`` threads that offer what ``submit`` queues, as node/local.py's
    threads offer the requests they read."""

    def __init__(self, workers: int, per_uid: int):
        self.dispatcher = Dispatcher(workers, per_uid)
        self._events: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(workers + 1)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while True:
            event = self._events.get(timeout=DEADLINE)
            if event is None:
                return
            job = self.dispatcher.offer(*event)
            while job is not None:
                try:
                    job[1]()
                except Exception:  # noqa: BLE001  (as the server: a failing task is logged)
                    pass
                job = self.dispatcher.done(job)

    def submit(self, uid: int, task) -> None:
        self._events.put((uid, task))

    def running(self, uid: int) -> int:
        return self.dispatcher.running(uid)

    def stop(self) -> None:
        for _ in self._threads:
            self._events.put(None)
        for thread in self._threads:
            thread.join(DEADLINE)
            assert not thread.is_alive(), "a thread did not end"


@pytest.fixture
def pool():
    servers = []

    def make(workers: int, per_uid: int) -> FakeServer:
        servers.append(FakeServer(workers, per_uid))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def test_one_uid_runs_at_most_its_quota_and_others_still_run(pool):
    dispatcher, tasks = pool(4, 2), Tasks()
    for i in range(6):
        dispatcher.submit(1000, tasks.task(f"a{i}"))
    wait_for(lambda: len(tasks.of("a")) == 2, "uid 1000's quota of 2 running")
    dispatcher.submit(2000, tasks.task("b0", blocking=False))
    wait_for(lambda: tasks.of("b") == ["b0"], "uid 2000's task past uid 1000's queue")
    assert tasks.of("a") == ["a0", "a1"] and dispatcher.running(1000) == 2
    tasks.release.set()
    wait_for(lambda: len(tasks.of("a")) == 6, "the rest of uid 1000's tasks")
    assert tasks.of("a") == [f"a{i}" for i in range(6)]  # in the order submitted


def test_uids_together_leave_a_worker_to_root(pool):
    dispatcher, tasks = pool(3, 3), Tasks()
    for uid in (1000, 2000, 3000):
        dispatcher.submit(uid, tasks.task(f"u{uid}"))
    wait_for(lambda: len(tasks.of("u")) == 2, "two non-root tasks running")
    dispatcher.submit(0, tasks.task("root", blocking=False))
    wait_for(lambda: tasks.of("root") == ["root"], "root's task on the kept worker")
    assert len(tasks.of("u")) == 2  # the third uid waits for a non-root slot
    tasks.release.set()
    wait_for(lambda: len(tasks.of("u")) == 3, "the third uid's task")


def test_a_failing_task_costs_no_worker(pool):
    dispatcher, tasks = pool(1, 1), Tasks()

    def fail():
        raise RuntimeError("boom")
    dispatcher.submit(5, fail)
    dispatcher.submit(5, tasks.task("after", blocking=False))
    wait_for(lambda: tasks.of("after") == ["after"], "the task after a failing one")


def test_a_single_worker_serves_non_root_uids(pool):
    dispatcher, tasks = pool(1, 1), Tasks()
    dispatcher.submit(1000, tasks.task("only", blocking=False))
    wait_for(lambda: tasks.of("only") == ["only"], "a non-root task on the only worker")


def test_at_most_workers_run_at_once(pool):
    dispatcher, tasks = pool(2, 2), Tasks()
    for i in range(3):
        dispatcher.submit(0, tasks.task(f"r{i}"))
    wait_for(lambda: len(tasks.of("r")) == 2, "two of root's tasks running")
    assert dispatcher.running(0) == 2  # the third waits: one thread stays free for events
    tasks.release.set()
    wait_for(lambda: len(tasks.of("r")) == 3, "root's third task")
