"""What every cargotrack gRPC server has: health, reflection, auth, error mapping.

`GrpcApp` owns one `grpc.aio.Server`. Its lifecycle is explicit and idempotent:
`start()` binds and serves, `stop()` marks health NOT_SERVING, lets in-flight
RPCs finish within the grace period, then stops. Unhandled exceptions in a
servicer never reach the client as UNKNOWN: `ErrorInterceptor` maps
`KafkaUnavailable` to UNAVAILABLE and anything else to INTERNAL (and logs it).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
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
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from shared.auth import AuthInterceptor, Role, wrap_behaviour
from shared.config import AuthSettings, GrpcSettings
from shared.domain.validation import Violation
from shared.kafka import KafkaUnavailable

log = logging.getLogger(__name__)

#: grpc ships no type information, so this is Any to mypy; the alias documents intent.
Context: TypeAlias = grpc.aio.ServicerContext


async def abort_invalid(
    context: Context, violations: Sequence[Violation], summary: str = "invalid request"
) -> NoReturn:
    """Abort with INVALID_ARGUMENT and a google.rpc.BadRequest naming every bad field.

    Clients read the details with grpc_status.rpc_status.from_call (or grpcurl's
    -v output); the message also lists the fields for humans.
    """
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    fields = "; ".join(f"{v.field}: {v.description}" for v in violations[:10])
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message=f"{summary}: {fields}", details=[detail]
    )
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover


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

    KafkaUnavailable becomes UNAVAILABLE (the client should retry); any other
    exception is logged with its traceback and becomes INTERNAL, never UNKNOWN.
    Aborts and cancellations pass through untouched.
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
        return wrap_behaviour(handler, lambda behaviour: _guarded(method, behaviour))


async def _map_exception(method: str, error: Exception, context: Context) -> NoReturn:
    if isinstance(error, KafkaUnavailable):
        log.warning("kafka unavailable in %s: %s", method, error)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"Kafka is unavailable, retry: {error}")
    log.exception("unhandled error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__})")
    raise AssertionError("unreachable")  # pragma: no cover


def _guarded(method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: Context) -> Any:
            try:
                async for response in behaviour(request, context):
                    yield response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                await _map_exception(method, error, context)

        return stream

    async def call(request: Any, context: Context) -> Any:
        try:
            return await behaviour(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:
            await _map_exception(method, error, context)

    return call


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
        limit = settings.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(), AuthInterceptor(auth, roles, public_methods)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = HealthServicer()
        self.port: int | None = None
        # Read now, at construction: a missing file fails before anything starts.
        self._tls_pair: tuple[bytes, bytes] | None = None
        if settings.tls_cert_file and settings.tls_key_file:
            self._tls_pair = (
                Path(settings.tls_key_file).read_bytes(),
                Path(settings.tls_cert_file).read_bytes(),
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
            [
                *self.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        address = f"{self._settings.host}:{self._settings.port}"
        if self._tls_pair is not None:
            credentials = grpc.ssl_server_credentials([self._tls_pair])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: the port is taken or the address invalid")
        await self.server.start()
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
        """Health NOT_SERVING, then let in-flight RPCs finish within the grace. Idempotent."""
        if self._stopped or self.port is None:
            self._stopped = True
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self._settings.shutdown_grace_s)
