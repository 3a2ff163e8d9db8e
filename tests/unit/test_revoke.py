"""node/revoke.py: the write guard's life cycle and the kept registrations, on real
userfaultfds registered over mappings of this process (nothing stores into a
protected mapping here: tests/faults/test_home_writer_fencing.py does that)."""
import os
import subprocess
import sys
import types

import pytest

from vas import _native
from vas.core.errors import Fenced, InvalidArgument
from vas.node.revoke import Guard, GuardState, Revocations, pidfd_of, uffd_features

PS = _native.PAGE_SIZE
WP = _native.UFFD_FEATURE_WP_HUGETLBFS_SHMEM | _native.UFFD_FEATURE_SIGBUS


@pytest.fixture(autouse=True)
def no_fd_leaks():
    before = set(os.listdir("/proc/self/fd"))
    yield
    leaked = set(os.listdir("/proc/self/fd")) - before
    assert not {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}


@pytest.fixture
def registered():
    """(uffd, mapping) factory: a memfd mapping of this process registered for
    write-protect on a fresh userfaultfd with ``features``."""
    made = []

    def make(features=WP):
        try:
            uffd = _native.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | _native.UFFD_USER_MODE_ONLY)
        except OSError as exc:
            pytest.skip(f"userfaultfd unavailable: {exc}")
        try:
            _native.uffd_api(uffd, features)
        except OSError as exc:
            os.close(uffd)
            pytest.skip(f"kernel lacks userfaultfd features 0x{features:x}: {exc}")
        fd = _native.memfd_create("revoke-test")
        _native.fallocate(fd, 0, 4 * PS)
        mapping = _native.mmap(fd, 4 * PS, writable=True)
        os.close(fd)
        _native.uffd_register(uffd, mapping.address, 4 * PS, _native.UFFDIO_REGISTER_MODE_WP)
        made.append(mapping)
        return uffd, mapping

    yield make
    for mapping in made:
        if not mapping.closed:
            mapping.close()


def guard_of_this_process() -> Guard:
    return Guard("seg", os.getpid(), pidfd_of(types.SimpleNamespace(sock=None, pid=os.getpid())))


def test_revoked_before_the_registration_came_refuses_it(registered):
    guard = guard_of_this_process()
    guard.revoke()
    assert guard.state is GuardState.REVOKED
    uffd, _ = registered()
    with pytest.raises(Fenced, match="^lost$"):
        guard.arm(uffd, 0, 4 * PS, Fenced("lost"))
    os.close(uffd)  # not taken over
    guard.close()
    assert guard.state is GuardState.CLOSED
    guard.close()  # idempotent


def test_armed_guard_write_protects_once_then_closes(registered):
    guard = guard_of_this_process()
    uffd, mapping = registered()
    assert uffd_features(uffd) & WP == WP
    guard.arm(uffd, mapping.address, 4 * PS, Fenced("lost"))
    assert guard.armed
    guard.revoke()
    assert (guard.state, guard.gone) == (GuardState.REVOKED, False)
    guard.revoke()  # once: a second call does nothing
    assert not guard.exited()
    with memoryview(mapping) as view:
        assert view[0] == 0  # loads still work
    guard.close()
    assert (guard.state, guard.uffd, guard.pidfd) == (GuardState.CLOSED, -1, -1)


def test_a_registration_without_sigbus_is_refused(registered):
    guard = guard_of_this_process()
    uffd, mapping = registered(_native.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    with pytest.raises(InvalidArgument, match="needs UFFD_FEATURE_SIGBUS"):
        guard.arm(uffd, mapping.address, 4 * PS, Fenced("lost"))
    os.close(uffd)
    guard.close()


def test_revoking_an_unmapped_range_finds_it_gone_and_is_not_kept(registered):
    guard = guard_of_this_process()
    uffd, mapping = registered()
    guard.arm(uffd, mapping.address, 4 * PS, Fenced("lost"))
    mapping.close()
    guard.revoke()
    assert guard.gone
    kept = Revocations()
    kept.keep(guard)
    assert kept.count() == 0 and guard.state is GuardState.CLOSED


def test_kept_until_the_process_exits(registered):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        uffd, mapping = registered()
        guard = Guard("seg", child.pid, os.pidfd_open(child.pid))
        guard.arm(uffd, mapping.address, 4 * PS, Fenced("lost"))
        guard.revoke()  # protects this process's mapping: the guard stands for the child
        kept = Revocations()
        kept.keep(guard)
        kept.reap()
        assert kept.count() == 1 and guard.state is GuardState.REVOKED
        child.stdin.close()
        child.wait(10)
        kept.reap()
        assert kept.count() == 0 and guard.state is GuardState.CLOSED
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(10)


def test_a_revocation_waits_for_the_agents_store_under_way_and_refuses_later_ones(registered):
    import threading

    guard = guard_of_this_process()
    uffd, mapping = registered()
    guard.arm(uffd, mapping.address, 4 * PS, Fenced("lost"))
    entered, revoked = threading.Event(), threading.Event()
    revoker = threading.Thread(target=lambda: (entered.wait(10), guard.revoke(), revoked.set()))
    revoker.start()
    with guard.storing(Fenced("lost")):
        entered.set()
        assert not revoked.wait(0.2)  # the store in progress holds the revocation back
        assert guard.state is GuardState.REVOKING
    assert revoked.wait(10)
    revoker.join(10)
    assert guard.state is GuardState.REVOKED
    with pytest.raises(Fenced, match="^lost$"), guard.storing(Fenced("lost")):
        pytest.fail("a store ran after the revocation")
    guard.close()
