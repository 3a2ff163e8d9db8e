"""The vas.v1 wire API (``vas.proto``).

The .proto sources live in ``proto/vas/v1/``; the build (setup.py) generates
their Python modules into the package ``vas.v1``, because protoc names a
generated module after its .proto path. This package re-exports them so the
rest of the code imports one place::

    from vas.proto import coordinator_pb2, coordinator_pb2_grpc

The ``*_pb2_grpc`` modules (they import grpc) load on first use (PEP 562): a client of
its local agent speaks the messages only (vas.core.errors).
"""
import importlib

from vas.v1 import (  # noqa: F401  (re-exports)
    coordinator_pb2,
    local_pb2,
    node_pb2,
    types_pb2,
)

_STUBS = ("coordinator_pb2_grpc", "node_pb2_grpc")


def __getattr__(name: str):
    if name in _STUBS:
        return importlib.import_module(f"vas.v1.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Version of the local (client <-> agent) protocol spoken by this build (2: Detach
#: ``no_reply``, which an agent of version 1 would answer all the same).
LOCAL_PROTOCOL = 2
