"""Where test clusters live: world-traversable directories and a wiped etcd keyspace
(used by tests/conftest.py and the package-scoped cluster of tests/fuzz)."""
from __future__ import annotations

import os
import tempfile

import grpc


def new_world_dir(prefix: str) -> str:
    """A fresh directory every uid can traverse (agents' sockets live there), short
    enough for socket paths (sun_path holds 108 bytes)."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    return path


def wipe(etcd_url: str) -> None:
    """Delete every key under /vas/ (a fresh keyspace for the next test)."""
    from etcd3 import etcdrpc

    with grpc.insecure_channel(etcd_url.removeprefix("http://")) as channel:
        etcdrpc.KVStub(channel).DeleteRange(
            etcdrpc.DeleteRangeRequest(key=b"/vas/", range_end=b"/vas0"), timeout=10)
