"""Detach semantics: leaving a ``with`` block never replaces the block's exception, and
views alive at detach keep the pages mapped, and the attachment alive at the agent,
until the last one is gone (then the agent is told: the count drops, a deleted
segment is freed).

One cluster (two agents, a 2 s writer lease) serves the module; each test uses its
own names. Attachment counts reach the coordinator asynchronously (the agent's
reporter, debounced), so a test waits on them with a deadline; that a count *stays*
1 is shown against a barrier: another segment attached later is seen counted first.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import socket
import threading
import time

import pytest

import vas
import waiting
from vas.cluster import LocalCluster
from vas.core import fetch
from worlds import fill, gone

np = pytest.importorskip("numpy")

MiB = 1 << 20
WRITER_TTL = 2
wait_for = functools.partial(waiting.wait_for, timeout=15.0)
needs_uffd = pytest.mark.skipif(not fetch.userfaultfd_available(),
                                reason="userfaultfd with shmem faults unavailable")


@pytest.fixture(scope="module")
def cluster(module_dir):
    with LocalCluster(module_dir, nodes=2, memory=256 * MiB, writer_ttl=WRITER_TTL) as running:
        yield running


@pytest.fixture
def c1(cluster):
    with vas.connect(cluster.nodes[0].socket) as client:
        yield client


@pytest.fixture
def c2(cluster):
    with vas.connect(cluster.nodes[1].socket) as client:
        yield client


def attachments(client, name: str) -> int:
    return client.stat(name).attachments


def still_attached_after_a_barrier(client, name: str) -> int:
    """The count of ``name`` once a later attach of another segment has been reported:
    a Detach of ``name`` sent before that attach would have been reported by then."""
    barrier = f"{name}.barrier"
    client.create(barrier, 4096, exist_ok=True)
    with client.attach(barrier):
        wait_for(lambda: attachments(client, barrier) == 1, what="the barrier's attachment")
        count = attachments(client, name)
    client.delete(barrier)
    return count


# -- the block's exception ------------------------------------------------------------------

def test_an_exception_in_the_block_survives_a_live_view(c1):
    c1.create("det/exc", 4096)
    with pytest.raises(KeyError, match="from the block"):
        with c1.attach("det/exc", "rw") as m:
            view = m.ndarray(np.uint8)
            raise KeyError("from the block")
    view[0] = 7  # still mapped, writable as attached
    assert view[0] == 7
    del view
    wait_for(lambda: _rw_free(c1, "det/exc"), what="the writer lock's release")
    c1.delete("det/exc")


def test_a_failing_detach_is_a_note_on_the_blocks_exception(cluster):
    client = vas.connect(cluster.nodes[0].socket)
    client.create("det/note", 4096)
    with pytest.raises(KeyError) as info:
        with client.attach("det/note") as m:
            client._connection._sock.shutdown(socket.SHUT_RDWR)  # the connection breaks under the block
            raise KeyError("from the block")
    assert m.detached
    assert any("detaching segment det/note failed" in note for note in info.value.__notes__)
    client.close()
    with vas.connect(cluster.nodes[0].socket) as other:
        other.delete("det/note")


def test_switch_keeps_the_blocks_exception(c1):
    c1.create("det/sw/a", 4096)
    c1.create_space("det/sw", mode=0o600)
    c1.space_add("det/sw", "det/sw/a")
    with pytest.raises(KeyError, match="from the block"):
        with c1.switch("det/sw") as view:
            array = view["det/sw/a"].ndarray(np.uint8)
            raise KeyError("from the block")
    assert view["det/sw/a"].detached and array[0] == 0
    del array
    c1.delete_space("det/sw")
    c1.delete("det/sw/a")


def _rw_free(client, name: str) -> bool:
    try:
        client.attach(name, "rw").detach()
        return True
    except vas.Busy:
        return False


# -- views outlive detach ----------------------------------------------------------------------

def test_a_view_keeps_the_pages_and_the_attachment_until_it_goes(c1):
    digest = fill(c1, "det/view", 4 * MiB)
    with c1.attach("det/view") as m:
        array = m.ndarray(np.uint8)
        piece = m.buffer[MiB:2 * MiB]
    assert m.detached
    with pytest.raises(vas.InvalidArgument, match="^segment det/view is detached from this process$"):
        m.read(0, 1)
    with pytest.raises(vas.InvalidArgument, match="is detached"):
        m.buffer
    assert hashlib.sha256(array).hexdigest() == digest
    expected = array[MiB:2 * MiB].tobytes()
    assert still_attached_after_a_barrier(c1, "det/view") == 1
    del array
    assert still_attached_after_a_barrier(c1, "det/view") == 1  # the slice holds it still
    assert bytes(piece) == expected
    del piece
    wait_for(lambda: attachments(c1, "det/view") == 0, what="0 attachments after the last view")
    c1.delete("det/view")


def test_a_mapping_dropped_without_detach_lives_as_long_as_its_view(c1):
    digest = fill(c1, "det/drop", 1 * MiB)
    array = c1.attach("det/drop").ndarray(np.uint8)  # the Mapping itself is garbage at once
    gc.collect()
    assert still_attached_after_a_barrier(c1, "det/drop") == 1
    assert hashlib.sha256(array).hexdigest() == digest
    del array
    wait_for(lambda: attachments(c1, "det/drop") == 0, what="0 attachments after the view")
    c1.delete("det/drop")


def test_a_writers_view_keeps_its_lock_renewed(c1, c2):
    c1.create("det/lock", 4096, mode=0o666)
    with c1.attach("det/lock", "rw") as m:
        view = m.ndarray(np.uint8)
    # Past two writer leases: the helper thread's KeepAlives keep the lock held.
    deadline = time.monotonic() + 2.5 * WRITER_TTL
    while time.monotonic() < deadline:
        with pytest.raises(vas.Busy):
            c2.attach("det/lock", "rw")
        time.sleep(0.5)
    view[:5] = np.frombuffer(b"later", np.uint8)
    del view
    wait_for(lambda: _rw_free(c2, "det/lock"), what="the writer lock's release")
    with c1.attach("det/lock") as m:
        assert m.read(0, 5) == b"later"
    c1.delete("det/lock")


def test_a_deleted_segment_is_freed_when_its_last_view_goes(c1):
    digest = fill(c1, "det/del", 2 * MiB)
    with c1.attach("det/del") as m:
        array = m.ndarray(np.uint8)
    c1.delete("det/del")
    assert c1.stat("det/del").state == "deleting"  # the view's attachment holds it
    assert hashlib.sha256(array).hexdigest() == digest  # its pages were not freed
    del array
    wait_for(lambda: gone(c1, "det/del"), what="the segment freed after its last view")


def test_a_view_dying_in_a_thread_that_holds_the_connection_lock(c1):
    """A finalizer may run anywhere, even inside a request of this very connection: it
    must only queue the Detach (a blocking send there would deadlock)."""
    c1.create("det/lock2", 4096)
    with c1.attach("det/lock2") as m:
        arrays = [m.ndarray(np.uint8)]
    done = threading.Event()

    def drop_while_holding_the_lock() -> None:
        with c1._connection._lock:
            arrays.clear()  # the last view: munmap and the finalizer run here
        done.set()

    thread = threading.Thread(target=drop_while_holding_the_lock)
    thread.start()
    thread.join(10)
    assert done.is_set(), "dropping the last view blocked on the connection lock"
    wait_for(lambda: attachments(c1, "det/lock2") == 0, what="0 attachments")
    c1.delete("det/lock2")


def test_close_with_a_live_view_releases_the_attachment(cluster, c1):
    digest = fill(c1, "det/close", 1 * MiB)
    client = vas.connect(cluster.nodes[0].socket)
    m = client.attach("det/close", "rw")
    array = m.ndarray(np.uint8)
    client.close()  # the connection's end releases every attachment at the agent
    wait_for(lambda: _rw_free(c1, "det/close"), what="the writer lock's release")
    wait_for(lambda: attachments(c1, "det/close") == 0, what="0 attachments")
    assert hashlib.sha256(array).hexdigest() == digest  # still mapped: never a crash
    with pytest.raises(vas.Unavailable, match="is closed"):
        m.sync()
    m.detach()  # no-op on the wire; the array keeps the pages until it goes
    assert hashlib.sha256(array).hexdigest() == digest
    del array, m
    c1.delete("det/close")


@needs_uffd
def test_a_lazy_views_untouched_pages_still_arrive_after_detach(c1, c2):
    size = 32 * MiB
    digest = fill(c1, "det/lazy", size)
    with c2.attach("det/lazy") as m:
        assert m.fetch == "lazy"
        array = m.ndarray(np.uint8)
        first = bytes(array[:16])  # one page touched before detach, the rest never
    assert hashlib.sha256(array).hexdigest() == digest  # faults still resolved by the agent
    assert bytes(array[:16]) == first
    assert still_attached_after_a_barrier(c2, "det/lazy") == 1
    del array
    wait_for(lambda: attachments(c1, "det/lazy") == 0, what="0 attachments after the view")
    c1.delete("det/lazy")
