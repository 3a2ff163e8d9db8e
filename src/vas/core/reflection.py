"""gRPC server reflection under both names: ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection ships only ``grpc.reflection.v1alpha.ServerReflection`` (grpc/grpc
issue 38576), while current grpcurl and Postman ask for ``grpc.reflection.v1`` first.
The two protos are wire-identical apart from their package, so the same servicer
answers both: the v1 method is a generic handler over the v1alpha servicer, with the
v1alpha message classes doing the (identical) encoding. A copy of the v1alpha file
descriptor, renamed to package ``grpc.reflection.v1``, goes into the default
descriptor pool so that the v1 service describes itself like every other one. When a
grpcio-reflection with a ``v1`` module is installed, its servicer is used instead.

    enable_reflection(("vas.v1.Node", health.SERVICE_NAME), server)
"""
from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA_SERVICE_NAME = v1alpha.SERVICE_NAME           # grpc.reflection.v1alpha.ServerReflection
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection on ``server`` under v1 and v1alpha, listing ``service_names``
    and both reflection services.

    :param service_names: full names of the other services the server serves.
    :param server: a (synchronous) grpc.Server, before ``start()``.
    """
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    try:
        from grpc_reflection.v1 import reflection as v1  # not shipped as of grpcio-reflection 1.7x
    except ImportError:
        v1 = None
    if v1 is not None:
        v1.enable_server_reflection(names, server)
        v1alpha.enable_server_reflection(names, server)
        return
    _add_v1_descriptor()
    servicer = v1alpha.ReflectionServicer(names)
    v1alpha.enable_server_reflection(names, server)  # its own servicer: same answers
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString)}),))


def _add_v1_descriptor() -> None:
    """Put the v1 reflection proto (the v1alpha one under package grpc.reflection.v1)
    into the default pool, once."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, "grpc.reflection.v1"
    proto.name, proto.package = _V1_FILE, new
    proto.options.Clear()  # language options name the v1alpha packages

    def renamed(type_name: str) -> str:
        prefix = f".{old}."
        return f".{new}." + type_name[len(prefix):] if type_name.startswith(prefix) else type_name

    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # messages only: scalars must not set it
                field.type_name = renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    pool.AddSerializedFile(proto.SerializeToString())
