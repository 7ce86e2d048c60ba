"""What every cargotrack gRPC server has: health, reflection, auth, error mapping.

`GrpcApp` owns one `grpc.aio.Server`. Its lifecycle is explicit and idempotent:
`start()` binds and serves, `stop()` marks health NOT_SERVING, lets in-flight
RPCs finish within the grace period, then stops. Unhandled exceptions in a
servicer never reach the client as UNKNOWN: `ErrorInterceptor` maps
`KafkaUnavailable` to UNAVAILABLE, `RecordTooLarge` and an undecodable request
message to INVALID_ARGUMENT and anything else to INTERNAL (and logs it).
`TelemetryInterceptor`, outermost, measures every call (shared.metrics) and, with
tracing on, runs it under a server span (shared.tracing). `StreamLimits`,
innermost, caps streaming calls per principal and per process; `server_options`
is the one place the server's channel arguments (message size, streams per
connection, keepalive, connection age) are decided.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

import grpc
from google.protobuf import any_pb2
from google.rpc import (  # type: ignore[import-untyped]  # no stubs for googleapis-common-protos
    code_pb2,
    error_details_pb2,
    status_pb2,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_status import rpc_status

from shared import metrics, reflection, tracing
from shared.auth import (
    ALWAYS_PUBLIC_PREFIXES,
    AuthInterceptor,
    KeyRing,
    Role,
    VerifiedTokens,
    current_principal_or_none,
    wrap_behaviour,
)
from shared.config import AuthSettings, GrpcLimits, GrpcSettings
from shared.domain.validation import Violation
from shared.kafka import KafkaUnavailable, RecordTooLarge

log = logging.getLogger(__name__)

#: grpc ships no type information, so this is Any to mypy; the alias documents intent.
Context: TypeAlias = grpc.aio.ServicerContext


#: Field violations listed in one INVALID_ARGUMENT answer (see abort_invalid).
MAX_FIELD_VIOLATIONS = 20


async def abort_invalid(
    context: Context, violations: Sequence[Violation], summary: str = "invalid request"
) -> NoReturn:
    """Abort with INVALID_ARGUMENT and a google.rpc.BadRequest naming every bad field.

    Clients read the details with grpc_status.rpc_status.from_call (or grpcurl's
    -v output); the message also lists the fields for humans. At most
    MAX_FIELD_VIOLATIONS are listed (then one saying how many more): the details
    travel in a trailer, and a trailer over gRPC's metadata limit (8 KiB) makes the
    client see RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT.
    """
    listed = [
        error_details_pb2.BadRequest.FieldViolation(
            field=v.field[:100], description=v.description[:120]
        )
        for v in violations[:MAX_FIELD_VIOLATIONS]
    ]
    if len(violations) > MAX_FIELD_VIOLATIONS:
        more = len(violations) - MAX_FIELD_VIOLATIONS
        listed.append(
            error_details_pb2.BadRequest.FieldViolation(
                field="", description=f"and {more} more violations"
            )
        )
    bad_request = error_details_pb2.BadRequest(field_violations=listed)
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    fields = "; ".join(f"{v.field[:100]}: {v.description[:120]}" for v in violations[:5])
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message=f"{summary}: {fields}", details=[detail]
    )
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover


#: google.rpc.ErrorInfo.domain of cargotrack's own refusals.
ERROR_DOMAIN = "cargotrack.io"


async def abort_with_reason(
    context: Context,
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str],
) -> NoReturn:
    """Abort with `code` and a google.rpc.ErrorInfo: `reason` (an UPPER_SNAKE_CASE
    constant clients may branch on), domain ERROR_DOMAIN and `metadata` (e.g. the
    request field the refusal is about, under "field")."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover


def error_infos(error: grpc.aio.AioRpcError) -> list[tuple[str, dict[str, str]]]:
    """(reason, metadata) of every google.rpc.ErrorInfo in an error's trailers."""
    status = rpc_status.from_call(error)
    if status is None:
        return []
    found: list[tuple[str, dict[str, str]]] = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            found.append((info.reason, dict(info.metadata)))
    return found


def field_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """(field, description) pairs of a BadRequest in an error's trailers (for clients, tests)."""
    status = rpc_status.from_call(error)
    if status is None:
        return []
    found: list[tuple[str, str]] = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.extend((v.field, v.description) for v in bad_request.field_violations)
    return found


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Turns exceptions a servicer did not handle into a deliberate status.

    KafkaUnavailable becomes UNAVAILABLE (the client should retry); RecordTooLarge
    (a record over its topic's max.message.bytes: permanent) becomes
    INVALID_ARGUMENT with a BadRequest; a request message that is not valid
    protobuf of the method's request type becomes INVALID_ARGUMENT; any other
    exception is logged with its traceback and becomes INTERNAL, never UNKNOWN.
    Aborts and cancellations pass through untouched.

    Undecodable requests need the request deserializer wrapped: grpc decodes a
    unary request before any interceptor's behaviour runs, and reports a decoding
    error as UNKNOWN (a streamed request's error would surface in the servicer's
    loop and end as INTERNAL). The wrapped deserializer returns a marker instead of
    raising, and the guarded behaviour answers the marker with INVALID_ARGUMENT.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        streaming: bool = handler.request_streaming
        guarded = wrap_behaviour(handler, lambda behaviour: _guarded(method, behaviour, streaming))
        return _with_deserializer(guarded, _tolerant(handler.request_deserializer))


class UndecodableRequest(Exception):
    """A request message that is not valid protobuf of the method's request type."""


class _Undecodable:
    """What the tolerant deserializer returns for bytes it cannot parse."""

    def __init__(self, error: Exception) -> None:
        self.reason = f"{type(error).__name__}: {error}"[:300]


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as error:  # DecodeError, or whatever a parser raises on garbage
            return _Undecodable(error)

    return deserialize


def _with_deserializer(
    handler: grpc.RpcMethodHandler, deserializer: Callable[[bytes], Any] | None
) -> grpc.RpcMethodHandler:
    """The same handler with another request deserializer (grpc has four kinds)."""
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(handler.unary_unary, deserializer, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(handler.unary_stream, deserializer, serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(handler.stream_unary, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(handler.stream_stream, deserializer, serializer)


async def _decoded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream that raises UndecodableRequest at the first undecodable message."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise UndecodableRequest(request.reason)
        yield request


async def _map_exception(method: str, error: Exception, context: Context) -> NoReturn:
    if isinstance(error, RecordTooLarge):
        # Permanent: resending the same request can never succeed, so never UNAVAILABLE.
        log.warning("record too large in %s: %s", method, error)
        await abort_invalid(context, [Violation("", str(error))], "a record is too large for Kafka")
    if isinstance(error, KafkaUnavailable):
        log.warning("kafka unavailable in %s: %s", method, error)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"Kafka is unavailable, retry: {error}")
    if isinstance(error, UndecodableRequest):
        await _abort_undecodable(context, str(error))
    log.exception("unhandled error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__})")
    raise AssertionError("unreachable")  # pragma: no cover


async def _abort_undecodable(context: Context, reason: str) -> NoReturn:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"the request message is not valid protobuf: {reason}"
    )
    raise AssertionError("unreachable")  # pragma: no cover


def _guarded(method: str, behaviour: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    async def checked(request: Any, context: Context) -> Any:
        """The request as the servicer should see it (aborts if it is undecodable)."""
        if streaming:
            return _decoded(request)
        if isinstance(request, _Undecodable):
            await _abort_undecodable(context, request.reason)
        return request

    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: Context) -> Any:
            try:
                async for response in behaviour(await checked(request, context), context):
                    yield response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                await _map_exception(method, error, context)

        return stream

    async def call(request: Any, context: Context) -> Any:
        try:
            return await behaviour(await checked(request, context), context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:
            await _map_exception(method, error, context)

    return call


#: Status codes that mean the server failed (OpenTelemetry's rule for server spans).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class TelemetryInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every call by service, method and final status code; with
    tracing on, runs it under a SERVER span that continues the caller's traceparent.

    Outermost, so it sees the codes the other interceptors decide (UNAUTHENTICATED,
    the INTERNAL / UNAVAILABLE / INVALID_ARGUMENT of ErrorInterceptor). Calls to
    methods the server does not have are not counted: their names come from clients.
    Health and reflection are counted but not traced (probes would flood the traces).
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        service, _, name = method.lstrip("/").partition("/")
        traced = not method.startswith(ALWAYS_PUBLIC_PREFIXES)
        return wrap_behaviour(
            handler, lambda behaviour: _observed(service, name, traced, behaviour)
        )


def _final_code(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: what the servicer set or aborted with, else OK /
    CANCELLED / UNKNOWN by how it ended."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


class _CallObservation:
    """The metrics and span of one call, from start to end."""

    def __init__(self, service: str, method: str, traced: bool, context: Context) -> None:
        self.service = service
        self.method = method
        self.context = context
        self.started = time.perf_counter()
        metrics.GRPC_IN_FLIGHT.labels(service, method).inc()
        self.span = tracing.SpanHandle()
        if traced and tracing.enabled():
            metadata = dict(context.invocation_metadata() or ())
            self.span = tracing.start_span(
                f"{service}/{method}",
                parent=_text(metadata.get("traceparent")),
                parent_state=_text(metadata.get("tracestate")),
                kind="server",
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            )
            # Each RPC runs in its own task: the span stays current until the call ends.
            self.span.activate()

    def end(self, error: BaseException | None) -> None:
        code = _final_code(self.context, error)
        metrics.GRPC_IN_FLIGHT.labels(self.service, self.method).dec()
        metrics.GRPC_HANDLED.labels(self.service, self.method, code.name).inc()
        metrics.GRPC_LATENCY.labels(self.service, self.method).observe(
            time.perf_counter() - self.started
        )
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        self.span.end(code.name if code in _SERVER_ERRORS else None)


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _observed(
    service: str, method: str, traced: bool, behaviour: Callable[..., Any]
) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: Context) -> Any:
            call = _CallObservation(service, method, traced, context)
            error: BaseException | None = None
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as raised:
                error = raised
                raise
            finally:
                call.end(error)

        return stream

    async def unary(request: Any, context: Context) -> Any:
        call = _CallObservation(service, method, traced, context)
        error: BaseException | None = None
        try:
            return await behaviour(request, context)
        except BaseException as raised:
            error = raised
            raise
        finally:
            call.end(error)

    return unary


class StreamLimits(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Caps the streaming calls (client-, server- or bidirectional streaming) one
    process serves: at most `per_principal` at once for one principal (tenant and
    subject of the token), at most `per_process` in all. A call beyond either cap
    ends at once with RESOURCE_EXHAUSTED naming the setting; a slot is freed when
    its call ends, however it ends. Unary calls are not counted (they are bounded
    by their deadline and by max_concurrent_streams per connection), nor are health
    and reflection. A public streaming call (no principal) counts towards
    `per_process` only.

    Installed innermost, after AuthInterceptor, so the principal is known.
    """

    def __init__(self, per_principal: int, per_process: int) -> None:
        self.per_principal = per_principal
        self.per_process = per_process
        self._by_principal: dict[tuple[str, str], int] = {}
        self._total = 0

    @property
    def open_streams(self) -> int:
        """Streaming calls being served now."""
        return self._total

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(ALWAYS_PUBLIC_PREFIXES):
            return handler
        if not (handler.request_streaming or handler.response_streaming):
            return handler
        return wrap_behaviour(handler, self._limited)

    def _limited(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: Context) -> Any:
                key = await self._enter(context)
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    self._leave(key)

            return stream

        async def call(request: Any, context: Context) -> Any:  # client streaming
            key = await self._enter(context)
            try:
                return await behaviour(request, context)
            finally:
                self._leave(key)

        return call

    async def _enter(self, context: Context) -> tuple[str, str] | None:
        principal = current_principal_or_none()
        key = None if principal is None else (principal.tenant_id, principal.subject)
        if self._total >= self.per_process:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server already serves {self.per_process} streams "
                "(CARGOTRACK_GRPC_MAX_STREAMS_PER_PROCESS); retry later or elsewhere",
            )
        if key is not None and self._by_principal.get(key, 0) >= self.per_principal:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{key[1]} already holds {self.per_principal} streams on this server "
                "(CARGOTRACK_GRPC_MAX_STREAMS_PER_PRINCIPAL); close one first",
            )
        self._total += 1
        if key is not None:
            self._by_principal[key] = self._by_principal.get(key, 0) + 1
        return key

    def _leave(self, key: tuple[str, str] | None) -> None:
        self._total -= 1
        if key is None:
            return
        left = self._by_principal[key] - 1
        if left:
            self._by_principal[key] = left
        else:
            del self._by_principal[key]


def server_options(settings: GrpcSettings) -> list[tuple[str, int]]:
    """Every channel argument a cargotrack gRPC server is built with: message size,
    streams per connection, keepalive and connection age (see GrpcLimits), and whether
    the port is shared with other worker processes (GrpcSettings.reuse_port)."""
    limits: GrpcLimits = settings.limits

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Off unless this process is one of several workers behind the port
        # (shared/workers.py): a lone server must fail when its port is taken.
        ("grpc.so_reuseport", int(settings.reuse_port)),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        ("grpc.keepalive_time_ms", ms(limits.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(limits.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", int(limits.keepalive_permit_without_calls)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(limits.min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_age_ms", ms(limits.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(limits.max_connection_age_grace_s)),
    ]


Registrar = Callable[[grpc.aio.Server], None]

#: grpc.health.v1 service name that liveness probes check.
LIVENESS = "liveness"


class GrpcApp:
    """One gRPC server with health, reflection, auth and error mapping.

    `services` are (full service name, registrar) pairs, e.g.
    ("cargotrack.v1.GpsIngestService", lambda s: add_GpsIngestServiceServicer_to_server(x, s)).
    """

    def __init__(
        self,
        settings: GrpcSettings,
        auth: AuthSettings,
        services: Iterable[tuple[str, Registrar]],
        roles: Mapping[str, Collection[Role]],
        public_methods: Collection[str] = (),
    ) -> None:
        self._settings = settings
        self._services = list(services)
        # Loaded now: an unreadable JWKS fails before anything starts.
        self.keys = KeyRing(auth)
        self.stream_limits = StreamLimits(
            settings.limits.max_streams_per_principal, settings.limits.max_streams_per_process
        )
        self.server = grpc.aio.server(
            interceptors=[
                TelemetryInterceptor(),
                ErrorInterceptor(),
                AuthInterceptor(
                    auth, roles, public_methods, tokens=VerifiedTokens(auth, keys=self.keys)
                ),
                self.stream_limits,
            ],
            options=server_options(settings),
        )
        self.health = HealthServicer()
        self.port: int | None = None
        # Read now, at construction: a missing file fails before anything starts.
        self._tls_pair: tuple[bytes, bytes] | None = None
        self._client_ca: bytes | None = None
        if settings.tls_cert_file and settings.tls_key_file:
            self._tls_pair = (
                Path(settings.tls_key_file).read_bytes(),
                Path(settings.tls_cert_file).read_bytes(),
            )
            if settings.tls_client_ca_file:
                self._client_ca = Path(settings.tls_client_ca_file).read_bytes()
        # Kubelet gRPC probes cannot speak TLS: health alone, in plaintext, on its own port.
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        if settings.health_port is not None:
            self._health_server = grpc.aio.server(
                options=[("grpc.so_reuseport", int(settings.reuse_port))]
            )
        self._stopped = False

    @property
    def service_names(self) -> list[str]:
        return [name for name, _ in self._services]

    async def start(self) -> int:
        """Register everything, bind, start serving; return the bound port."""
        if self.port is not None:
            raise RuntimeError("GrpcApp.start() called twice")
        for _name, register in self._services:
            register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # Liveness is its own health service name: it stays SERVING while the process
        # runs, so losing Kafka or PostgreSQL (readiness) never restarts a pod.
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
            self.server,
        )
        address = f"{self._settings.host}:{self._settings.port}"
        if self._tls_pair is not None:
            credentials = grpc.ssl_server_credentials(
                [self._tls_pair],
                root_certificates=self._client_ca,
                require_client_auth=self._client_ca is not None,
            )
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: the port is taken or the address invalid")
        if self._health_server is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            health_address = f"{self._settings.host}:{self._settings.health_port}"
            self.health_port = self._health_server.add_insecure_port(health_address)
            if self.health_port == 0:
                raise OSError(f"cannot listen on {health_address} (CARGOTRACK_GRPC_HEALTH_PORT)")
            await self._health_server.start()
        await self.server.start()
        await self.keys.start()
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Report readiness for the whole server and each service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Health NOT_SERVING, then let in-flight RPCs finish within the grace (the
        health port answers NOT_SERVING meanwhile), then stop. Idempotent."""
        if self._stopped or self.port is None:
            self._stopped = True
            if self._health_server is not None:
                await self._health_server.stop(None)
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self._settings.shutdown_grace_s)
        if self._health_server is not None:
            await self._health_server.stop(None)
        await self.keys.stop()
