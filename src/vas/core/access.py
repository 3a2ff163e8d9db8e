"""The file-like mode-bit check of a segment record, shared by the agent and the clients.

The agent checks its local callers with it before handing out pages
(vas.node.access), and the admin client (vas.admin) checks its own uid/gid with
it before reading pages from a plaintext, loopback-only cluster, where a home
believes every peer.
"""
from __future__ import annotations

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
