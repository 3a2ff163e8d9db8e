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
"""
from __future__ import annotations

import functools

import grpc


class VasError(Exception):
    """Root of every error vas raises on purpose. ``code`` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(VasError, LookupError):
    """No segment, space or node has that name."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(VasError, FileExistsError):
    """The name is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(VasError, PermissionError):
    """The caller's uid/gid may not do this (mode bits, or not owner/root)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class InvalidArgument(VasError, ValueError):
    """A bad name, size, mode, offset or length."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AddressConflict(VasError):
    """A fixed-address attach overlaps a mapping that already exists."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Busy(VasError):
    """The single writer lock is held by another attachment (or another state conflicts:
    a publish based on a version the segment is no longer at)."""

    code = grpc.StatusCode.ABORTED


class CapacityExceeded(VasError):
    """The node has no room for the segment (its --memory)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(VasError, ConnectionError):
    """The agent, coordinator or etcd cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class Fenced(VasError):
    """A writer whose lease lapsed: its writes will never be published."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DataLoss(VasError, OSError):
    """Bytes of a segment failed their checksum (its home's --data-dir, after a restart):
    they are never served; retrying cannot help."""

    code = grpc.StatusCode.DATA_LOSS


#: The one status -> exception table (client side).
EXCEPTION_FOR: dict[grpc.StatusCode, type[VasError]] = {
    cls.code: cls
    for cls in (NotFound, AlreadyExists, PermissionDenied, InvalidArgument, AddressConflict,
                Busy, CapacityExceeded, Unavailable, Fenced, DataLoss)
}
EXCEPTION_FOR[grpc.StatusCode.DEADLINE_EXCEEDED] = Unavailable

_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode whose integer value is ``value`` (UNKNOWN if none)."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def from_status(code: grpc.StatusCode, message: str) -> VasError:
    """The exception a status stands for; unknown statuses become a plain VasError."""
    cls = EXCEPTION_FOR.get(code)
    if cls is None:
        err = VasError(message or code.name)
        err.code = code
        return err
    return cls(message)


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
