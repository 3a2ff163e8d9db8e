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

The module-level functions ``create``, ``attach``, ``stat``, ``list``, ``delete``,
``put_array``/``get_array`` and ``put_table``/``get_table`` use one default
connection, made on first use.

Importing ``vas`` loads only the shared core (vas.core: exceptions, records,
defaults). The client side (``Client``, ``connect``, ``Mapping``, ...) is loaded
on first use of one of its names (PEP 562 ``__getattr__``), so the daemons, which
import ``vas.node`` or ``vas.coordinator`` and hence this package, never load it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vas.core.defaults import DEFAULT_SOCKET
from vas.core.errors import (
    AddressConflict,
    AlreadyExists,
    Busy,
    CapacityExceeded,
    DataLoss,
    Fenced,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    VasError,
)
from vas.core.types import NodeInfo, SegmentInfo, SpaceInfo

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from vas.client import (  # noqa: F401
        Client,
        attach,
        connect,
        create,
        delete,
        list,  # noqa: A004  (the contract names it vas.list)
        stat,
    )
    from vas.datasets import SegmentRef, get_array, get_table, put_array, put_table  # noqa: F401
    from vas.mapping import Mapping  # noqa: F401
    from vas.spaceview import SpaceView  # noqa: F401

#: The package version: pyproject.toml reads it from here (its one source); `vasctl --version`
#: prints it.
__version__ = "0.1.0"

#: Public names of the client side, loaded on first access: name -> module.
_LAZY = {
    "Client": "vas.client",
    "SpaceView": "vas.spaceview",
    "attach": "vas.client",
    "connect": "vas.client",
    "create": "vas.client",
    "delete": "vas.client",
    "get_array": "vas.datasets",
    "get_table": "vas.datasets",
    "list": "vas.client",
    "put_array": "vas.datasets",
    "put_table": "vas.datasets",
    "stat": "vas.client",
    "Mapping": "vas.mapping",
    "SegmentRef": "vas.datasets",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AddressConflict", "AlreadyExists", "Busy", "CapacityExceeded", "Client", "DEFAULT_SOCKET",
    "DataLoss", "Fenced", "InvalidArgument", "Mapping", "NodeInfo", "NotFound", "PermissionDenied",
    "SegmentInfo", "SegmentRef", "SpaceInfo", "SpaceView", "Unavailable", "VasError", "attach",
    "connect", "create", "delete", "get_array", "get_table", "put_array", "put_table", "stat",
]  # vas.list is left out so `from vas import *` cannot shadow the builtin list
