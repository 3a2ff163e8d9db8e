"""Who may attach a segment: the file-like mode-bit check of local callers."""
from __future__ import annotations

from vas.core.errors import PermissionDenied
from vas.proto import types_pb2

_READ, _WRITE = 4, 2


def may_attach(info: types_pb2.SegmentInfo, uid: int, gid: int, mode: str) -> bool:
    """Whether uid/gid may attach ``info`` in ``mode`` ("r" or "rw"), as for a file.

    The owner bits apply if ``uid`` owns the segment, else the group bits if
    ``gid`` is its group, else the other bits. "r" needs the read bit, "rw" the
    read and write bits. Root (uid 0) may always attach. Only the primary gid
    counts: SO_PEERCRED reports no supplementary groups.

    >>> may_attach(types_pb2.SegmentInfo(mode=0o640, uid=1, gid=2), 3, 2, "r")
    True
    """
    if uid == 0:
        return True
    if uid == info.uid:
        bits = info.mode >> 6
    elif gid == info.gid:
        bits = info.mode >> 3
    else:
        bits = info.mode
    need = _READ | _WRITE if mode == "rw" else _READ
    return bits & need == need


def check_access(info: types_pb2.SegmentInfo, session, mode: str) -> None:
    """PermissionDenied unless ``session``'s caller may attach ``info`` in ``mode``."""
    if not may_attach(info, session.uid, session.gid, mode):
        raise PermissionDenied(
            f"permission denied: uid {session.uid} gid {session.gid} may not attach "
            f"segment {info.name} (mode 0o{info.mode:03o}, owner {info.uid}:{info.gid}) "
            f"{mode!r}")


def check_peer_access(info: types_pb2.SegmentInfo, peer, mode: str) -> None:
    """PermissionDenied unless the user certificate ``peer`` (a vas.core.identity.Peer)
    may use ``info``'s pages in ``mode`` over TCP."""
    if not may_attach(info, peer.uid, peer.gid, mode):
        need = "write" if mode == "rw" else "read"
        raise PermissionDenied(
            f"permission denied: {peer} may not {need} segment {info.name} "
            f"(mode 0o{info.mode:03o}, owner {info.uid}:{info.gid})")
