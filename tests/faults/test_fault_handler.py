"""The fault resolvers (vas.node.faults) drop an fd that can never deliver a fault.

A pipe whose writer is gone reports POLLHUP, and a userfaultfd without its API
handshake POLLERR, on every poll: kept, either would spin the resolvers. Both
are dropped (logged once) while a healthy userfaultfd stays registered; the
process's CPU time shows no spin afterwards.
"""
from __future__ import annotations

import functools
import logging
import os
import time

import pytest

import waiting
from vas import _native
from vas.core.fetch import userfaultfd_available
from vas.node.faults import FaultHandler
from vas.node.lazy import LazyFill

DEADLINE = 10.0
wait_for = functools.partial(waiting.wait_for, timeout=DEADLINE)
SIZE = 1 << 20


def never_fetched(offset: int, length: int, deadline: float | None = None) -> None:
    raise AssertionError("no fault was expected")


@pytest.fixture
def handler():
    made = FaultHandler(timeout=DEADLINE)
    yield made
    made.stop()


def test_a_hung_up_pipe_is_dropped_once_without_spinning(handler, caplog):
    read_end, write_end = os.pipe()
    os.close(write_end)
    with caplog.at_level(logging.WARNING, logger="vas.node.faults"):
        registration = handler.add(read_end, LazyFill(SIZE, never_fetched), 1 << 40, SIZE)
        wait_for(lambda: not handler.registered(registration), "the pipe dropped")
        before = time.process_time()
        time.sleep(1.0)  # the window measured: a spinning resolver would burn all of it
        spent = time.process_time() - before
    assert spent < 0.3, f"{spent:.2f} s of CPU in 1 s after the drop"
    drops = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert drops == [f"dropping the userfault registration of the mapping at 0x{1 << 40:x}: "
                     "its fd reports POLLHUP"]
    handler.remove(registration)  # the attachment's end: a no-op now


@pytest.mark.skipif(not userfaultfd_available(), reason="userfaultfd unavailable")
def test_a_userfaultfd_without_handshake_is_dropped_a_healthy_one_stays(handler):
    broken = _native.userfaultfd()
    healthy = _native.userfaultfd()
    _native.uffd_api(healthy)
    fill = LazyFill(SIZE, never_fetched)
    dropped = handler.add(broken, fill, 1 << 40, SIZE)
    kept = handler.add(healthy, fill, 2 << 40, SIZE)
    wait_for(lambda: not handler.registered(dropped), "the unready userfaultfd dropped")
    assert handler.registered(kept)
    handler.remove(kept)
    assert not handler.registered(kept)
