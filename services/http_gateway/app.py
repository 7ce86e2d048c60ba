"""The http-gateway process: JSON over HTTP (and SSE/NDJSON streams) for
TrackingService and DispatchService, the public tracking page and the dispatch board.

It decides nothing about who may see what: the bearer token (`Authorization`
header) is forwarded to the gRPC services, which authorise and redact as for any
gRPC client; the public routes (`/v1/track/...`, the page `/t/{token}`) call the
public RPCs, which answer only `PublicShipment` fields. docs/http.md has the
client's view.

What it does decide is what any client may send and receive (guard.py holds the
parts that know nothing of aiohttp): public tracking-token lookups and streams are
rate-limited per client, streams are capped per client and in total, bodies, query
strings and headers are bounded, slow clients are timed out, cross-origin calls
follow an explicit policy, every response carries the security headers, and every
error, whatever caused it, is a JSON `google.rpc.Status` without a stack trace.

`GatewayServer` is one running gateway: gRPC health on CARGOTRACK_GRPC_PORT (like
every service: probes and the dev launcher use it; SERVING while both upstream
services answer SERVING), HTTP on CARGOTRACK_HTTP_PORT (`/healthz`, `/readyz` too),
metrics on the shared Prometheus port. `stop()`: health NOT_SERVING, open streams
end normally (clients reconnect and resume elsewhere), in-flight requests finish,
channels close.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web, web_response
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.http_gateway import guard, openapi, streams
from services.http_gateway.errors import (
    HTTP_STATUS,
    gateway_error,
    http_status,
    invalid,
    status_from,
    status_json,
    status_of,
)
from services.http_gateway.routes import (
    SERVICES,
    RequestError,
    Route,
    allowed_verbs,
    build_request,
    find,
    routes,
)
from shared import metrics, readiness
from shared.config import Settings
from shared.rpc import GrpcApp
from shared.runtime import ServiceServer, serve

log = logging.getLogger(__name__)

LABEL = "http-gateway"
STATIC = Path(__file__).resolve().parent / "static"
#: Deadline of a unary call forwarded to a gRPC service.
UNARY_TIMEOUT_S = 30.0
#: Largest request body accepted (413 beyond; the Ingress has the same limit).
MAX_BODY_BYTES = 1 << 20
#: Longest query string accepted (414 beyond); a whole request line over
#: MAX_LINE_BYTES, or a header over MAX_FIELD_BYTES, is refused by the HTTP parser.
MAX_QUERY_BYTES = 4096
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
#: Most header lines in one request.
MAX_HEADERS = 64
#: Retry-After of a stream refused at a stream cap: streams end at unknown times.
STREAM_RETRY_AFTER_S = 10
#: Request headers forwarded to the gRPC services as metadata.
FORWARDED_HEADERS = ("authorization",)
JSON = "application/json"
#: Set on a request once its stream's head is sent.
_STREAMING = web.RequestKey("streaming", bool)


class _ParserErrors(logging.Filter):
    """Requests aiohttp's HTTP parser refuses (garbage, TLS on the plain port, a
    header over the limits) are counted (`unparsed`), not logged: aiohttp logs each
    with a stack trace at ERROR, which anyone could use to flood the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            metrics.HTTP_REQUESTS.labels("unparsed", str(error.code or 400)).inc()
            return False
        return True


_PARSER_ERRORS = _ParserErrors()

#: The Server header of every answer. aiohttp's default names the Python and aiohttp
#: versions, which serves only a scanner matching them against known vulnerabilities.
#: The default itself is replaced (in `GatewayServer.start`), because the answers
#: aiohttp's HTTP parser sends before any handler runs (a 400 for a malformed request)
#: reach no middleware or signal of ours.
SERVER_HEADER = "cargotrack"


def _json_response(body: Any, status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        text=json.dumps(body, separators=(",", ":")),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _error_response(status: Any) -> web.Response:
    http = http_status(status.code)
    headers = {"WWW-Authenticate": "Bearer"} if http == 401 else {}
    return _json_response(status_json(status), http, **headers)


def _refuse(label: str, http: int, message: str, **headers: str) -> web.Response:
    """An error the gateway decides itself, counted under `label` (the RPC method, or
    `unrouted`), as a `google.rpc.Status` JSON body."""
    metrics.HTTP_REQUESTS.labels(label, str(http)).inc()
    return _json_response(gateway_error(http, message), http, **headers)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class Gateway:
    """The HTTP application: routes from the protos onto two gRPC channels."""

    def __init__(
        self,
        settings: Settings,
        channels: dict[str, grpc.aio.Channel],
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.routes = routes()
        self._channels = channels
        self.closing = asyncio.Event()
        self.ready = ready
        self._openapi = openapi.document(self.routes)
        gateway = settings.gateway
        self.limiter = guard.RateLimiter(
            gateway.rate_per_s, gateway.rate_burst, gateway.rate_clients
        )
        self.streams = guard.StreamSlots(gateway.max_streams_per_client, gateway.max_streams)
        self.cors = guard.Cors(gateway.cors_origins)
        self._page_policy = guard.page_policy(gateway.tile_url)
        #: The files /static/ serves, by path: fixed at start, so no request path,
        #: however encoded, can reach anything else (no `..`, no symbolic links).
        self._static_files = {
            path.relative_to(STATIC).as_posix(): path
            for path in STATIC.rglob("*")
            if path.is_file() and not path.is_symlink()
        }

    def client(self, request: web.Request) -> str:
        """The key `request` is counted under (guard.client_address, client_key)."""
        address = guard.client_address(
            request.remote,
            request.headers.getall("X-Forwarded-For", ()),
            self.settings.gateway.trusted_proxies,
        )
        return guard.client_key(address)

    def channel_for(self, route: Route) -> grpc.aio.Channel:
        return self._channels[route.method.containing_service.full_name]

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.on_response_prepare.append(self._headers)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/openapi.json", self._openapi_json)
        app.router.add_get("/t/{tracking_token}", self._tracking_page)
        app.router.add_get("/dispatch", self._dispatch_page)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name:.*}", self._static)
        app.router.add_route("*", "/v1/{tail:.*}", self._api)
        return app

    def runner_options(self) -> dict[str, Any]:
        """aiohttp server options: the parser's bounds and the slow-client timeout
        (a connection without a whole request head within it is closed)."""
        return {
            "max_line_size": MAX_LINE_BYTES,
            "max_field_size": MAX_FIELD_BYTES,
            "max_headers": MAX_HEADERS,
            "keepalive_timeout": self.settings.gateway.idle_timeout_s,
        }

    # --- every response ----------------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every error as JSON: aiohttp's own (no route, method not allowed on a page,
        a static file refused) keep their status; anything unexpected is logged and
        answered 500 without details (never a stack trace)."""
        try:
            return await handler(request)
        except web.HTTPException as error:
            if error.status < 400:
                raise  # redirects
            headers = {name: error.headers[name] for name in ("Allow",) if name in error.headers}
            return _refuse("unrouted", error.status, error.reason, **headers)
        except Exception:
            if request.get(_STREAMING):
                raise  # a stream's head is sent: nothing left to answer with
            log.exception("unexpected error answering %s %s", request.method, request.path)
            return _refuse("unrouted", 500, "internal error")

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """The security headers of every response (those a handler set win)."""
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("Content-Security-Policy", guard.API_POLICY)
        if not request.path.startswith("/static/"):
            # Tracking tokens are in paths, bearer answers are private: no cache keeps
            # them. Static files are the same for everyone and may be cached.
            headers.setdefault("Cache-Control", "no-store")
        if request.path.startswith("/v1/") and request.method != "OPTIONS":
            headers.update(self.cors.response_headers(request.headers.get("Origin")))

    # --- pages -------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.ready() and not self.closing.is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def _openapi_json(self, request: web.Request) -> web.Response:
        return _json_response(self._openapi)

    async def _index(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dispatch")

    def _page(self, name: str, method: str) -> web.Response:
        text = (STATIC / name).read_text()
        text = text.replace("{{TILE_URL}}", html.escape(self.settings.gateway.tile_url, quote=True))
        metrics.HTTP_REQUESTS.labels(method, "200").inc()
        # The other security headers (no-referrer: the tracking token is in the URL;
        # no-store; no framing) are every response's (`_headers`).
        return web.Response(
            text=text,
            content_type="text/html",
            headers={"Content-Security-Policy": self._page_policy},
        )

    async def _static(self, request: web.Request) -> web.StreamResponse:
        path = self._static_files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()  # JSON, by `_errors`
        return web.FileResponse(path)

    async def _tracking_page(self, request: web.Request) -> web.Response:
        # The token is read by the page's script from its own URL; nothing is looked up
        # here, so the page answers alike for known and unknown tokens.
        return self._page("track.html", "tracking-page")

    async def _dispatch_page(self, request: web.Request) -> web.Response:
        return self._page("dispatch.html", "dispatch-board")

    # --- the API -----------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if request.method == "OPTIONS":
            return self._options(request, path)
        if len(request.rel_url.raw_query_string) > MAX_QUERY_BYTES:
            return _refuse("unrouted", 414, f"query string over {MAX_QUERY_BYTES} bytes")
        found = find(self.routes, request.method, path)
        if found is None:
            verbs = allowed_verbs(self.routes, path)
            if verbs:
                message = f"{request.method} not allowed"
                return _refuse("unrouted", 405, message, Allow=", ".join(verbs))
            return _refuse("unrouted", 404, "no such route")
        route, variables = found
        label = route.method.name
        client = self.client(request)
        if route.public:
            # Before any work: a token guesser costs one bucket look-up per request.
            wait = self.limiter.take(client)
            if wait > 0:
                message = (
                    "too many tracking look-ups from this client"
                    " (CARGOTRACK_GATEWAY_RATE_PER_S): retry later"
                )
                return _refuse(label, 429, message, **_retry_after(wait))
        if route.body == "*" and request.can_read_body and request.content_type != JSON:
            return _refuse(label, 415, f"the body must be {JSON}, not {request.content_type}")
        try:
            async with asyncio.timeout(self.settings.gateway.idle_timeout_s):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _refuse(label, 413, f"request body over {MAX_BODY_BYTES} bytes")
        except TimeoutError:
            message = "the request body did not arrive in time (CARGOTRACK_GATEWAY_IDLE_TIMEOUT_S)"
            return _refuse(label, 408, message, Connection="close")
        try:
            rpc_request = build_request(route, variables, request.rel_url.query.items(), body)
        except RequestError as error:
            metrics.HTTP_REQUESTS.labels(label, "400").inc()
            return _error_response(invalid(error.field, error.description))
        metadata = tuple(
            (name, request.headers[name]) for name in FORWARDED_HEADERS if name in request.headers
        )
        if not route.streaming:
            return await self._unary(route, rpc_request, metadata)
        full = self.streams.acquire(client)
        if full == guard.StreamSlots.PER_CLIENT:
            message = (
                f"this client holds {self.streams.per_client} open streams"
                " (CARGOTRACK_GATEWAY_MAX_STREAMS_PER_CLIENT): close one first"
            )
            return _refuse(label, 429, message, **_retry_after(STREAM_RETRY_AFTER_S))
        if full == guard.StreamSlots.TOTAL:
            message = (
                f"this gateway holds {self.streams.total} open streams"
                " (CARGOTRACK_GATEWAY_MAX_STREAMS): retry later"
            )
            return _refuse(label, 503, message, **_retry_after(STREAM_RETRY_AFTER_S))
        try:
            return await self._stream(request, route, rpc_request, metadata)
        finally:
            self.streams.release(client)

    def _options(self, request: web.Request, path: str) -> web.Response:
        """OPTIONS on an API route: its verbs in `Allow`, and, for a CORS preflight,
        the grant when the policy allows it (guard.Cors); 404 for no route."""
        verbs = allowed_verbs(self.routes, path)
        if not verbs:
            return _refuse("unrouted", 404, "no such route")
        metrics.HTTP_REQUESTS.labels("options", "204").inc()
        headers = self.cors.preflight_headers(
            request.headers.get("Origin"),
            request.headers.get("Access-Control-Request-Method", ""),
            request.headers.get("Access-Control-Request-Headers", ""),
            verbs,
        )
        allow = ", ".join([*verbs, "OPTIONS"])
        return web.Response(status=204, headers={"Allow": allow, **headers})

    async def _unary(
        self, route: Route, message: Message, metadata: tuple[tuple[str, str], ...]
    ) -> web.Response:
        call = self.channel_for(route).unary_unary(
            route.rpc_path,
            request_serializer=type(message).SerializeToString,
            response_deserializer=route.response_class().FromString,
        )
        try:
            response = await call(message, metadata=metadata, timeout=UNARY_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            metrics.HTTP_REQUESTS.labels(route.method.name, str(HTTP_STATUS[error.code()])).inc()
            return _error_response(status_of(error))
        metrics.HTTP_REQUESTS.labels(route.method.name, "200").inc()
        return _json_response(json_format.MessageToDict(response))

    async def _stream(
        self,
        request: web.Request,
        route: Route,
        message: Message,
        metadata: tuple[tuple[str, str], ...],
    ) -> web.StreamResponse:
        framing = streams.Framing(streams.wants_ndjson(request.headers.get("Accept", "")))
        last_id = request.headers.get("Last-Event-ID", "").strip()
        by_token = streams.resumes_by_token(message)
        if last_id and by_token and not getattr(message, "resume_token", ""):
            message.resume_token = last_id  # type: ignore[attr-defined]
        call = self.channel_for(route).unary_stream(
            route.rpc_path,
            request_serializer=type(message).SerializeToString,
            response_deserializer=route.response_class().FromString,
        )(message, metadata=metadata)
        method = route.method.name
        try:
            # A call refused at once (bad argument, unknown token, no bearer) is an HTTP
            # error, not a stream: wait for the service's headers (or its status).
            await call.initial_metadata()
            if call.done():
                code = await call.code()
                if code != grpc.StatusCode.OK:
                    metrics.HTTP_REQUESTS.labels(method, str(HTTP_STATUS[code])).inc()
                    status = status_from(code, await call.details(), await call.trailing_metadata())
                    return _error_response(status)
        except grpc.aio.AioRpcError as error:
            metrics.HTTP_REQUESTS.labels(method, str(HTTP_STATUS[error.code()])).inc()
            return _error_response(status_of(error))
        except BaseException:
            call.cancel()
            raise
        response = web.StreamResponse(
            headers={
                "Content-Type": framing.content_type,
                "Cache-Control": "no-cache, no-store",
                # nginx (the Ingress) must not buffer a stream.
                "X-Accel-Buffering": "no",
            }
        )
        metrics.HTTP_REQUESTS.labels(method, "200").inc()
        metrics.HTTP_OPEN_STREAMS.labels(method).inc()
        request[_STREAMING] = True
        closing = asyncio.ensure_future(self.closing.wait())
        reader: asyncio.Future[Any] = asyncio.ensure_future(call.read())
        try:
            await response.prepare(request)
            await response.write(framing.opening())
            first = True
            while True:
                done, _ = await asyncio.wait(
                    {reader, closing},
                    timeout=self.settings.gateway.heartbeat_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if closing in done:
                    break  # server shutdown: the stream ends normally, clients resume
                if not done:
                    await response.write(framing.heartbeat())
                    continue
                try:
                    item = reader.result()
                except grpc.aio.AioRpcError as error:
                    await response.write(framing.error(status_of(error)))
                    break
                if item is grpc.aio.EOF:
                    code = await call.code()
                    if code != grpc.StatusCode.OK:
                        trailers = await call.trailing_metadata()
                        await response.write(
                            framing.error(status_from(code, await call.details(), trailers))
                        )
                    break
                event_id = streams.position(message, item)
                if not (first and not by_token and last_id and event_id == last_id):
                    await response.write(framing.message(event_id, item))
                first = False
                reader = asyncio.ensure_future(call.read())
        except (ConnectionResetError, asyncio.CancelledError):
            log.debug("client left a %s stream", method)
        finally:
            metrics.HTTP_OPEN_STREAMS.labels(method).dec()
            closing.cancel()
            reader.cancel()
            call.cancel()
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response


def _channel(settings: Settings, target: str) -> grpc.aio.Channel:
    """A channel to a service: TLS verified against CARGOTRACK_GATEWAY_TLS_CA_FILE when
    set (presenting the pod's own certificate, for services that require mutual TLS),
    else plaintext (the local suite, the dev overlay)."""
    ca_file = settings.gateway.tls_ca_file
    if not ca_file:
        return grpc.aio.insecure_channel(target)
    cert, key = settings.grpc.tls_cert_file, settings.grpc.tls_key_file
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key).read_bytes() if cert and key else None,
        certificate_chain=Path(cert).read_bytes() if cert and key else None,
    )
    return grpc.aio.secure_channel(target, credentials)


def _health_check(channel: grpc.aio.Channel, service: str) -> Callable[[], Awaitable[None]]:
    stub = health_pb2_grpc.HealthStub(channel)

    async def check() -> None:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{service} is not serving")

    return check


class GatewayServer(ServiceServer):
    """One http-gateway, running (a `ServiceServer`; see the module doc). `port` is the
    gRPC health port, `http_port` the HTTP one (port 0 picks free ones)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, LABEL)
        self.http_port: int | None = None
        self.gateway: Gateway | None = None
        self._passing: dict[str, bool] = {}

    def _recorded(self, name: str, check: Callable[[], Awaitable[None]]) -> readiness.Check:
        """The check, remembering its last outcome for /readyz."""

        async def recorded() -> None:
            try:
                await check()
            except BaseException:
                self._passing[name] = False
                raise
            self._passing[name] = True

        self._passing[name] = False
        return recorded

    def ready(self) -> bool:
        return bool(self._passing) and all(self._passing.values())

    async def _start(self) -> None:
        settings = self.settings
        tracking_name, dispatch_name = (service.full_name for service in SERVICES)
        channels = {
            tracking_name: _channel(settings, settings.gateway.tracking_target),
            dispatch_name: _channel(settings, settings.gateway.dispatch_target),
        }
        for channel in channels.values():
            self.on_stop(channel.close)
        gateway = Gateway(settings, channels, self.ready)
        self.gateway = gateway
        logging.getLogger("aiohttp.server").addFilter(_PARSER_ERRORS)  # once: a set
        web_response.SERVER_SOFTWARE = SERVER_HEADER  # type: ignore[attr-defined]
        await self.serve_grpc(GrpcApp(settings.grpc, settings.auth, [], {}))  # health only
        runner = web.AppRunner(
            gateway.application(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=5.0,
            **gateway.runner_options(),
        )
        await runner.setup()
        self.on_stop(runner.cleanup)
        site = web.TCPSite(runner, settings.grpc.host, settings.gateway.http_port)
        await site.start()
        server = site._server
        assert server is not None
        self.http_port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        for name, target in (("tracking-query", tracking_name), ("dispatch", dispatch_name)):
            self.check(name, self._recorded(name, _health_check(channels[target], target)))
        log.info(
            "%s HTTP on %s:%d",
            LABEL,
            settings.grpc.host,
            self.http_port,
            extra={"service": LABEL, "port": self.http_port},
        )

    async def _drain(self) -> None:
        if self.gateway is not None:
            self.gateway.closing.set()  # open streams end now; clients resume elsewhere


def server(settings: Settings) -> GatewayServer:
    """The service, not started: `async with server(settings) as running: running.http_port`."""
    return GatewayServer(settings)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT. Prints "http-gateway listening on host:port" (the
    gRPC health port, as every service does); the HTTP address is logged."""
    await serve(GatewayServer(settings))
