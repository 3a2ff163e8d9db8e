"""The coordinator's compare-and-retry loop (coordinator/retry.py), without etcd: a
"transaction" here is a callable that fails its compare a given number of times."""
from __future__ import annotations

import pytest

from vas.coordinator.retry import retries
from vas.core.errors import NotFound, Unavailable


def conflicting(failures: int):
    """A stand-in for a guarded txn: False (compare failed) ``failures`` times, then True."""
    calls = []

    def txn() -> bool:
        calls.append(len(calls))
        return len(calls) > failures
    return txn, calls


def update(attempts: int, txn) -> str:
    """An operation written as every read-modify-write in coordinator/ is."""
    for _ in retries(attempts, "update segment 'a'"):
        if txn():
            return "done"


@pytest.mark.parametrize("failures", [0, 1, 63])
def test_returns_from_the_attempt_that_succeeds(failures):
    txn, calls = conflicting(failures)
    assert update(64, txn) == "done"
    assert len(calls) == failures + 1


def test_gives_up_after_the_last_attempt_with_one_message():
    txn, calls = conflicting(64)
    with pytest.raises(Unavailable) as info:
        update(64, txn)
    assert str(info.value) == "could not update segment 'a': too many concurrent changes"
    assert len(calls) == 64  # exactly `attempts` transactions, none after the last


def test_yields_the_attempt_numbers():
    seen = []
    with pytest.raises(Unavailable, match="^could not count: too many concurrent changes$"):
        for attempt in retries(3, "count"):
            seen.append(attempt)
    assert seen == [0, 1, 2]


def test_continue_uses_up_an_attempt():
    seen = []
    with pytest.raises(Unavailable):
        for attempt in retries(2, "decide again"):
            seen.append(attempt)
            continue  # e.g. a cached record turned out stale: decide on a fresh read
    assert seen == [0, 1]


def test_errors_of_an_attempt_pass_through_unchanged():
    error = NotFound("segment 'a' not found")
    with pytest.raises(NotFound) as info:
        for attempt in retries(64, "update segment 'a'"):
            if attempt == 2:
                raise error
    assert info.value is error


def test_state_of_one_attempt_carries_to_the_next():
    fresh, decided_on = False, []
    for _ in retries(3, "update segment 'a'"):
        decided_on.append(fresh)
        if fresh:
            break
        fresh = True  # what a failure branch returns
    assert decided_on == [False, True]


def test_zero_attempts_give_up_at_once():
    with pytest.raises(Unavailable, match="^could not create segment 'z': too many concurrent changes$"):
        next(retries(0, "create segment 'z'"))
