"""The vas exception tree and the one table that maps it to gRPC statuses.

Client and servers share this module: servers raise these exceptions and
``abort_with`` turns them into a gRPC status; clients turn a status back into
the same exception with ``from_status``/``from_rpc_error``::

    VasError (Exception)                     status it travels as
    ├── NotFound (LookupError)               NOT_FOUND
    ├── AlreadyExists (FileExistsError)      ALREADY_EXISTS
    ├── PermissionDenied (PermissionError)   PERMISSION_DENIED
    ├── InvalidArgument (ValueError)         INVALID_ARGUMENT
    ├── AddressConflict                      OUT_OF_RANGE
    ├── Busy                                 ABORTED
    ├── CapacityExceeded                     RESOURCE_EXHAUSTED
    ├── Unavailable (ConnectionError)        UNAVAILABLE (and DEADLINE_EXCEEDED)
    ├── Fenced                               FAILED_PRECONDITION
    └── DataLoss (OSError)                   DATA_LOSS

Each exception carries ``.code`` (a ``grpc.StatusCode``). Messages are one
line and stable: tests and scripts match on them.

grpc is imported on the first use of a ``.code``, not with this module: a client or
``vasctl`` command that only talks to its local agent never needs it, and its import
was about a third of such a command's start-up CPU (docs/ARCHITECTURE.md "CLI").
A process that drops its privileges after importing vas (the tests' children that act
as another uid) imports grpc before, if it reads a ``.code`` after: the interpreter's
files may be out of the new uid's reach.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class _Status:
    """A class attribute that reads as the ``grpc.StatusCode`` named ``name`` (grpc is
    imported on that first read); ``number`` is the status's integer, what the gRPC
    and local protocols carry."""

    def __init__(self, name: str, number: int):
        self.name, self.number = name, number

    def __get__(self, obj, owner=None) -> grpc.StatusCode:
        import grpc
        return grpc.StatusCode[self.name]


class VasError(Exception):
    """Root of every error vas raises on purpose. ``code`` is its gRPC status."""

    code = _Status("UNKNOWN", 2)

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(VasError, LookupError):
    """No segment, space or node has that name."""

    code = _Status("NOT_FOUND", 5)


class AlreadyExists(VasError, FileExistsError):
    """The name is taken."""

    code = _Status("ALREADY_EXISTS", 6)


class PermissionDenied(VasError, PermissionError):
    """The caller's uid/gid may not do this (mode bits, or not owner/root)."""

    code = _Status("PERMISSION_DENIED", 7)


class InvalidArgument(VasError, ValueError):
    """A bad name, size, mode, offset or length."""

    code = _Status("INVALID_ARGUMENT", 3)


class AddressConflict(VasError):
    """A fixed-address attach overlaps a mapping that already exists."""

    code = _Status("OUT_OF_RANGE", 11)


class Busy(VasError):
    """The single writer lock is held by another attachment (or another state conflicts:
    a publish based on a version the segment is no longer at)."""

    code = _Status("ABORTED", 10)


class CapacityExceeded(VasError):
    """The node has no room for the segment (its --memory)."""

    code = _Status("RESOURCE_EXHAUSTED", 8)


class Unavailable(VasError, ConnectionError):
    """The agent, coordinator or etcd cannot be reached."""

    code = _Status("UNAVAILABLE", 14)


class Fenced(VasError):
    """A writer whose lease lapsed: its writes will never be published."""

    code = _Status("FAILED_PRECONDITION", 9)


class DataLoss(VasError, OSError):
    """Bytes of a segment failed their checksum (its home's --data-dir, after a restart):
    they are never served; retrying cannot help."""

    code = _Status("DATA_LOSS", 15)


#: The one status -> exception table (client side), by the status's integer.
EXCEPTION_FOR: dict[int, type[VasError]] = {
    cls.__dict__["code"].number: cls
    for cls in (NotFound, AlreadyExists, PermissionDenied, InvalidArgument, AddressConflict,
                Busy, CapacityExceeded, Unavailable, Fenced, DataLoss)
}
DEADLINE_EXCEEDED = 4
EXCEPTION_FOR[DEADLINE_EXCEEDED] = Unavailable


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode whose integer value is ``value`` (UNKNOWN if none)."""
    import grpc
    return next((code for code in grpc.StatusCode if code.value[0] == value),
                grpc.StatusCode.UNKNOWN)


def from_number(value: int, message: str) -> VasError:
    """The exception the status with integer ``value`` stands for (as a local or bulk
    reply carries it); unknown statuses become a plain VasError."""
    cls = EXCEPTION_FOR.get(value)
    if cls is None:
        code = status_code(value)
        err = VasError(message or code.name)
        err.code = code
        return err
    return cls(message)


def from_status(code: grpc.StatusCode, message: str) -> VasError:
    """The exception a status stands for; unknown statuses become a plain VasError."""
    return from_number(code.value[0], message)


def from_rpc_error(exc: grpc.RpcError) -> VasError:
    """Translate a failed gRPC call (use as ``raise from_rpc_error(e) from e``)."""
    return from_status(exc.code(), exc.details() or "")


def segment_lost(name: str, home: str) -> NotFound:
    """The error of attaching (or locking) segment ``name`` whose record is marked lost:
    its home node ``home`` restarted without it, so no memory holds its bytes. One
    message for the agent and the coordinator; NotFound, like a segment being deleted,
    because nothing is left to attach and retrying cannot help."""
    return NotFound(f"segment {name} was lost: its home node {home} restarted without it "
                    "(delete it to free the name)")


def abort_with(context: grpc.ServicerContext, exc: VasError):
    """Abort a servicer call with the status and message of ``exc``."""
    context.abort(exc.code, exc.message)


def translated(method):
    """Run a servicer method that returns one response (unary, or stream-unary),
    aborting with the status of any VasError it raises."""
    @functools.wraps(method)
    def handler(self, request, context):
        try:
            return method(self, request, context)
        except VasError as exc:
            abort_with(context, exc)
    return handler
