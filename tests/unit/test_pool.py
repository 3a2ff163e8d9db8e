"""The warm pool (node/pool.py): real memfds and its real thread (refill and releases),
no daemons."""
from __future__ import annotations

import os
import threading
import time

import pytest

from vas.node import pool as pool_module
from vas.node.pool import MIN_SIZE, WarmPool
from vas.node.store import Memory, Store
from waiting import wait_for


@pytest.fixture
def pool():
    warm_pool = WarmPool(Store(4 * MIN_SIZE))
    thread = threading.Thread(target=warm_pool.run, name="test-warm-pool", daemon=True)
    thread.start()
    yield warm_pool
    warm_pool.stop()
    thread.join(10)
    assert not thread.is_alive()


def prepared(pool: WarmPool) -> int:
    with pool.store.lock:
        return len(pool._entries)


def test_a_wanted_size_is_prepared_populated_and_taken_once(pool):
    pool.want(MIN_SIZE)
    wait_for(lambda: prepared(pool) == 1, "the refill")
    assert pool.store.pooled == MIN_SIZE
    warm = pool.take(MIN_SIZE)
    assert warm is not None and warm.populated and warm.size == MIN_SIZE
    try:
        assert pool.take(MIN_SIZE) is None, "one memfd handed out twice"
    finally:
        warm.release()


def test_one_memfd_is_prepared_per_want(pool):
    # The refill runs when a caller predicts the next segment (want), not whenever an
    # entry is taken: a take's own segment is being filled beside it.
    pool.want(MIN_SIZE)
    wait_for(lambda: prepared(pool) == 1, "the refill")
    warm = pool.take(MIN_SIZE)
    try:
        assert not _within(0.3, lambda: pool._filling or prepared(pool)), \
            "a take started another preparation"
        pool.want(MIN_SIZE)
        wait_for(lambda: prepared(pool) == 1, "the refill the second want asked for")
        again = pool.take(MIN_SIZE)
        assert again is not None and again is not warm
        again.release()
    finally:
        warm.release()


def test_memory_nobody_takes_is_given_back_and_not_prepared_again(pool, monkeypatch):
    monkeypatch.setattr(pool_module, "IDLE_EXPIRY", 0.5)
    pool.want(MIN_SIZE)
    wait_for(lambda: prepared(pool) == 1, "the refill")
    (warm,) = pool._entries
    wait_for(lambda: prepared(pool) == 0 and warm.fd < 0, "the idle entry given back")
    assert pool.store.pooled == 0
    assert not _within(1.5, lambda: pool._filling or prepared(pool)), \
        "an expired size was prepared again"
    assert pool.take(MIN_SIZE) is None


def test_sizes_under_the_minimum_are_not_pooled(pool):
    pool.want(MIN_SIZE - 4096)
    assert pool.take(MIN_SIZE - 4096) is None
    assert pool._wanted == 0


def test_the_refill_waits_while_a_transfer_runs(pool, monkeypatch):
    monkeypatch.setattr(pool_module, "_STEP", 1 << 20)  # many steps: many looks for transfers
    with pool.transfer():
        pool.want(MIN_SIZE)
        wait_for(lambda: pool._filling == 1, "the refill to start")
        # Parked before its first step until the transfer ends: a window, not a sleep
        # the outcome depends on (nothing can complete the entry while we hold it).
        assert not _within(0.3, lambda: prepared(pool) == 1)
    wait_for(lambda: prepared(pool) == 1, "the refill after the transfer")


def _within(seconds: float, condition) -> bool:
    try:
        wait_for(condition, timeout=seconds)
    except AssertionError:
        return False
    return True


def _blocks(fd: int) -> int:
    """Bytes of memory the memfd behind ``fd`` holds."""
    return os.fstat(fd).st_blocks * 512


def test_no_refill_step_starts_in_a_series_of_transfers(pool, monkeypatch):
    # Transfers one after another with gaps shorter than the settle time: the refill
    # must not slip a step into a gap (a step there competes with the next transfer).
    monkeypatch.setattr(pool_module, "_STEP", 1 << 20)
    monkeypatch.setattr(pool_module, "_SETTLE", 1.0)  # far above a gap, even on a busy VM
    monkeypatch.setattr(pool_module, "_REFILL_WAIT", 60.0)
    steps = []
    allocate = pool_module.Warm.allocate

    def recorded(warm, offset, length, **kw):
        steps.append((time.monotonic(), pool._transfers, kw))
        allocate(warm, offset, length, **kw)

    monkeypatch.setattr(pool_module.Warm, "allocate", recorded)
    with pool.transfer():
        pool.want(MIN_SIZE)
        wait_for(lambda: pool._filling == 1, "the refill to start")
    series_end = time.monotonic() + 1.0
    while time.monotonic() < series_end:
        with pool.transfer():
            time.sleep(0.01)  # the transfer (the series is the load, not a wait)
        time.sleep(0.005)     # a gap well under the settle time
    last = time.monotonic()
    assert steps == [], "a refill step started during a series of transfers"
    wait_for(lambda: prepared(pool) == 1, "the refill after the series")
    assert all(transfers == 0 for _, transfers, _ in steps)
    assert steps[0][0] >= last + 0.9  # not before the node was quiet for the settle time
    # ... and each allocates at SCHED_IDLE, yielding to every other agent's work too
    assert all(kw == {"idle": True} for _, _, kw in steps)


def test_a_refill_step_waits_for_quiet_at_most_refill_wait(pool, monkeypatch):
    monkeypatch.setattr(pool_module, "_STEP", 8 << 20)
    monkeypatch.setattr(pool_module, "_REFILL_WAIT", 0.05)
    with pool.transfer():  # a node that never stops transferring still refills
        pool.want(MIN_SIZE)
        wait_for(lambda: prepared(pool) == 1, "the refill during an endless transfer")


def test_released_memory_is_punched_out_between_transfers(pool, monkeypatch):
    monkeypatch.setattr(pool_module, "_RELEASE_WAIT", 60.0)
    memory = Memory.allocate("test", MIN_SIZE)
    watch = os.dup(memory.fd)
    try:
        assert _blocks(watch) == MIN_SIZE
        with pool.transfer():
            pool.release_later([memory])
            assert not _within(0.3, lambda: _blocks(watch) < MIN_SIZE)
        wait_for(lambda: _blocks(watch) == 0 and memory.fd == -1, "the release after it")
    finally:
        os.close(watch)


def test_released_memory_waits_for_quiet_at_most_release_wait(pool, monkeypatch):
    monkeypatch.setattr(pool_module, "_RELEASE_WAIT", 0.2)
    memory = Memory.allocate("test", MIN_SIZE)
    watch = os.dup(memory.fd)
    try:
        with pool.transfer():
            queued = time.monotonic()
            pool.release_later([memory])
            wait_for(lambda: _blocks(watch) == 0 and memory.fd == -1,
                     "the release during an endless transfer")
            assert time.monotonic() - queued >= 0.2
    finally:
        os.close(watch)


def test_stop_releases_queued_memory_at_once(monkeypatch):
    monkeypatch.setattr(pool_module, "_RELEASE_WAIT", 60.0)
    warm_pool = WarmPool(Store(4 * MIN_SIZE))  # no thread: only stop() can release it
    memory = Memory.allocate("test", MIN_SIZE)
    watch = os.dup(memory.fd)
    try:
        with warm_pool.transfer():
            warm_pool.release_later([memory])
            assert _blocks(watch) == MIN_SIZE
            warm_pool.stop()
            assert _blocks(watch) == 0 and memory.fd == -1
        late = Memory.allocate("late", MIN_SIZE)
        warm_pool.release_later([late])  # after stop: at once
        assert late.fd == -1
    finally:
        os.close(watch)
