"""gRPC statuses as HTTP statuses, and error bodies as `google.rpc.Status` JSON.

The mapping is Google's (google/rpc/code.proto, as grpc-gateway applies it). The
body is the status the gRPC service sent, details included: an INVALID_ARGUMENT
keeps its `google.rpc.BadRequest` with every field violation.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import (  # type: ignore[import-untyped]  # no stubs
    code_pb2,
    error_details_pb2,
    status_pb2,
)

#: gRPC status code -> HTTP status.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

_DETAILS_KEY = "grpc-status-details-bin"


def status_of(error: grpc.aio.AioRpcError) -> Any:
    """The google.rpc.Status of a failed call (see `status_from`)."""
    return status_from(error.code(), error.details(), error.trailing_metadata())


def status_from(code: grpc.StatusCode, details: str | None, trailers: Any) -> Any:
    """The google.rpc.Status of a call that ended with `code`: the one in its trailers
    when the service sent details, else built from its code and message."""
    for key, value in trailers or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            if status.code == code.value[0]:
                return status
    return status_pb2.Status(code=code.value[0], message=details or "")


def status_json(status: Any) -> dict[str, Any]:
    """Canonical JSON of a google.rpc.Status (details as typed `Any`s)."""
    result: dict[str, Any] = json_format.MessageToDict(status)
    result.setdefault("code", 0)
    result.setdefault("message", "")
    return result


def invalid(field: str, description: str, message: str = "invalid request") -> Any:
    """An INVALID_ARGUMENT status naming one field, as the services send them."""
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"{message}: {field}")
    bad_request = error_details_pb2.BadRequest()
    bad_request.field_violations.add(field=field, description=description)
    status.details.add().Pack(bad_request)
    return status


def http_status(code: int) -> int:
    """HTTP status of a google.rpc.Code number."""
    for status_code, http in HTTP_STATUS.items():
        if status_code.value[0] == code:
            return http
    return 500


#: google.rpc.Code of an error the gateway answers itself (no RPC was called).
_CODE_OF_HTTP = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    405: code_pb2.UNIMPLEMENTED,
    408: code_pb2.DEADLINE_EXCEEDED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}


def gateway_error(http: int, message: str) -> dict[str, Any]:
    """The `google.rpc.Status` JSON of an error decided by the gateway: the code of
    `http` (other 4xx INVALID_ARGUMENT: the request itself is wrong; 5xx INTERNAL)."""
    code = _CODE_OF_HTTP.get(http, code_pb2.INVALID_ARGUMENT if http < 500 else code_pb2.INTERNAL)
    return {"code": int(code), "message": message, "details": []}
