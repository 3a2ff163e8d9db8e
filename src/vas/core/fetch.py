"""How a segment's pages reach this node: the fetch mode, decided in one place.

An attach asks for a fetch ("lazy", the default, or "eager") and states whether
the client can take userfaultfd faults on the mapping it is about to make
(``FaultSupport`` in local.proto, found by ``probe_fault_support``). The agent
decides the mode with ``decide``, makes a lazy replica only for
``FetchMode.LAZY`` (every other mode hands out complete pages), and answers the
mode (``AttachResponse.fetch``); the client maps by it and shows its string as
``Mapping.fetch``. ``vasctl seg stat`` shows "fetch here" by the same rule.

==========  =========  ======================  ==========================================
requested   home node  fault support           mode (string users see)
==========  =========  ======================  ==========================================
any         yes        any                     HOME ("home (no fetch)")
"eager"     no         any                     EAGER ("eager")
"lazy"      no         USERFAULTFD             LAZY ("lazy")
"lazy"      no         NO_USERFAULTFD, none    EAGER_NO_USERFAULTFD ("eager (userfaultfd
                                               unavailable)")
"lazy"      no         FIXED_ADDRESS           EAGER_FIXED ("eager (fixed address)")
==========  =========  ======================  ==========================================

A remote "rw" attach is always fetched whole (``sync()`` may read any chunk): the
agent asks ``decide`` with requested="eager" then. A LAZY attach of a replica
that is already complete is answered EAGER (nothing is left to fault in), and a
client whose userfaultfd registration fails at run time fetches the rest at once
and reports EAGER_NO_USERFAULTFD.

The client's userfaultfd probes and registrations live here too:
``userfaultfd_available`` and ``register_lazy`` (lazy faults), and
``write_protect_available`` and ``register_write_protect`` (whether a "rw"
mapping of a segment homed on this node can be made revocable, which the agent
requires, and making it so: see node/revoke.py), and ``write_tracking_available``
and ``register_write_tracking`` (whether a "rw" mapping of a replica can have its
written pages tracked, so that sync() need not hash every chunk: vas/written.py).

Example::

    mode = decide("lazy", home=False, support=probe_fault_support(fixed=False))
    print(mode.value)  # "lazy" where userfaultfd works
"""
from __future__ import annotations

import enum
import logging
import os

from vas.core import validate
from vas.proto import local_pb2

log = logging.getLogger(__name__)

#: Set to 1 to behave as if this kernel had no userfaultfd (lazy attaches turn eager;
#: "rw" attaches on a segment's home node are refused: see write_protect_available).
DISABLE_USERFAULTFD_ENV = "VAS_DISABLE_USERFAULTFD"


class FetchMode(enum.Enum):
    """How an attachment's pages reach this node; the value is what users see."""

    HOME = "home (no fetch)"
    LAZY = "lazy"
    EAGER = "eager"
    EAGER_NO_USERFAULTFD = "eager (userfaultfd unavailable)"
    EAGER_FIXED = "eager (fixed address)"

    def to_proto(self) -> int:
        """The ``vas.v1.FetchMode`` value of this mode."""
        return _TO_PROTO[self._value_]  # keyed by the str: Enum.__hash__ is Python code

    @classmethod
    def from_proto(cls, value: int) -> "FetchMode":
        """The mode of a ``vas.v1.FetchMode`` value.

        :raises ValueError: FETCH_MODE_UNSPECIFIED or a value this build does not know.
        """
        try:
            return _FROM_PROTO[value]
        except KeyError:
            raise ValueError(f"unknown fetch mode {value}") from None


_TO_PROTO = {
    FetchMode.HOME.value: local_pb2.FETCH_MODE_HOME,
    FetchMode.LAZY.value: local_pb2.FETCH_MODE_LAZY,
    FetchMode.EAGER.value: local_pb2.FETCH_MODE_EAGER,
    FetchMode.EAGER_NO_USERFAULTFD.value: local_pb2.FETCH_MODE_EAGER_NO_USERFAULTFD,
    FetchMode.EAGER_FIXED.value: local_pb2.FETCH_MODE_EAGER_FIXED,
}
_FROM_PROTO = {number: FetchMode(value) for value, number in _TO_PROTO.items()}


def decide(requested: str, *, home: bool, support: int) -> FetchMode:
    """The fetch mode of an attach: the one place this rule lives (table above).

    :param requested: "lazy" or "eager" (the attach's ``fetch``; the agent passes
        "eager" for a remote "rw" attach).
    :param home: the segment is homed on the deciding node.
    :param support: the client's ``vas.v1.FaultSupport`` value; UNSPECIFIED and
        unknown values count as NO_USERFAULTFD.
    :raises InvalidArgument: ``requested`` is neither "lazy" nor "eager".

    Example::

        decide("lazy", home=False, support=local_pb2.FAULT_SUPPORT_FIXED_ADDRESS)
        # -> FetchMode.EAGER_FIXED
    """
    validate.check_fetch(requested)
    if home:
        return FetchMode.HOME
    if requested == "eager":
        return FetchMode.EAGER
    if support == local_pb2.FAULT_SUPPORT_USERFAULTFD:
        return FetchMode.LAZY
    if support == local_pb2.FAULT_SUPPORT_FIXED_ADDRESS:
        return FetchMode.EAGER_FIXED
    return FetchMode.EAGER_NO_USERFAULTFD


_userfaultfd_ok: bool | None = None  # probed once per process


def lazy_features() -> int:
    """The userfaultfd features a lazy mapping needs: MISSING and MINOR faults on shmem
    (Linux 5.14), and UFFDIO_POISON (Linux 6.6), so that a page whose bytes can no
    longer be fetched raises SIGBUS instead of reading zeros or waiting for ever."""
    from vas import _native

    return (_native.UFFD_FEATURE_MINOR_SHMEM | _native.UFFD_FEATURE_MISSING_SHMEM
            | _native.UFFD_FEATURE_POISON)


def register_lazy(address: int, size: int) -> int:
    """A userfaultfd on which [address, address + size), a lazy mapping (vas/mapping.py),
    reports MISSING and MINOR faults (and whose faults may be poisoned:
    ``lazy_features``); the caller hands it to the agent and closes it."""
    from vas import _native

    return _registered(os.O_CLOEXEC | os.O_NONBLOCK, lazy_features(), address, size,
                       _native.UFFDIO_REGISTER_MODE_MISSING | _native.UFFDIO_REGISTER_MODE_MINOR)


def userfaultfd_available() -> bool:
    """Whether this process can register shmem mappings for lazy attaches: MISSING and
    MINOR userfaults whose pages may be poisoned (``lazy_features``).

    Probed once per process (a userfaultfd, its API handshake, close) and logged
    once when it is not; ``VAS_DISABLE_USERFAULTFD=1`` answers False without probing.
    """
    global _userfaultfd_ok
    if _userfaultfd_ok is None:
        _userfaultfd_ok = _probe()
    return _userfaultfd_ok


def _probe() -> bool:
    return _probe_features(lazy_features(), os.O_CLOEXEC | os.O_NONBLOCK,
                           "shmem MISSING/MINOR faults: Linux 5.14; UFFDIO_POISON: Linux 6.6",
                           "lazy attaches fetch eagerly")


def _probe_features(wanted: int, flags: int, needs: str, consequence: str) -> bool:
    """Whether a userfaultfd made with ``flags`` offers the features ``wanted`` (a
    throw-away fd: one handshake per fd); logs ``consequence`` when not, and which
    features the kernel lacks (``needs``: what they are and since when)."""
    if os.environ.get(DISABLE_USERFAULTFD_ENV, "") not in ("", "0"):
        log.warning("%s is set: %s", DISABLE_USERFAULTFD_ENV, consequence)
        return False
    from vas import _native  # imported on first use (cached in sys.modules after)

    try:
        fd = _native.userfaultfd(flags)
        try:
            missing = wanted & ~_native.uffd_api(fd)
        finally:
            os.close(fd)
        ok = not missing
        reason = f"the kernel lacks userfaultfd features 0x{missing:x} ({needs})"
    except OSError as exc:
        ok, reason = False, str(exc)
    if not ok:
        log.warning("userfaultfd unavailable (%s): %s", reason, consequence)
    return ok


_write_protect_ok: bool | None = None  # probed once per process


def write_protect_features() -> int:
    """The features of a revocable "rw" mapping's userfaultfd (vas/mapping.py):
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_SIGBUS, i.e. write-protect faults
    on shared memory, answered by the kernel with SIGBUS."""
    from vas import _native

    return _native.UFFD_FEATURE_WP_HUGETLBFS_SHMEM | _native.UFFD_FEATURE_SIGBUS


def register_write_protect(address: int, size: int) -> int:
    """A userfaultfd on which [address, address + size), a shared writable mapping,
    is registered for write-protect faults answered with SIGBUS (a revocable "rw"
    mapping: node/revoke.py). Registering protects nothing yet: only the agent's
    UFFDIO_WRITEPROTECT does, when it revokes the writer."""
    from vas import _native

    return _registered(os.O_CLOEXEC | os.O_NONBLOCK | _native.UFFD_USER_MODE_ONLY,
                       write_protect_features(), address, size,
                       _native.UFFDIO_REGISTER_MODE_WP)


def _registered(flags: int, features: int, address: int, size: int, mode: int) -> int:
    """A new userfaultfd (``flags``, handshake with ``features``) with the range
    registered in ``mode``; closed again if any step fails."""
    from vas import _native

    uffd = _native.userfaultfd(flags)
    try:
        _native.uffd_api(uffd, features)
        _native.uffd_register(uffd, address, size, mode)
    except BaseException:
        os.close(uffd)
        raise
    return uffd


def write_protect_available() -> bool:
    """Whether this process can make a "rw" mapping of a segment homed on its node
    revocable (``AttachRequest.write_protect_support``): a userfaultfd made with
    UFFD_USER_MODE_ONLY whose kernel offers ``write_protect_features()`` (Linux 5.19
    with PTE markers). Probed once per process and logged once when not;
    ``VAS_DISABLE_USERFAULTFD=1`` answers False without probing.
    """
    global _write_protect_ok
    if _write_protect_ok is None:
        _write_protect_ok = _probe_write_protect()
    return _write_protect_ok


def _probe_write_protect() -> bool:
    from vas import _native

    return _probe_features(write_protect_features(),
                           os.O_CLOEXEC | os.O_NONBLOCK | _native.UFFD_USER_MODE_ONLY,
                           "write-protect of shared memory: Linux 5.19; SIGBUS: Linux 4.14",
                           "\"rw\" attaches on a segment's home node are refused")


_write_tracking_ok: bool | None = None  # probed once per process


def write_tracking_features() -> int:
    """The features of a remote writer's tracking userfaultfd (vas/written.py):
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_ASYNC, i.e. write-protect on
    shared memory whose faults the kernel resolves itself, leaving the page marked
    written for PAGEMAP_SCAN (both Linux 6.7)."""
    from vas import _native

    return _native.UFFD_FEATURE_WP_HUGETLBFS_SHMEM | _native.UFFD_FEATURE_WP_ASYNC


def register_write_tracking(address: int, size: int) -> int:
    """A userfaultfd on which [address, address + size), a shared writable mapping,
    is registered for asynchronous write-protect (``write_tracking_features``).
    Registering protects nothing yet: the caller write-protects the range before
    the first store (vas/written.py)."""
    from vas import _native

    return _registered(os.O_CLOEXEC | os.O_NONBLOCK | _native.UFFD_USER_MODE_ONLY,
                       write_tracking_features(), address, size,
                       _native.UFFDIO_REGISTER_MODE_WP)


def write_tracking_available() -> bool:
    """Whether this process can track the pages a remote writer stores to (a
    userfaultfd made with UFFD_USER_MODE_ONLY whose kernel offers
    ``write_tracking_features()``). Probed once per process and logged once when
    not; ``VAS_DISABLE_USERFAULTFD=1`` answers False without probing: sync() then
    finds the changes by hashing every chunk."""
    global _write_tracking_ok
    if _write_tracking_ok is None:
        from vas import _native

        _write_tracking_ok = _probe_features(
            write_tracking_features(),
            os.O_CLOEXEC | os.O_NONBLOCK | _native.UFFD_USER_MODE_ONLY,
            "asynchronous write-protect of shared memory: Linux 6.7",
            "a remote writer's sync() hashes every chunk to find its changes")
    return _write_tracking_ok


def probe_fault_support(fixed: bool) -> int:
    """The ``vas.v1.FaultSupport`` value this process states for a mapping it is
    about to make (``fixed``: at the segment's own address).

    Without userfaultfd that is NO_USERFAULTFD whatever ``fixed`` says; with it,
    FIXED_ADDRESS for a fixed mapping (mapped shared: a private mapping, which
    registration needs, is not placed at a fixed address), else USERFAULTFD.
    """
    if not userfaultfd_available():
        return local_pb2.FAULT_SUPPORT_NO_USERFAULTFD
    if fixed:
        return local_pb2.FAULT_SUPPORT_FIXED_ADDRESS
    return local_pb2.FAULT_SUPPORT_USERFAULTFD
