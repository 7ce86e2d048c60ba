"""The OpenAPI 3.1 document of the HTTP face, generated from the protos.

Paths and operations come from the `google.api.http` routes (services/http_gateway/
routes.py), schemas from the message descriptors under protobuf's canonical JSON
mapping (lowerCamelCase names, 64-bit integers and well-known times as strings,
enums by name). Streams are described as `text/event-stream` and
`application/x-ndjson` responses whose events carry the response message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from services.http_gateway.routes import Route
from shared.metrics import _version

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
}
_STATUS = {
    "type": "object",
    "description": "google.rpc.Status: the gRPC status; details keep e.g. a "
    "google.rpc.BadRequest with its fieldViolations.",
    "properties": {
        "code": {"type": "integer", "format": "int32"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
    },
}


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {"google.rpc.Status": _STATUS}

    def ref(self, descriptor: Any) -> dict[str, Any]:
        name = descriptor.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive messages terminate
            self.components[name] = self._message(descriptor)
        return {"$ref": f"#/components/schemas/{name}"}

    def _enum(self, descriptor: Any) -> dict[str, Any]:
        return {"type": "string", "enum": [value.name for value in descriptor.values]}

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            schema = self.ref(field.message_type)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            schema = self._enum(field.enum_type)
        else:
            schema = dict(_SCALARS[field.type])
        if field.is_repeated:
            return {"type": "array", "items": schema}
        return schema

    def _message(self, descriptor: Any) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {field.json_name: self.field(field) for field in descriptor.fields},
        }


def _query_parameters(
    schemas: _Schemas, descriptor: Any, skip: set[str], prefix: str = ""
) -> list[dict[str, Any]]:
    """Every scalar (or repeated scalar) field reachable without repeated messages, as
    dotted query parameters (`filter.minSeverity`)."""
    parameters: list[dict[str, Any]] = []
    for field in descriptor.fields:
        name = prefix + field.name
        if name in skip:
            continue
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        well_known = is_message and field.message_type.full_name in _WELL_KNOWN
        if is_message and not well_known:
            if not field.is_repeated and not prefix:
                parameters += _query_parameters(
                    schemas, field.message_type, skip, prefix=f"{name}."
                )
            continue
        parameters.append(
            {
                "name": prefix + field.json_name,
                "in": "query",
                "required": False,
                "schema": schemas.field(field),
                **({"explode": True} if field.is_repeated else {}),
            }
        )
    return parameters


def document(routes: Sequence[Route]) -> dict[str, Any]:
    """The OpenAPI document of `routes`."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        method = route.method
        request = method.input_type
        operation: dict[str, Any] = {
            "operationId": f"{method.containing_service.name}_{method.name}"
            + ("" if route.verb == "GET" else f"_{route.verb.lower()}"),
            "tags": [method.containing_service.name],
            "summary": f"{method.containing_service.full_name}.{method.name}",
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in route.variables
            ],
            "responses": {
                "default": {
                    "description": "An error: the gRPC status as JSON.",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/google.rpc.Status"}
                        }
                    },
                }
            },
        }
        if route.body == "*":
            operation["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": schemas.ref(request)}},
            }
        else:
            operation["parameters"] += _query_parameters(schemas, request, set(route.variables))
        response = schemas.ref(method.output_type)
        if route.streaming:
            operation["parameters"].append(
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "The id of the last event received: resume after it.",
                }
            )
            operation["responses"]["200"] = {
                "description": "A stream: Server-Sent Events (each `data:` one message, "
                "`id:` its resume position) or, with `Accept: application/x-ndjson`, "
                'one JSON object per line (`{"id", "result"}` or `{"error"}`).',
                "content": {
                    "text/event-stream": {"schema": response},
                    "application/x-ndjson": {"schema": response},
                },
            }
        else:
            operation["responses"]["200"] = {
                "description": "OK",
                "content": {"application/json": {"schema": response}},
            }
        if not route.public:
            operation["security"] = [{"bearer": []}]
        path = route.template
        paths.setdefault(path, {})[route.verb.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cargotrack HTTP API",
            "version": _version(),
            "description": "Generated from the protos' google.api.http routes "
            "(services/http_gateway/openapi.py); docs/http.md explains it.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
