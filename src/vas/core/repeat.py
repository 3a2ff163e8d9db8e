"""When a coordinator call whose connection failed under it is made once more.

Why: with several coordinators ("ipv4:a:1,b:2"), the first call after the one a
channel was connected to died can go to that dead connection before the channel
notices ("Stream removed ..."); made again, pick_first takes another coordinator.
The agent's coordinator client (node/clients.py) and the admin client
(vas/admin.py) both go through ``call_once_more``.

gRPC gives no structured cause for a transport failure: the status text is read.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

import grpc

from vas.core.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Coordinator methods made again after their connection failed under them: they read,
#: or set what they set to the same again (the first attempt landing changes nothing).
REPEATABLE = frozenset(f"/vas.v1.Coordinator/{name}" for name in (
    "GetSegment", "ListSegments", "CheckSegments", "ListNodes", "ClusterStatus", "GetSpace",
    "ListSpaces", "Heartbeat", "ReportAttachments", "SetSegmentMode", "SetSegmentOwner",
    "RenewWriter"))
#: What gRPC's status says when a call's connection failed under it (the server went
#: away, or closed it) rather than the server answering or the deadline passing.
_CONNECTION_LOST = ("Stream removed", "Socket closed", "Connection reset", "Broken pipe")
#: Least seconds a call made again is given, whatever the first attempt left.
_MIN_SECOND_TIMEOUT = 1.0


def call_once_more(attempt: Callable[[float], T], method: str, timeout: float) -> T:
    """``attempt(timeout)`` (one call, raising VasError), made once more, with what is
    left of ``timeout`` (at least 1 s), when its connection failed under it and making
    it again is safe: its request could not be written (``never_written``), or
    ``method`` (the gRPC method path) is ``REPEATABLE``."""
    started = time.monotonic()
    try:
        return attempt(timeout)
    except Unavailable as exc:
        if not (never_written(exc) or (method in REPEATABLE and connection_lost(exc))):
            raise
        log.info("%s: %s; calling again", method, exc)
    return attempt(max(timeout - (time.monotonic() - started), _MIN_SECOND_TIMEOUT))


def connection_lost(exc: Unavailable) -> bool:
    """Whether ``exc`` (raised from a grpc.RpcError) is a call whose connection failed
    under it: the server may or may not have read it."""
    details = _rpc_details(exc)
    return any(sign in details for sign in _CONNECTION_LOST)


def never_written(exc: Unavailable) -> bool:
    """Whether ``exc`` (raised from a grpc.RpcError) is a connection that failed
    writing ("sendmsg: Broken pipe": its peer had closed it). That is how a call made
    to a server gone before it fails, one no server read, safe to make again; a call
    already read on that connection by a server that then died fails so too, which
    only a create cannot tell from its own success (node/clients.py ``create_segment``)."""
    return "sendmsg" in _rpc_details(exc)


def method_name(rpc) -> str:
    """The gRPC method path of the stub method ``rpc`` ("/vas.v1.Coordinator/GetSegment")."""
    method = getattr(rpc, "_method", b"")
    return method.decode() if isinstance(method, bytes) else str(method)


def _rpc_details(exc: Unavailable) -> str:
    """The status text of the grpc.RpcError ``exc`` was raised from ("" if none)."""
    cause = exc.__cause__
    return (cause.details() or "") if isinstance(cause, grpc.RpcError) else ""
