"""vas: named, permissioned memory segments shared by every process of a cluster.

A *segment* is a named, fixed-size range of memory with a cluster-unique address
range; the node agent on each machine keeps it alive and hands mappings to local
processes (zero-copy). A *space* is a named set of segments attached together at
their fixed addresses.

Example::

    import vas, numpy as np

    with vas.connect() as c:                    # the agent at $VAS_NODE
        c.create("weights", 1 << 30, mode=0o640)
        with c.attach("weights", "rw") as m:
            m.ndarray(np.float32)[:] = 1.0

The module-level functions ``create``, ``attach``, ``stat``, ``list`` and ``delete``
use one default connection, made on first use.
"""
from __future__ import annotations

from vas.client import (
    DEFAULT_SOCKET,
    Client,
    SpaceView,
    attach,
    connect,
    create,
    delete,
    list,  # noqa: A004  (the SPEC names it vas.list)
    stat,
)
from vas.errors import (
    AddressConflict,
    AlreadyExists,
    Busy,
    CapacityExceeded,
    Fenced,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    VasError,
)
from vas.mapping import Mapping
from vas.types import NodeInfo, SegmentInfo, SpaceInfo

__version__ = "0.1.0"

__all__ = [
    "AddressConflict", "AlreadyExists", "Busy", "CapacityExceeded", "Client", "DEFAULT_SOCKET",
    "Fenced", "InvalidArgument", "Mapping", "NodeInfo", "NotFound", "PermissionDenied",
    "SegmentInfo", "SpaceInfo", "SpaceView", "Unavailable", "VasError", "attach", "connect",
    "create", "delete", "stat",
]  # vas.list is left out so `from vas import *` cannot shadow the builtin list
