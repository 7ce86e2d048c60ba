"""TrackingService: shipment state for the customer portal, operations and the public.

Contract (docs/query.md has the client's view):

- The tenant is always the bearer token's. A customer token sees only shipments
  whose customer_id is its own. A shipment outside the caller's scope answers
  NOT_FOUND exactly as a missing one does (never PERMISSION_DENIED), so neither its
  existence nor its tenant leaks. Which roles may call at all is the interceptor's
  table (services/tracking_query/app.py).
- Bad arguments answer INVALID_ARGUMENT with a google.rpc.BadRequest naming each
  field; nothing is read.
- A database that cannot be reached answers UNAVAILABLE (retry), not INTERNAL.
- TrackByToken and WatchByToken need no bearer token; they return only
  `PublicShipment` fields.
- Which fields each caller sees is decided in one place, by audience (staff,
  customer, public) and the shipment's status: shared.domain.visibility. Every RPC
  answers through `ShipmentView.message_for` / `timeline_for`.
- GetShipment and TrackByToken answer from the response cache when it holds the
  answer (services/tracking_query/cache.py has the contract: never a state older
  than one committed and notified). They answer with encoded bytes, which
  `add_to_server` registers them for.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from datetime import timedelta
from typing import NoReturn

import asyncpg
import grpc
import structlog
from google.protobuf.message import Message

from services.tracking_query import queries
from services.tracking_query.cache import ResponseCache
from services.tracking_query.paging import (
    PageTokenError,
    decode_page_token,
    encode_page_token,
)
from services.tracking_query.queries import ListFilter, Scope, ShipmentView
from services.tracking_query.watch import ChangeFeed
from shared.auth import current_principal
from shared.db import Connection
from shared.domain import polyline
from shared.domain.validation import MAX_ID_LENGTH, Violation
from shared.domain.visibility import Audience, clip_route
from shared.envelopes import to_datetime
from shared.pb import shipment_pb2, tracking_pb2, tracking_pb2_grpc
from shared.rpc import Context, abort_invalid
from shared.rpc_db import pooled_connection

log = logging.getLogger(__name__)

PAGE_SIZE_DEFAULT = 50
PAGE_SIZE_MAX = 500
#: Longest tracking token looked up; the service mints 22 characters.
MAX_TRACKING_TOKEN_LENGTH = 64
#: How long an RPC waits for a pooled connection before answering UNAVAILABLE.
ACQUIRE_TIMEOUT_S = 5.0

_TRACKING_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def _check_id(field: str, value: str) -> list[Violation]:
    if not value:
        return [Violation(field, "must not be empty")]
    if len(value) > MAX_ID_LENGTH:
        return [Violation(field, f"must be at most {MAX_ID_LENGTH} characters")]
    if not value.isprintable() or any(ch.isspace() for ch in value):
        # As ingest requires of every id; PostgreSQL could not even compare a NUL.
        return [Violation(field, "must consist of printable characters without whitespace")]
    return []


def public_shipment(view: ShipmentView) -> tracking_pb2.PublicShipment:
    """What anyone holding the tracking token may see: the PUBLIC audience's fields
    of shared.domain.visibility (status, reference, promised window, delivered and
    updated times, the ETA while the goods are on the way; the timeline's kinds,
    statuses and times without anomaly entries). Never a vehicle, driver, customer,
    position, recipient or proof; never event ids nor detail texts."""
    visible: Message = view.message_for(Audience.PUBLIC)  # field names as str below
    public = tracking_pb2.PublicShipment()
    for field in tracking_pb2.PublicShipment.DESCRIPTOR.fields:
        if field.name == "timeline":
            continue
        if field.message_type is None:
            setattr(public, field.name, getattr(visible, field.name))
        elif visible.HasField(field.name):
            getattr(public, field.name).CopyFrom(getattr(visible, field.name))
    if public.planned_route and public.HasField("destination"):
        try:
            route = polyline.decode(public.planned_route)
        except ValueError:  # validated at ingest; never show what cannot be read
            route = []
        end = (public.destination.latitude, public.destination.longitude)
        public.planned_route = polyline.encode(clip_route(route, end)) if route else ""
    if public.HasField("progress") and public.HasField("eta") and public.eta.remaining_m > 0:
        # Progress towards this stop, like the route: the round's length after it is
        # other customers' business.
        public.progress.remaining_m = public.eta.remaining_m
        public.progress.route_length_m = public.progress.travelled_m + public.eta.remaining_m
    public.timeline.extend(view.timeline_for(Audience.PUBLIC))
    return public


def _encoded(response: bytes | Message) -> bytes:
    """A response serializer that also takes a response already encoded."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_to_server(servicer: TrackingServicer, server: grpc.aio.Server) -> None:
    """Register the TrackingService, as tracking_pb2_grpc's
    add_TrackingServiceServicer_to_server does, except that every method may answer
    with its response already encoded (bytes): the cache's answers are sent as stored."""
    service = tracking_pb2.DESCRIPTOR.services_by_name["TrackingService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        assert not method.client_streaming, "no client streaming in TrackingService"
        request_class = getattr(tracking_pb2, method.input_type.name)
        kind = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=request_class.FromString,
            response_serializer=_encoded,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


class TrackingServicer(tracking_pb2_grpc.TrackingServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        feed: ChangeFeed,
        page_token_key: bytes,
        cache: ResponseCache | None = None,
    ) -> None:
        self._pool = pool
        self._feed = feed
        self._page_token_key = page_token_key
        #: Answers of GetShipment and TrackByToken (off when None or max_bytes is 0).
        self._cache = cache if cache is not None else ResponseCache(0)
        #: Tests only: awaited after a cache miss has read and encoded its answer and
        #: before it stores it, so that a test can commit a change at exactly that
        #: point (tests/integration/test_query_cache.py).
        self.after_read: Callable[[], Awaitable[None]] | None = None

    def _connection(self, context: Context) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A pooled connection; UNAVAILABLE when the database cannot be reached."""
        return pooled_connection(self._pool, context, timeout_s=ACQUIRE_TIMEOUT_S)

    @staticmethod
    async def _not_found(context: Context, what: str = "shipment not found") -> NoReturn:
        await context.abort(grpc.StatusCode.NOT_FOUND, what)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    async def _shipment_id(self, value: str, context: Context) -> str:
        violations = _check_id("shipment_id", value)
        if violations:
            await abort_invalid(context, violations, "invalid shipment id")
        # The call's own task: its log lines (an unhandled error) name the shipment.
        structlog.contextvars.bind_contextvars(shipment_id=value)
        return value

    async def _read(
        self, scope: Scope, shipment_id: str, context: Context, *, whole_state: bool = False
    ) -> ShipmentView | None:
        """The shipment in scope, None if none; only for `message()` unless `whole_state`."""
        async with self._connection(context) as connection:
            return await queries.get_shipment(
                connection, scope, shipment_id, whole_state=whole_state
            )

    async def _cached(
        self, key: Hashable, answer: Callable[[], Awaitable[tuple[str, bytes]]]
    ) -> bytes:
        """The cached answer for `key`, else `answer()`'s (shipment key, encoded
        answer), stored unless the shipment changed meanwhile (see ResponseCache).
        `answer` aborts the call (NOT_FOUND, UNAVAILABLE) instead of returning."""
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        ticket = self._cache.ticket()  # before PostgreSQL is asked anything
        shipment, encoded = await answer()
        if self.after_read is not None:
            await self.after_read()
        self._cache.put(key, shipment, encoded, ticket)
        return encoded

    async def GetShipment(  # type: ignore[override]  # encoded: see add_to_server
        self, request: tracking_pb2.GetShipmentRequest, context: Context
    ) -> bytes:
        """The shipment as the caller's scope sees it, encoded (a GetShipmentResponse)."""
        scope = Scope.of(current_principal())
        shipment_id = await self._shipment_id(request.shipment_id, context)

        async def answer() -> tuple[str, bytes]:
            view = await self._read(scope, shipment_id, context)
            if view is None:
                await self._not_found(context)
            response = tracking_pb2.GetShipmentResponse(shipment=view.message_for(scope.audience))
            return ChangeFeed.key(scope.tenant_id, shipment_id), response.SerializeToString()

        # The scope is all of the caller that decides the answer (tenant, customer).
        return await self._cached(("GetShipment", scope, shipment_id), answer)

    async def GetTimeline(
        self, request: tracking_pb2.GetTimelineRequest, context: Context
    ) -> tracking_pb2.GetTimelineResponse:
        """The timeline in log order (the order the events arrived); staff see every
        entry, anomalies included (marked), others what shared.domain.visibility allows."""
        scope = Scope.of(current_principal())
        shipment_id = await self._shipment_id(request.shipment_id, context)
        view = await self._read(scope, shipment_id, context, whole_state=True)
        if view is None:
            await self._not_found(context)
        return tracking_pb2.GetTimelineResponse(entries=view.timeline_for(scope.audience))

    async def ListShipments(
        self, request: tracking_pb2.ListShipmentsRequest, context: Context
    ) -> tracking_pb2.ListShipmentsResponse:
        scope = Scope.of(current_principal())
        violations: list[Violation] = []
        page_size = request.page_size or PAGE_SIZE_DEFAULT
        if not 1 <= page_size <= PAGE_SIZE_MAX:
            violations.append(
                Violation("page_size", f"must be between 1 and {PAGE_SIZE_MAX} (0: default)")
            )
        if request.customer_id:
            violations.extend(_check_id("customer_id", request.customer_id))
        for index, status in enumerate(request.statuses):
            if status not in shipment_pb2.ShipmentStatus.values():
                violations.append(Violation(f"statuses[{index}]", f"unknown status {status}"))
        since = None
        if request.HasField("updated_since"):
            try:
                since = to_datetime(request.updated_since)
                # Stored times have microseconds: round up so that `>=` stays exact.
                if request.updated_since.nanos % 1000:
                    since += timedelta(microseconds=1)
            except (ValueError, OverflowError):
                violations.append(Violation("updated_since", "is not a valid timestamp"))
        if violations:
            await abort_invalid(context, violations, "invalid list request")
        filters = ListFilter(
            scope,
            statuses=tuple(sorted(set(request.statuses))),
            customer_id=request.customer_id or None,
            updated_since=since,
        )
        after = None
        if request.page_token:
            try:
                after = decode_page_token(
                    request.page_token, filters.fingerprint(), self._page_token_key
                )
            except PageTokenError as error:
                await abort_invalid(
                    context, [Violation("page_token", str(error))], "invalid page token"
                )
        async with self._connection(context) as connection:
            # One row more than the page tells whether another page follows.
            views = await queries.list_shipments(
                connection, filters, after, page_size + 1, whole_state=False
            )
        response = tracking_pb2.ListShipmentsResponse(
            shipments=[view.message_for(scope.audience) for view in views[:page_size]]
        )
        if len(views) > page_size:
            response.next_page_token = encode_page_token(
                views[page_size - 1].cursor, filters.fingerprint(), self._page_token_key
            )
        return response

    async def WatchShipment(
        self, request: tracking_pb2.WatchShipmentRequest, context: Context
    ) -> AsyncIterator[tracking_pb2.WatchShipmentResponse]:
        """The current state, then the state after each change (consecutive equal
        states are sent once; a change the caller may not see is no change to it).
        Ends when the client cancels, or normally when the server shuts down (the
        client watches again, elsewhere)."""
        scope = Scope.of(current_principal())
        shipment_id = await self._shipment_id(request.shipment_id, context)
        with self._feed.subscribe(scope.tenant_id, shipment_id) as changes:
            view = await self._read(scope, shipment_id, context)
            if view is None:
                await self._not_found(context)
            last = view.message_for(scope.audience)
            yield tracking_pb2.WatchShipmentResponse(shipment=last)
            while await changes.changed():
                view = await self._read(scope, shipment_id, context)
                if view is None:  # e.g. outside the scope now: nothing to show
                    continue
                current = view.message_for(scope.audience)
                if current != last:
                    last = current
                    yield tracking_pb2.WatchShipmentResponse(shipment=current)

    async def TrackByToken(  # type: ignore[override]  # encoded: see add_to_server
        self, request: tracking_pb2.TrackByTokenRequest, context: Context
    ) -> bytes:
        """The public view of the token's shipment, encoded (a TrackByTokenResponse)."""
        token = request.tracking_token
        await self._check_token(token, context)

        async def answer() -> tuple[str, bytes]:
            view = await self._by_token(token, context)
            if view is None:
                await self._not_found(context, "unknown tracking token")
            response = tracking_pb2.TrackByTokenResponse(shipment=public_shipment(view))
            shipment = ChangeFeed.key(view.state.tenant_id, view.state.shipment_id)
            return shipment, response.SerializeToString()

        # The answer is the same for every caller: the token is the whole key.
        return await self._cached(("TrackByToken", token), answer)

    async def WatchByToken(
        self, request: tracking_pb2.WatchByTokenRequest, context: Context
    ) -> AsyncIterator[tracking_pb2.WatchByTokenResponse]:
        """TrackByToken, live: the current PublicShipment, then each change the public
        may see (consecutive equal views are sent once), until the client cancels or
        the server shuts down (the page watches again: the first message is the
        current view, so nothing is lost)."""
        await self._check_token(request.tracking_token, context)
        view = await self._by_token(request.tracking_token, context)
        if view is None:
            await self._not_found(context, "unknown tracking token")
        with self._feed.subscribe(view.state.tenant_id, view.state.shipment_id) as changes:
            # Read again after subscribing: a change between the reads is then seen.
            view = await self._by_token(request.tracking_token, context)
            if view is None:
                await self._not_found(context, "unknown tracking token")
            last = public_shipment(view)
            yield tracking_pb2.WatchByTokenResponse(shipment=last)
            while await changes.changed():
                view = await self._by_token(request.tracking_token, context)
                if view is None:
                    continue
                current = public_shipment(view)
                if current != last:
                    last = current
                    yield tracking_pb2.WatchByTokenResponse(shipment=current)

    async def _check_token(self, token: str, context: Context) -> None:
        """INVALID_ARGUMENT unless `token` has the form of a tracking token."""
        if not token or len(token) > MAX_TRACKING_TOKEN_LENGTH:
            await abort_invalid(
                context,
                [
                    Violation(
                        "tracking_token", f"must be 1 to {MAX_TRACKING_TOKEN_LENGTH} characters"
                    )
                ],
                "invalid tracking token",
            )
        if not _TRACKING_TOKEN.fullmatch(token):
            await abort_invalid(
                context,
                [Violation("tracking_token", "must consist of base64url characters")],
                "invalid tracking token",
            )

    async def _by_token(self, token: str, context: Context) -> ShipmentView | None:
        """The shipment holding this (well-formed: `_check_token`) tracking token."""
        async with self._connection(context) as connection:
            return await queries.by_tracking_token(connection, token)
