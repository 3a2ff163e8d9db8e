"""The warm pool (node/pool.py): real memfds and its real refill thread, no daemons."""
from __future__ import annotations

import threading

import pytest

from vas.node import pool as pool_module
from vas.node.pool import MIN_SIZE, WarmPool
from vas.node.store import Store
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
        after = pool.take(MIN_SIZE)  # None, or the next one the refill made meanwhile
        assert after is not warm, "one memfd handed out twice"
        if after is not None:
            after.release()
    finally:
        warm.release()


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


def test_the_refill_waits_for_a_quiet_moment_after_transfers(pool, monkeypatch):
    """A lazy reader's chunks come a fraction of a millisecond apart: the refill
    starts only once no transfer ran for ``_QUIET`` seconds, not in the gaps."""
    monkeypatch.setattr(pool_module, "_QUIET", 1.0)
    with pool.transfer():
        pool.want(MIN_SIZE)
        wait_for(lambda: pool._filling == 1, "the refill to start")
    assert not _within(0.5, lambda: prepared(pool) == 1)  # half the quiet time: still parked
    wait_for(lambda: prepared(pool) == 1, "the refill after the quiet time")


def _within(seconds: float, condition) -> bool:
    try:
        wait_for(condition, timeout=seconds)
    except AssertionError:
        return False
    return True
