"""HTTP routes read from the protos' `google.api.http` options, and requests built
from a path, a query and a JSON body by protobuf's canonical JSON mapping.

The protos are the one source of truth: a method gets a route by its annotation
(docs/http.md lists them), nothing here names a path. Path variables and query
parameters are field paths of the request message (`filter.kinds`, `page_size` or
its JSON name `pageSize`); a repeated field takes the parameter once per value. With
`body: "*"` the JSON body is the request message (path variables win).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2, http_pb2  # type: ignore[attr-defined]
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from shared.pb import dispatch_pb2, tracking_pb2

#: The services the gateway serves, by full name.
SERVICES = (
    tracking_pb2.DESCRIPTOR.services_by_name["TrackingService"],
    dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"],
)

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


class RequestError(ValueError):
    """A request that cannot become the RPC's request message: `field` names the part."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    method: MethodDescriptor
    verb: str
    template: str
    body: str
    pattern: re.Pattern[str]
    variables: tuple[str, ...]

    @property
    def rpc_path(self) -> str:
        """The gRPC method path, e.g. /cargotrack.v1.TrackingService/GetShipment."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def public(self) -> bool:
        """Answered without a bearer token, by tracking token (TrackByToken,
        WatchByToken: tracking-query's PUBLIC_METHODS)."""
        return bool(self.method.name.endswith("ByToken"))

    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.output_type)

    def match(self, verb: str, path: str) -> dict[str, str] | None:
        """The path variables (percent-decoded) when this route answers, else None."""
        if verb != self.verb:
            return None
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return {
            name: urllib.parse.unquote(value)
            for name, value in zip(self.variables, found.groups(), strict=True)
        }


def _rules(method: MethodDescriptor) -> list[Any]:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule = options.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


def _verb_and_template(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind == "custom":
        return rule.custom.kind.upper(), rule.custom.path
    return str(kind).upper(), getattr(rule, kind)


def _compile(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    parts: list[str] = []
    variables: list[str] = []
    position = 0
    for found in _VARIABLE.finditer(template):
        parts.append(re.escape(template[position : found.start()]))
        parts.append("([^/]+?)")
        variables.append(found.group(1))
        position = found.end()
    parts.append(re.escape(template[position:]))
    return re.compile("".join(parts)), tuple(variables)


def routes(services: Iterable[Any] = SERVICES) -> list[Route]:
    """Every annotated binding, most specific first (more literal characters first,
    so `/v1/shipments/{id}:watch` is tried before `/v1/shipments/{id}`)."""
    found = []
    for service in services:
        for method in service.methods:
            for rule in _rules(method):
                verb, template = _verb_and_template(rule)
                pattern, variables = _compile(template)
                found.append(Route(method, verb, template, rule.body, pattern, variables))
    return sorted(found, key=lambda r: -len(_VARIABLE.sub("", r.template)))


def find(table: Sequence[Route], verb: str, path: str) -> tuple[Route, dict[str, str]] | None:
    for route in table:
        variables = route.match(verb, path)
        if variables is not None:
            return route, variables
    return None


def allowed_verbs(table: Sequence[Route], path: str) -> list[str]:
    return sorted({r.verb for r in table if r.pattern.fullmatch(path)})


def _field(descriptor: Any, name: str) -> FieldDescriptor | None:
    field: FieldDescriptor | None = descriptor.fields_by_name.get(name)
    if field is None:
        field = descriptor.fields_by_camelcase_name.get(name)
    return field


def _scalar(field: FieldDescriptor, raw: str, where: str) -> Any:
    """A query or path string as the JSON value ParseDict expects for `field`."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        if raw.lower() in ("true", "1"):
            return True
        if raw.lower() in ("false", "0"):
            return False
        raise RequestError(where, f"expected true or false, got {raw!r}")
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        well_known = field.message_type.full_name if field.message_type else ""
        if well_known in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            return raw
        raise RequestError(where, "a message field cannot be set from a string")
    return raw


def _put(
    target: dict[str, Any], descriptor: Any, dotted: str, values: list[str], where: str
) -> None:
    names = dotted.split(".")
    for name in names[:-1]:
        field = _field(descriptor, name)
        if field is None or field.type != FieldDescriptor.TYPE_MESSAGE:
            raise RequestError(where, f"no message field {name!r} in {descriptor.name}")
        target = target.setdefault(field.name, {})
        descriptor = field.message_type
    field = _field(descriptor, names[-1])
    if field is None:
        raise RequestError(where, f"no field {names[-1]!r} in {descriptor.name}")
    if field.is_repeated:
        target.setdefault(field.name, []).extend(_scalar(field, v, where) for v in values)
    elif len(values) > 1:
        raise RequestError(where, "given more than once")
    else:
        target[field.name] = _scalar(field, values[0], where)


def build_request(
    route: Route,
    variables: Mapping[str, str],
    query: Iterable[tuple[str, str]],
    body: bytes,
) -> Message:
    """The RPC's request message; RequestError names the field that is wrong."""
    message = route.request_class()()
    descriptor: Any = message.DESCRIPTOR
    fields: dict[str, Any] = {}
    if route.body == "*" and body.strip():
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError("body", f"not JSON: {error}") from None
        if not isinstance(parsed, dict):
            raise RequestError("body", "expected a JSON object")
        fields = parsed
    elif route.body not in ("", "*"):
        raise RequestError("body", f"unsupported body binding {route.body!r}")
    else:
        grouped: dict[str, list[str]] = {}
        for key, value in query:
            grouped.setdefault(key, []).append(value)
        for key, values in grouped.items():
            _put(fields, descriptor, key, values, key)
    for name, value in variables.items():
        _put(fields, descriptor, name, [value], name)
    try:
        json_format.ParseDict(fields, message)
    except json_format.ParseError as error:
        raise RequestError(_field_of(str(error)), str(error)) from None
    return message


def _field_of(parse_error: str) -> str:
    """The field a json_format.ParseError names ("Failed to parse page_size field: ..."),
    or "body"."""
    found = re.search(r"Failed to parse (\S+) field", parse_error) or re.search(
        r'no field named "([^"]+)"', parse_error
    )
    return found.group(1) if found else "body"
