"""vas.node.locks, the lock-order checker: in-process, checking switched on with enable()."""
from __future__ import annotations

import logging
import threading

import pytest

from vas.node import locks
from vas.node.locks import MARKER, LockOrderError

WAIT = 10.0  # seconds a test waits for another of its threads before failing


@pytest.fixture
def checked(monkeypatch):
    """Checking on (logging, not raising) whatever the environment says; off after."""
    monkeypatch.delenv(locks.ENV, raising=False)
    locks.enable()
    yield
    locks.disable()


@pytest.fixture
def raising(monkeypatch):
    monkeypatch.delenv(locks.ENV, raising=False)
    locks.enable(raising=True)
    yield
    locks.disable()


@pytest.fixture
def reports(caplog):
    """The messages of the violations logged during the test."""
    caplog.set_level(logging.ERROR, logger=locks.__name__)

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == locks.__name__ and r.getMessage().startswith(MARKER)]
    return messages


def ranked():
    return locks.Lock("outer", 10), locks.Lock("middle", 20), locks.Lock("inner", 30)


# ---------------------------------------------------------------- off by default

def test_off_returns_a_plain_threading_lock(monkeypatch):
    locks.disable()
    monkeypatch.delenv(locks.ENV, raising=False)
    plain = type(threading.Lock())
    assert type(locks.Lock("a", 1)) is plain and not locks.checking()
    for off in ("0", "off", "false", "no", ""):
        monkeypatch.setenv(locks.ENV, off)
        assert type(locks.Lock("a", 1)) is plain
    monkeypatch.setenv(locks.ENV, "1")  # read at each call, not at import
    assert isinstance(locks.Lock("a", 1), locks.CheckedLock)
    monkeypatch.setenv(locks.ENV, "raise")
    assert isinstance(locks.Lock("a", 1), locks.CheckedLock)


def test_lock_arguments_are_checked():
    with pytest.raises(TypeError):
        locks.Lock("a", "1")
    with pytest.raises(TypeError):
        locks.Lock("a", True)
    with pytest.raises(TypeError):
        locks.Lock(1, 1)


def test_assert_unlocked_is_silent_without_checked_locks(monkeypatch, reports):
    locks.disable()
    monkeypatch.delenv(locks.ENV, raising=False)
    with locks.Lock("plain", 1):
        locks.assert_unlocked("GetSegment")  # plain locks are not tracked
    assert reports() == [] and locks.held() == ()


# ---------------------------------------------------------------- order

def test_nesting_in_rank_order_passes(checked, reports):
    outer, middle, inner = ranked()
    before = locks.violations()
    with outer:
        with middle, inner:
            assert locks.held() == ("outer", "middle", "inner")
            assert inner.locked()
        assert locks.held() == ("outer",)
    # Released out of order: the stack follows.
    outer.acquire()
    inner.acquire()
    outer.release()
    assert locks.held() == ("inner",)
    inner.release()
    assert locks.held() == () and not outer.locked() and not inner.locked()
    assert locks.violations() == before and reports() == []


def test_inversion_is_reported_counted_and_carries_on(checked, reports):
    outer, middle, _ = ranked()
    before = locks.violations()
    with middle:
        with outer:  # logs, does not raise: a daemon keeps serving
            assert locks.held() == ("middle", "outer")
    assert locks.violations() == before + 1
    [message] = reports()
    first_line = message.splitlines()[0]
    assert first_line.startswith(f"{MARKER} acquiring 'outer' (rank 10) while holding "
                                 "'middle' (rank 20): ranks must strictly increase")
    # The acquiring site's stack, outside the checker.
    assert "test_inversion_is_reported_counted_and_carries_on" in message
    assert locks.__file__ not in message


def test_equal_ranks_may_not_nest(checked, reports):
    a, b = locks.Lock("segment.publish a", 20), locks.Lock("segment.publish b", 20)
    with a, b:
        pass
    assert len(reports()) == 1 and "'segment.publish b' (rank 20) while holding " \
        "'segment.publish a' (rank 20)" in reports()[0]


def test_stacks_are_per_thread(checked, reports):
    outer, middle, _ = ranked()
    done = threading.Event()
    seen = []
    with middle:
        def other():
            with outer:  # this thread holds nothing else: in order
                seen.append(locks.held())
            done.set()
        threading.Thread(target=other).start()
        assert done.wait(WAIT)
    assert seen == [("outer",)] and reports() == []


def test_inversion_raises_in_raise_mode(raising, reports):
    outer, middle, _ = ranked()
    with middle:
        with pytest.raises(LockOrderError, match=f"^{MARKER} acquiring 'outer'"):
            outer.acquire()  # raised before blocking: not taken
        assert not outer.locked() and locks.held() == ("middle",)
    assert issubclass(LockOrderError, AssertionError) and len(reports()) == 1


def test_environment_raise_mode(monkeypatch):
    locks.disable()
    monkeypatch.setenv(locks.ENV, "raise")
    outer, middle, _ = ranked()
    with middle, pytest.raises(LockOrderError):
        outer.acquire()


def test_self_deadlock_is_reported(checked, reports):
    outer, _, _ = ranked()
    before = locks.violations()
    with outer:
        assert outer.acquire(timeout=0.05) is False  # would wait forever without the timeout
        assert locks.held() == ("outer",)
    assert locks.violations() == before + 1
    assert reports()[0].startswith(f"{MARKER} acquiring 'outer' (rank 10) while this thread "
                                   "already holds it: a self-deadlock")


def test_self_deadlock_raises_before_blocking(raising):
    outer, _, _ = ranked()
    with outer, pytest.raises(LockOrderError, match="self-deadlock"):
        outer.acquire()  # no timeout: it must raise, not hang


def test_try_lock_is_not_checked(checked, reports):
    outer, middle, _ = ranked()
    with middle:
        assert outer.acquire(blocking=False)  # cannot wait, so cannot deadlock
        assert locks.held() == ("middle", "outer")
        outer.release()
    assert reports() == []


def test_release_from_another_thread(checked, reports):
    outer, _, _ = ranked()
    outer.acquire()
    releaser = threading.Thread(target=outer.release)
    releaser.start()
    releaser.join(WAIT)
    assert not outer.locked() and locks.held() == ()
    with pytest.raises(RuntimeError):
        outer.release()


# ---------------------------------------------------------------- Condition

def test_condition_wait_keeps_the_held_stack(checked, reports):
    outer, middle, _ = ranked()
    changed = threading.Condition(middle)
    state = {"ready": False, "go": False}
    seen = {}

    def waiter():
        with outer, changed:
            state["ready"] = True
            changed.notify_all()
            seen["woke"] = changed.wait_for(lambda: state["go"], timeout=WAIT)
            seen["after wait"] = locks.held()
            seen["timed out"] = changed.wait(timeout=0.01)  # nobody notifies
            seen["after timeout"] = locks.held()
        seen["after"] = locks.held()

    thread = threading.Thread(target=waiter)
    thread.start()
    with changed:
        assert changed.wait_for(lambda: state["ready"], timeout=WAIT)
        # The waiter released ``middle`` in wait(): this thread holds it now.
        assert locks.held() == ("middle",)
        state["go"] = True
        changed.notify()
    thread.join(WAIT)
    assert seen == {"woke": True, "after wait": ("outer", "middle"), "timed out": False,
                    "after timeout": ("outer", "middle"), "after": ()}
    assert reports() == []


def test_condition_needs_its_lock_owned(checked):
    _, middle, _ = ranked()
    changed = threading.Condition(middle)
    with pytest.raises(RuntimeError):
        changed.notify()  # not held at all
    held_elsewhere = threading.Event()
    release = threading.Event()

    def holder():
        with middle:
            held_elsewhere.set()
            release.wait(WAIT)
    thread = threading.Thread(target=holder)
    thread.start()
    assert held_elsewhere.wait(WAIT)
    try:
        with pytest.raises(RuntimeError):
            changed.notify()  # held, but by another thread
    finally:
        release.set()
        thread.join(WAIT)


def test_waiting_while_holding_a_higher_rank_is_reported(checked, reports):
    _, middle, inner = ranked()
    changed = threading.Condition(middle)
    with changed, inner:
        assert changed.wait(timeout=0.01) is False  # re-takes middle under inner
        assert locks.held() == ("middle", "inner")
    [message] = reports()
    assert message.startswith(f"{MARKER} re-acquiring after Condition.wait 'middle' (rank 20) "
                              "while holding 'inner' (rank 30)")


def test_condition_wait_raising_still_returns_holding_the_lock(raising):
    _, middle, inner = ranked()
    changed = threading.Condition(middle)
    with changed, inner:
        with pytest.raises(LockOrderError):
            changed.wait(timeout=0.01)
        assert middle.locked() and locks.held() == ("middle", "inner")
    assert not middle.locked() and not inner.locked()


# ---------------------------------------------------------------- network calls

def test_assert_unlocked(checked, reports):
    outer, middle, _ = ranked()
    before = locks.violations()
    locks.assert_unlocked("GetSegment")
    assert reports() == []
    with outer, middle:
        locks.assert_unlocked("PublishVersion")
    locks.assert_unlocked("GetSegment")  # released again
    assert locks.violations() == before + 1
    [message] = reports()
    assert message.startswith(f"{MARKER} PublishVersion (a network call) while holding "
                              "'outer' (rank 10), 'middle' (rank 20)")
    assert "test_assert_unlocked" in message


def test_assert_unlocked_raises_in_raise_mode(raising):
    outer, _, _ = ranked()
    with outer, pytest.raises(LockOrderError, match="ReadPages"):
        locks.assert_unlocked("ReadPages")
