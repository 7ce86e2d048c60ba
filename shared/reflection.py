"""Server reflection under both names: grpc.reflection.v1 and grpc.reflection.v1alpha.

Current clients (grpcurl 1.9, grpcui, Postman, the Go and Java reflection clients) ask
for `grpc.reflection.v1.ServerReflection` first and fall back to v1alpha only when the
server answers UNIMPLEMENTED. grpcio-reflection (pinned 1.85.1) ships only the
v1alpha service (`grpc_reflection.v1alpha`; there is no `grpc_reflection.v1`).

The two protocols are the same: `grpc/reflection/v1/reflection.proto` is the v1alpha
file with the package renamed, every message, field number and type unchanged. So one
servicer answers both: v1 requests are parsed with the v1alpha message classes (the
bytes are identical) and the answers serialised the same way. The v1 file descriptor
(the v1alpha one, renamed) is added to the default descriptor pool, so a client can
also describe the v1 service itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add grpc/reflection/v1/reflection.proto to `pool` (idempotent)."""
    try:
        pool.FindFileByName(V1_FILE_NAME)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old_prefix = f".{file.package}."
    file.name = V1_FILE_NAME
    file.package = V1_PACKAGE
    file.options.Clear()
    for message in file.message_type:
        for field in message.field:
            if field.type_name.startswith(old_prefix):
                field.type_name = f".{V1_PACKAGE}." + field.type_name.removeprefix(old_prefix)
    for service in file.service:
        for method in service.method:
            for attr in ("input_type", "output_type"):
                name: str = getattr(method, attr)
                setattr(method, attr, f".{V1_PACKAGE}." + name.removeprefix(old_prefix))
    pool.Add(file)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection for `service_names` under the v1 and v1alpha names on `server`.

    Both services list the same names: `service_names` plus the two reflection services.
    Call once per server, before it starts.
    """
    pool = descriptor_pool.Default()
    _register_v1_descriptor(pool)
    names = [*service_names, *SERVICE_NAMES]
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)
    reflection.enable_server_reflection(names, server, pool=pool)
    v1_handler = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1_handler,))
