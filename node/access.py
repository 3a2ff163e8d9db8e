"""Who may attach a segment: the file-like mode-bit check (vas.core.access) of local callers
and of user certificates."""
from __future__ import annotations

from vas.core.access import may_attach  # noqa: F401  (re-exported: the agent's check)
from vas.core.errors import PermissionDenied
from vas.proto import types_pb2


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
