"""Permission checks on records with mode/uid/gid, like files.

The caller's uid/gid come from the agent (SO_PEERCRED), so they are trusted here.
Owner bits apply if the uid matches, else group bits if the gid matches, else
other bits; root (uid 0) may do anything.
"""
from __future__ import annotations

from vas.core.errors import PermissionDenied

READ = 4
WRITE = 2
#: Bits an attach mode needs ("rw" needs read and write, as for files opened O_RDWR).
ATTACH_BITS = {"r": READ, "rw": READ | WRITE}


def allowed(caller, record: dict, bits: int) -> bool:
    """Whether ``caller`` (a vas.v1 Caller) has every one of ``bits`` (READ/WRITE) on ``record``."""
    if caller.uid == 0:
        return True
    mode = record["mode"]
    if caller.uid == record["uid"]:
        granted = mode >> 6
    elif caller.gid == record["gid"]:
        granted = mode >> 3
    else:
        granted = mode
    return granted & bits == bits


def require(caller, record: dict, bits: int, what: str) -> None:
    """Raise PermissionDenied unless ``caller`` has ``bits`` on ``record`` (named ``what``)."""
    if not allowed(caller, record, bits):
        need = "read and write" if bits == READ | WRITE else "write" if bits == WRITE else "read"
        raise PermissionDenied(f"permission denied: uid {caller.uid} may not {need} {what}")


def require_owner(caller, record: dict, what: str) -> None:
    """Raise PermissionDenied unless ``caller`` owns ``record`` or is root."""
    if caller.uid != 0 and caller.uid != record["uid"]:
        raise PermissionDenied(
            f"permission denied: only the owner (uid {record['uid']}) or root may change {what}")
