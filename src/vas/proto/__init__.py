"""The vas.v1 wire API (``vas.proto``).

The .proto sources live in ``proto/vas/v1/``; the build (setup.py) generates
their Python modules into the package ``vas.v1``, because protoc names a
generated module after its .proto path. This package re-exports them so the
rest of the code imports one place::

    from vas.proto import coordinator_pb2, coordinator_pb2_grpc
"""
from vas.v1 import (  # noqa: F401  (re-exports)
    coordinator_pb2,
    coordinator_pb2_grpc,
    local_pb2,
    node_pb2,
    node_pb2_grpc,
    types_pb2,
)

#: Version of the local (client <-> agent) protocol spoken by this build (2: Detach
#: ``no_reply``, which an agent of version 1 would answer all the same).
LOCAL_PROTOCOL = 2
