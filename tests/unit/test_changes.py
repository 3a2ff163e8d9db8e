"""The agent's change counter (node/changes.py): a real memfd page, read as a client does."""
from __future__ import annotations

import os

import pytest

from vas import _native
from vas.node.changes import ChangeCounter


def _read(fd: int) -> int:
    """The counter as a client reads it: the page mapped read-only, its first uint64."""
    page = _native.mmap(fd, _native.PAGE_SIZE, writable=False)
    with memoryview(page) as raw, raw.cast("B") as octets, octets[:8].cast("Q") as words:
        value = words[0]
    page.close()
    return value


def test_every_bump_shows_in_the_page_a_client_maps():
    counter = ChangeCounter()
    counter.bump()  # before any page: the page starts at the value reached
    fd = counter.page_fd()
    try:
        assert _read(fd) == counter.value == 2
        for expected in (3, 4, 5):
            counter.bump()
            assert _read(fd) == counter.value == expected
        second = counter.page_fd()  # one page for every connection
        try:
            assert _read(second) == 5
        finally:
            os.close(second)
    finally:
        os.close(fd)


def test_clients_cannot_write_the_page():
    counter = ChangeCounter()
    fd = counter.page_fd()
    try:
        with pytest.raises(PermissionError):
            _native.mmap(fd, _native.PAGE_SIZE, writable=True)
        with pytest.raises(OSError):
            os.write(fd, b"\xff" * 8)
    finally:
        os.close(fd)
