"""TrackingService against real Kafka and PostgreSQL, served in-process on 127.0.0.1:0.

State comes from one of two places, named in each test:
- projected: envelopes written to the test's Kafka topics and folded by the real
  projection until it has caught up with the end offsets (never sleeping), as
  tests/integration/test_projector.py does;
- saved: for volume (pagination), states built by the pure fold of lifecycle logs
  (tests.projection_helpers.fold_log) and written with tracking_store.save_shipments,
  the projector's own write path.
Streams are read with a timeout on each message, never after a sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.tracking_query.app import SERVICE_NAME, QueryServer
from services.tracking_query.watch import ChangeFeed
from shared import statecodec
from shared import tracking_store as store
from shared.auth import Role
from shared.config import Settings
from shared.domain import tracking
from shared.domain.geo import Fix
from shared.domain.tracking import ShipmentState
from shared.envelopes import timestamp
from shared.pb import common_pb2, envelope_pb2, shipment_pb2, tracking_pb2, tracking_pb2_grpc
from shared.rpc import field_violations
from tests.ingest_helpers import (
    Metadata,
    RunningService,
    bearer,
    running_service,
    service_settings,
    wait_health,
)
from tests.integration.test_projector import caught_up, running_projection
from tests.projection_helpers import (
    T0,
    envelope_for,
    fold_log,
    gps_envelope,
    lifecycle,
    prepare,
    producer_for,
    send_all,
)

pytestmark = pytest.mark.timeout(120)

TENANT = "acme"
OTHER_TENANT = "globex"
OPS = bearer(Role.OPS, tenant=TENANT)
READ_TIMEOUT_S = 30.0

Envelope = envelope_pb2.Envelope


# --- fixtures and helpers -------------------------------------------------------------


def query_settings(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str, **extra: str
) -> Settings:
    """One Settings for the query service and the projection: same topics, same schema."""
    return service_settings(
        kafka_bootstrap,
        topic_prefix,
        DATABASE_URL=database_url,
        CARGOTRACK_DB_SCHEMA=pg_schema,
        **extra,
    )


@dataclass
class Query:
    settings: Settings
    service: RunningService
    stub: Any  # tracking_pb2_grpc.TrackingServiceAsyncStub (grpc itself is untyped)

    @property
    def server(self) -> QueryServer:
        assert isinstance(self.service.server, QueryServer)
        return self.service.server


@pytest.fixture
async def query(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> AsyncIterator[Query]:
    """The service on its own schema and topics, SERVING."""
    settings = query_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    async with running_service("tracking-query", settings) as service:
        yield Query(settings, service, tracking_pb2_grpc.TrackingServiceStub(service.channel))


def shipment_log(
    tenant: str,
    shipment_id: str,
    *,
    customer: str = "cust-1",
    vehicle: str = "v1",
    driver: str = "d1",
    start: datetime = T0,
    steps: int = 4,
) -> list[Envelope]:
    """The first `steps` of created → assigned → picked up → in transit."""
    log = lifecycle(tenant, shipment_id, vehicle, start)[:steps]
    log[0].shipment_event.created.customer_id = customer
    if steps > 1:
        log[1].shipment_event.vehicle_assigned.driver_id = driver
    return log


def event(tenant: str, shipment_id: str, event_id: str, at: datetime, **kind: Any) -> Envelope:
    message = shipment_pb2.ShipmentEvent(event_id=event_id, shipment_id=shipment_id, **kind)
    message.occurred_at.CopyFrom(timestamp(at))
    return envelope_for(tenant, event_id, at, shipment_event=message)


def moving(tenant: str, vehicle: str, sequence: int, start: datetime) -> Envelope:
    """A GPS batch of the vehicle leaving the lifecycle's origin towards its destination."""
    points = [
        (start + timedelta(seconds=30 * i), 53.40 + 0.001 * i, -2.99 + 0.003 * i) for i in range(5)
    ]
    return gps_envelope(tenant, vehicle, "phone-1", sequence, points)


async def project(settings: Settings, log: list[Envelope]) -> None:
    """Write the log to Kafka and run the projection until it has caught up."""
    async with producer_for(settings) as producer:
        await send_all(producer, settings, log)
    async with running_projection(settings) as runner:
        await caught_up(runner, settings)


async def save(pool: asyncpg.Pool, states: list[ShipmentState]) -> None:
    async with pool.acquire() as connection:
        await store.save_shipments(connection, states)


async def tracking_row(pool: asyncpg.Pool, tenant: str, shipment_id: str) -> dict[str, Any] | None:
    row = await pool.fetchrow(
        "SELECT position, progress, eta FROM shipment_tracking"
        " WHERE tenant_id = $1 AND shipment_id = $2",
        tenant,
        shipment_id,
    )
    if row is None:
        return None
    return {
        name: json.loads(row[name]) if row[name] else None
        for name in ("position", "progress", "eta")
    }


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def assert_invalid(call: Awaitable[object], field: str) -> None:
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert field in [name for name, _ in field_violations(error)], field_violations(error)


async def first_watch_message(
    query: Query, shipment_id: str, metadata: Metadata
) -> tracking_pb2.Shipment:
    """Open a watch, take its first message, cancel it (raises the call's error)."""
    call = query.stub.WatchShipment(
        tracking_pb2.WatchShipmentRequest(shipment_id=shipment_id), metadata=metadata, timeout=10
    )
    try:
        reply = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
        assert reply is not grpc.aio.EOF
        shipment: tracking_pb2.Shipment = reply.shipment
        return shipment
    finally:
        call.cancel()


async def next_shipment(call: Any) -> tracking_pb2.Shipment:
    reply = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
    assert reply is not grpc.aio.EOF, "the watch ended"
    shipment: tracking_pb2.Shipment = reply.shipment
    return shipment


def sort_key(shipment: tracking_pb2.Shipment) -> tuple[datetime, str]:
    return (shipment.updated_at.ToDatetime(), shipment.shipment_id)


async def walk(
    query: Query, metadata: Metadata, page_size: int, **filters: Any
) -> list[list[tracking_pb2.Shipment]]:
    """Every page of a listing, following next_page_token until it is empty."""
    pages: list[list[tracking_pb2.Shipment]] = []
    token = ""
    while True:
        reply = await query.stub.ListShipments(
            tracking_pb2.ListShipmentsRequest(page_size=page_size, page_token=token, **filters),
            metadata=metadata,
            timeout=10,
        )
        pages.append(list(reply.shipments))
        token = reply.next_page_token
        if not token:
            return pages
        assert len(pages) < 1000, "the walk does not end"


def many_states(count: int, tenant: str = TENANT) -> dict[str, ShipmentState]:
    """`count` shipments folded from lifecycle logs; ids shp-0000...; every three share
    their updated_at (ties broken by shipment id); statuses cycle CREATED..IN_TRANSIT."""
    log: list[Envelope] = []
    for i in range(count):
        group = i // 3
        log += shipment_log(
            tenant,
            f"shp-{i:04d}",
            customer=f"cust-{i % 2}",
            start=T0 + timedelta(minutes=10 * group),
            steps=1 + group % 4,
        )
    shipments, _ = fold_log(log)
    return {key[1]: state for key, state in shipments.items()}


def expected_order(states: dict[str, ShipmentState]) -> list[str]:
    ordered = sorted(states.values(), key=lambda s: (s.updated_at, s.shipment_id), reverse=True)
    return [s.shipment_id for s in ordered]


# --- GetShipment ----------------------------------------------------------------------


async def test_get_shipment_is_the_fold_plus_live_tracking(
    query: Query, db_pool: asyncpg.Pool
) -> None:
    """Projected: two shipments, one whose vehicle moved (live position, progress, ETA)."""
    log = shipment_log(TENANT, "s1", vehicle="v1") + shipment_log(TENANT, "s2", vehicle="v2")
    log.append(moving(TENANT, "v1", 1, T0 + timedelta(minutes=10)))
    await project(query.settings, log)
    folded, _ = fold_log(log)
    live = await tracking_row(db_pool, TENANT, "s1")
    assert live is not None, "the projection computed no live tracking for s1"

    first = await query.stub.GetShipment(
        tracking_pb2.GetShipmentRequest(shipment_id="s1"), metadata=OPS, timeout=10
    )
    second = await query.stub.GetShipment(
        tracking_pb2.GetShipmentRequest(shipment_id="s2"), metadata=OPS, timeout=10
    )

    assert first.shipment == store.shipment_message(folded[(TENANT, "s1")], live)
    assert first.shipment.HasField("last_position")
    assert first.shipment.HasField("eta")
    assert second.shipment == store.shipment_message(folded[(TENANT, "s2")], None)
    assert not second.shipment.HasField("last_position")

    # The same answers written out by hand from the log (not by the code under test).
    golden_s2 = tracking_pb2.Shipment(
        shipment_id="s2",
        customer_id="cust-1",
        status=shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT,
        origin=common_pb2.LatLng(latitude=53.40, longitude=-2.99),
        destination=common_pb2.LatLng(latitude=53.43, longitude=-2.90),
        promised_window=common_pb2.TimeWindow(
            start=timestamp(T0), end=timestamp(T0 + timedelta(hours=4))
        ),
        reference="ref-s2",
        vehicle_id="v2",
        driver_id="d1",
        created_at=timestamp(T0),
        updated_at=timestamp(T0 + timedelta(minutes=3)),
    )
    # The tracking token is a derived secret (none was sent): present, distinct, and
    # otherwise out of the comparison.
    tokens = {first.shipment.tracking_token, second.shipment.tracking_token}
    assert len(tokens) == 2
    assert all(len(token) >= 16 for token in tokens)
    s2 = tracking_pb2.Shipment()
    s2.CopyFrom(second.shipment)
    s2.ClearField("tracking_token")
    assert s2 == golden_s2
    # s1: the same, with v1; its vehicle's newest fix is the last point of the batch.
    golden_s1 = tracking_pb2.Shipment()
    golden_s1.CopyFrom(golden_s2)
    golden_s1.shipment_id, golden_s1.reference, golden_s1.vehicle_id = "s1", "ref-s1", "v1"
    position = first.shipment.last_position
    assert (position.location.latitude, position.location.longitude) == pytest.approx(
        (53.404, -2.978), abs=1e-9
    )
    assert position.recorded_at == timestamp(T0 + timedelta(minutes=10, seconds=120))
    assert first.shipment.eta.estimated_arrival.ToDatetime(UTC) > T0 + timedelta(minutes=12)
    s1_without_live = tracking_pb2.Shipment()
    s1_without_live.CopyFrom(first.shipment)
    for live_field in ("last_position", "progress", "eta", "updated_at", "tracking_token"):
        s1_without_live.ClearField(live_field)
        golden_s1.ClearField(live_field)
    assert s1_without_live == golden_s1


@pytest.mark.parametrize("shipment_id", ["", "s" * 129], ids=["empty", "too-long"])
async def test_a_bad_shipment_id_is_invalid_for_every_rpc(query: Query, shipment_id: str) -> None:
    stub = query.stub
    await assert_invalid(
        stub.GetShipment(tracking_pb2.GetShipmentRequest(shipment_id=shipment_id), metadata=OPS),
        "shipment_id",
    )
    await assert_invalid(
        stub.GetTimeline(tracking_pb2.GetTimelineRequest(shipment_id=shipment_id), metadata=OPS),
        "shipment_id",
    )
    await assert_invalid(first_watch_message(query, shipment_id, OPS), "shipment_id")


async def test_an_unknown_shipment_is_not_found(query: Query) -> None:
    error = await rpc_error(
        query.stub.GetShipment(tracking_pb2.GetShipmentRequest(shipment_id="nope"), metadata=OPS)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


# --- ListShipments --------------------------------------------------------------------


async def test_list_filters_by_status_customer_and_update_time(query: Query) -> None:
    """Projected: four shipments, newest change first."""
    log = (
        shipment_log(TENANT, "a", customer="cust-1", start=T0, steps=4)  # IN_TRANSIT
        + shipment_log(TENANT, "b", customer="cust-2", start=T0 + timedelta(hours=1), steps=2)
        + shipment_log(TENANT, "c", customer="cust-1", start=T0 + timedelta(hours=2), steps=1)
        + shipment_log(TENANT, "d", customer="cust-2", start=T0 + timedelta(hours=3), steps=4)
    )
    await project(query.settings, log)

    async def ids(**filters: Any) -> list[str]:
        [page] = await walk(query, OPS, 50, **filters)
        return [s.shipment_id for s in page]

    assert await ids() == ["d", "c", "b", "a"]
    assert await ids(statuses=[shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT]) == ["d", "a"]
    assert await ids(
        statuses=[shipment_pb2.SHIPMENT_STATUS_CREATED, shipment_pb2.SHIPMENT_STATUS_ASSIGNED]
    ) == ["c", "b"]
    assert await ids(customer_id="cust-2") == ["d", "b"]
    since = timestamp(T0 + timedelta(hours=1, minutes=1))  # b's last event: inclusive
    assert await ids(updated_since=since) == ["d", "c", "b"]
    assert await ids(
        updated_since=since, customer_id="cust-1", statuses=[shipment_pb2.SHIPMENT_STATUS_CREATED]
    ) == ["c"]
    assert await ids(customer_id="cust-9") == []


async def test_keyset_pagination_walks_every_shipment_once_in_order(
    query: Query, db_pool: asyncpg.Pool
) -> None:
    """Saved: 120 shipments (ties in updated_at included)."""
    states = many_states(120)
    await save(db_pool, list(states.values()))
    expected = expected_order(states)

    pages = await walk(query, OPS, 7)
    assert [len(p) for p in pages] == [7] * 17 + [1]
    walked = [s.shipment_id for page in pages for s in page]
    assert walked == expected

    # A page size dividing the total exactly: the last full page has no next token.
    assert [len(p) for p in await walk(query, OPS, 40)] == [40, 40, 40]
    # Default page size.
    first = await query.stub.ListShipments(tracking_pb2.ListShipmentsRequest(), metadata=OPS)
    assert len(first.shipments) == 50
    assert first.next_page_token
    # Filters hold on every page.
    in_transit = [
        s
        for page in await walk(query, OPS, 6, statuses=[shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT])
        for s in page
    ]
    assert [s.shipment_id for s in in_transit] == [
        i for i in expected if states[i].status == shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT
    ]


async def test_pagination_is_stable_when_shipments_change_between_pages(
    query: Query, db_pool: asyncpg.Pool
) -> None:
    """Saved: 120 shipments; between page 1 and the rest, four change:

    - `seen` (on page 1) gets a newer event: it is not returned again;
    - `jumped` (not reached yet) gets a newer event: it moved ahead of the cursor, so
      this walk skips it (a new walk, or updated_since, finds it first);
    - `tracked` (not reached yet) gets live tracking, `late` an event older than its
      last: neither moves, both come once, in place, with their new content.
    """
    states = many_states(120)
    await save(db_pool, list(states.values()))
    expected = expected_order(states)
    seen, jumped, tracked, late = expected[3], expected[60], expected[80], expected[90]

    page = await query.stub.ListShipments(
        tracking_pb2.ListShipmentsRequest(page_size=10), metadata=OPS
    )
    assert [s.shipment_id for s in page.shipments] == expected[:10]

    def with_event(shipment_id: str, at: datetime) -> ShipmentState:
        envelope = event(
            TENANT,
            shipment_id,
            f"{shipment_id}-late",
            at,
            exception=shipment_pb2.ShipmentException(
                kind=shipment_pb2.EXCEPTION_KIND_WEATHER, description="storm"
            ),
        )
        changed = tracking.apply(states[shipment_id], envelope)
        assert changed is not None
        return changed

    await save(
        db_pool,
        [
            with_event(seen, T0 + timedelta(days=30)),
            with_event(jumped, T0 + timedelta(days=31)),
            with_event(late, T0 - timedelta(days=1)),
        ],
    )
    await db_pool.execute(
        "INSERT INTO shipment_tracking (tenant_id, shipment_id, vehicle_id, position)"
        " VALUES ($1, $2, 'v1', $3::jsonb)",
        TENANT,
        tracked,
        json.dumps(statecodec.encode(Fix(T0 + timedelta(hours=1), 53.41, -2.95))),
    )

    rest: list[tracking_pb2.Shipment] = []
    token = page.next_page_token
    while token:
        reply = await query.stub.ListShipments(
            tracking_pb2.ListShipmentsRequest(page_size=10, page_token=token), metadata=OPS
        )
        rest += reply.shipments
        token = reply.next_page_token
    walked = list(page.shipments) + rest
    ids = [s.shipment_id for s in walked]

    assert len(ids) == len(set(ids)), "a shipment came twice"
    assert ids == [i for i in expected if i != jumped]
    keys = [sort_key(s) for s in walked]
    assert keys == sorted(keys, reverse=True), "the walk went backwards"
    by_id = {s.shipment_id: s for s in walked}
    assert by_id[tracked].HasField("last_position")
    assert by_id[late].updated_at.ToDatetime(tzinfo=UTC) == states[late].updated_at
    # A new walk starts with what changed last.
    again = await query.stub.ListShipments(
        tracking_pb2.ListShipmentsRequest(page_size=2), metadata=OPS
    )
    assert [s.shipment_id for s in again.shipments] == [jumped, seen]


@pytest.mark.parametrize("page_size", [-1, 501])
async def test_a_bad_page_size_is_invalid(query: Query, page_size: int) -> None:
    await assert_invalid(
        query.stub.ListShipments(
            tracking_pb2.ListShipmentsRequest(page_size=page_size), metadata=OPS
        ),
        "page_size",
    )


async def test_bad_filters_are_invalid(query: Query) -> None:
    await assert_invalid(
        query.stub.ListShipments(
            tracking_pb2.ListShipmentsRequest(statuses=[shipment_pb2.ShipmentStatus.ValueType(99)]),
            metadata=OPS,
        ),
        "statuses[0]",
    )
    await assert_invalid(
        query.stub.ListShipments(
            tracking_pb2.ListShipmentsRequest(customer_id="c" * 129), metadata=OPS
        ),
        "customer_id",
    )
    for since in [
        Timestamp(seconds=0, nanos=-1),
        Timestamp(seconds=10**15),
        Timestamp(seconds=253402300799, nanos=999999999),  # the last instant, rounded up
    ]:
        await assert_invalid(
            query.stub.ListShipments(
                tracking_pb2.ListShipmentsRequest(updated_since=since), metadata=OPS
            ),
            "updated_since",
        )


async def test_a_malformed_or_foreign_page_token_is_invalid(
    query: Query, db_pool: asyncpg.Pool
) -> None:
    """Saved: three shipments in each of two tenants."""
    states = many_states(3)
    others = many_states(3, OTHER_TENANT)
    await save(db_pool, [*states.values(), *others.values()])
    created = [shipment_pb2.SHIPMENT_STATUS_CREATED]
    page = await query.stub.ListShipments(
        tracking_pb2.ListShipmentsRequest(page_size=1, statuses=created), metadata=OPS
    )
    token = page.next_page_token
    assert token

    def listing(metadata: Metadata = OPS, **fields: Any) -> Awaitable[object]:
        request = tracking_pb2.ListShipmentsRequest(page_size=1, **fields)
        result: Awaitable[object] = query.stub.ListShipments(request, metadata=metadata)
        return result

    # The same token with its own filters works ...
    await listing(page_token=token, statuses=created)
    # ... not with other filters, another customer scope or another tenant.
    await assert_invalid(listing(page_token=token), "page_token")
    await assert_invalid(
        listing(page_token=token, statuses=created, customer_id="cust-0"), "page_token"
    )
    await assert_invalid(
        listing(bearer(Role.OPS, tenant=OTHER_TENANT), page_token=token, statuses=created),
        "page_token",
    )
    for garbage in ["not a token", "bm90IGpzb24", token[:-3], token + "$"]:
        await assert_invalid(listing(page_token=garbage, statuses=created), "page_token")


# --- GetTimeline ----------------------------------------------------------------------


async def test_the_timeline_is_in_log_order(query: Query) -> None:
    """Projected: a lifecycle, then an exception that happened before the pick-up but
    arrived last: the timeline keeps arrival order, not event time."""
    log = shipment_log(TENANT, "s1")
    log.append(
        event(
            TENANT,
            "s1",
            "s1-exc",
            T0 + timedelta(seconds=90),
            exception=shipment_pb2.ShipmentException(kind=shipment_pb2.EXCEPTION_KIND_DAMAGE),
        )
    )
    await project(query.settings, log)
    folded, _ = fold_log(log)

    reply = await query.stub.GetTimeline(
        tracking_pb2.GetTimelineRequest(shipment_id="s1"), metadata=OPS, timeout=10
    )

    assert list(reply.entries) == store.timeline_messages(folded[(TENANT, "s1")])
    assert [e.event_id for e in reply.entries] == ["s1-e0", "s1-e1", "s1-e2", "s1-e3", "s1-exc"]
    assert [e.kind for e in reply.entries][-1] == "exception"


# --- WatchShipment --------------------------------------------------------------------


async def test_watch_sends_the_state_then_each_change(query: Query) -> None:
    """Projected: picked up; while watching, the projection applies `in_transit`, then
    the vehicle's GPS (live tracking changes, the shipments row does not)."""
    log = shipment_log(TENANT, "s1", vehicle="v1")
    await project(query.settings, log[:3])
    async with running_projection(query.settings), producer_for(query.settings) as producer:
        call = query.stub.WatchShipment(
            tracking_pb2.WatchShipmentRequest(shipment_id="s1"), metadata=OPS
        )
        try:
            first = await next_shipment(call)
            assert first.status == shipment_pb2.SHIPMENT_STATUS_PICKED_UP

            await send_all(producer, query.settings, [log[3]])
            second = await next_shipment(call)
            assert second.status == shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT

            await send_all(
                producer, query.settings, [moving(TENANT, "v1", 1, T0 + timedelta(minutes=10))]
            )
            third = await next_shipment(call)
            while not third.HasField("last_position"):  # bounded by each read's timeout
                third = await next_shipment(call)
            assert third.status == shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT
            assert third.HasField("eta")
        finally:
            call.cancel()


async def test_watch_misses_nothing_when_the_listen_connection_drops(
    query: Query, db_pool: asyncpg.Pool
) -> None:
    """Saved: the service's LISTEN connection is killed by the server; a change made
    meanwhile still reaches the watch (re-read on reconnect, or notified after)."""
    states = many_states(1)
    await save(db_pool, list(states.values()))
    feed = query.server.feed
    await feed.wait_listening()
    call = query.stub.WatchShipment(
        tracking_pb2.WatchShipmentRequest(shipment_id="shp-0000"), metadata=OPS
    )
    try:
        first = await next_shipment(call)
        assert first.status == shipment_pb2.SHIPMENT_STATUS_CREATED
        killed = await db_pool.fetchval(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            f"cargotrack-watch:{query.settings.database.schema}",
        )
        assert killed
        cancelled = event(
            TENANT,
            "shp-0000",
            "shp-0000-x",
            T0 + timedelta(hours=1),
            cancelled=shipment_pb2.Cancelled(),
        )
        changed = tracking.apply(states["shp-0000"], cancelled)
        assert changed is not None
        await save(db_pool, [changed])
        second = await next_shipment(call)
        assert second.status == shipment_pb2.SHIPMENT_STATUS_CANCELLED
        await feed.wait_listening(connections=2)
    finally:
        call.cancel()


async def test_the_feed_rereads_after_a_gap_in_listening(
    query: Query, database_url: str, db_pool: asyncpg.Pool
) -> None:
    """A feed of our own whose reconnection waits for a gate: a change committed while
    nobody listens wakes the subscription once LISTEN is back; later ones notify."""
    states = many_states(1)
    await save(db_pool, list(states.values()))
    gate, reconnecting = asyncio.Event(), asyncio.Event()
    attempts = 0

    async def connect() -> asyncpg.Connection[Any]:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            reconnecting.set()
            await gate.wait()
        return await asyncpg.connect(database_url, server_settings={"application_name": "gap"})

    feed = ChangeFeed(query.settings.database, connect=connect)
    task = asyncio.create_task(feed.run())
    try:
        await feed.wait_listening()
        with feed.subscribe(TENANT, "shp-0000") as changes:
            await db_pool.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'gap'"
            )
            await asyncio.wait_for(reconnecting.wait(), READ_TIMEOUT_S)
            assert not feed.listening
            await save(db_pool, list(states.values()))  # notifies no one
            gate.set()
            assert await asyncio.wait_for(changes.changed(), READ_TIMEOUT_S)
            await feed.wait_listening(connections=2)
            await save(db_pool, list(states.values()))
            assert await asyncio.wait_for(changes.changed(), READ_TIMEOUT_S)
            feed.close()
            assert not await asyncio.wait_for(changes.changed(), READ_TIMEOUT_S)
        with feed.subscribe(TENANT, "shp-0000") as late:
            assert not await asyncio.wait_for(late.changed(), READ_TIMEOUT_S)
        assert feed.watchers == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_subscription_coalesces_wake_ups() -> None:
    """No database: three notifications for a key while the watcher is busy are one
    pending re-read; other keys do not wake it."""
    from shared.config import DatabaseSettings

    feed = ChangeFeed(DatabaseSettings(url="postgresql://unused@127.0.0.1:1/x", schema="s"))
    with feed.subscribe("t", "s1") as changes:
        for payload in ["t:s1", "t:s1", "t:s2", "t:s1"]:
            feed._on_notification(None, 0, feed.channel, payload)
        assert await asyncio.wait_for(changes.changed(), 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(changes.changed(), 0.05)
    assert feed.watchers == 0


async def test_watches_end_normally_when_the_server_stops(
    kafka_bootstrap: str,
    database_url: str,
    topic_prefix: str,
    pg_schema: str,
    db_pool: asyncpg.Pool,
) -> None:
    """Saved state; the grace period is long (20 s): the open watch ends by itself, at
    once, with OK, and the server stops well within the grace."""
    settings = query_settings(
        kafka_bootstrap, database_url, topic_prefix, pg_schema, CARGOTRACK_SHUTDOWN_GRACE_S="20"
    )
    server = QueryServer(settings)
    port = await server.start()
    try:
        await save(db_pool, list(many_states(1).values()))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_health(channel)
            call = tracking_pb2_grpc.TrackingServiceStub(channel).WatchShipment(
                tracking_pb2.WatchShipmentRequest(shipment_id="shp-0000"), metadata=OPS
            )
            await next_shipment(call)
            stopping = asyncio.create_task(server.stop())
            assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            await asyncio.wait_for(stopping, 10)
    finally:
        await server.stop()


# --- TrackByToken ---------------------------------------------------------------------


async def test_track_by_token_is_public_and_shows_no_private_fields(query: Query) -> None:
    """Projected: a travelling shipment (live ETA) with distinctive private values."""
    log = shipment_log(
        TENANT, "s1", customer="cust-secret-3", vehicle="veh-secret-7", driver="drv-secret-9"
    )
    log.append(moving(TENANT, "veh-secret-7", 1, T0 + timedelta(minutes=10)))
    log.append(
        event(
            TENANT,
            "s1",
            "s1-evt-secret",
            T0 + timedelta(minutes=20),
            exception=shipment_pb2.ShipmentException(
                kind=shipment_pb2.EXCEPTION_KIND_CUSTOMS_HOLD, description="note-secret-1"
            ),
        )
    )
    await project(query.settings, log)
    full = (
        await query.stub.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id="s1"), metadata=OPS
        )
    ).shipment
    assert full.tracking_token

    reply = await query.stub.TrackByToken(
        tracking_pb2.TrackByTokenRequest(tracking_token=full.tracking_token), timeout=10
    )

    public = reply.shipment
    assert public.status == shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT
    assert public.reference == "ref-s1"
    assert public.promised_window == full.promised_window
    assert public.updated_at == full.updated_at
    assert public.HasField("eta")
    assert public.eta == full.eta
    assert [e.kind for e in public.timeline] == [
        "created",
        "vehicle_assigned",
        "picked_up",
        "in_transit",
        "exception",
    ]
    assert all(e.HasField("occurred_at") and e.status for e in public.timeline)
    wire = reply.SerializeToString()
    for secret in [
        "cust-secret-3",
        "veh-secret-7",
        "drv-secret-9",
        "s1-e0",
        "evt-secret",
        "note-secret",
    ]:
        assert secret.encode() not in wire, secret


async def test_track_by_token_hides_the_eta_once_delivered(query: Query) -> None:
    """Projected in two steps: travelling with live ETA, then delivered."""
    log = shipment_log(TENANT, "s1", vehicle="v1")
    log.append(moving(TENANT, "v1", 1, T0 + timedelta(minutes=10)))
    await project(query.settings, log)
    delivered_at = T0 + timedelta(hours=1)
    await project(
        query.settings,
        [event(TENANT, "s1", "s1-done", delivered_at, delivered=shipment_pb2.Delivered())],
    )
    full = (
        await query.stub.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id="s1"), metadata=OPS
        )
    ).shipment
    assert full.HasField("eta"), "the staff view keeps the last ETA"

    public = (
        await query.stub.TrackByToken(
            tracking_pb2.TrackByTokenRequest(tracking_token=full.tracking_token)
        )
    ).shipment

    assert public.status == shipment_pb2.SHIPMENT_STATUS_DELIVERED
    assert public.delivered_at == timestamp(delivered_at)
    assert not public.HasField("eta")


async def test_watch_by_token_streams_the_public_view_and_hides_the_van_after_delivery(
    query: Query,
) -> None:
    log = shipment_log(TENANT, "s1", customer="cust-secret-3", vehicle="veh-secret-7")
    log.append(moving(TENANT, "veh-secret-7", 1, T0 + timedelta(minutes=10)))
    await project(query.settings, log)
    full = (
        await query.stub.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id="s1"), metadata=OPS
        )
    ).shipment
    call = query.stub.WatchByToken(
        tracking_pb2.WatchByTokenRequest(tracking_token=full.tracking_token), timeout=30
    )
    first = (await call.read()).shipment
    assert first.status == shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT
    assert first.HasField("last_position")
    assert first.HasField("destination")
    assert first.last_position == full.last_position
    assert b"veh-secret-7" not in first.SerializeToString()
    await project(
        query.settings,
        [
            event(
                TENANT, "s1", "s1-done", T0 + timedelta(hours=1), delivered=shipment_pb2.Delivered()
            )
        ],
    )
    second = (await call.read()).shipment
    call.cancel()
    assert second.status == shipment_pb2.SHIPMENT_STATUS_DELIVERED
    assert not second.HasField("last_position"), "no position after delivery"
    assert not second.HasField("eta")
    assert not second.planned_route
    assert second.HasField("destination")


async def test_track_by_token_answers(query: Query) -> None:
    unknown = await rpc_error(
        query.stub.TrackByToken(tracking_pb2.TrackByTokenRequest(tracking_token="A" * 22))
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    for malformed in ["", "A" * 65, "abc$def", "abc def", "abc=="]:
        await assert_invalid(
            query.stub.TrackByToken(tracking_pb2.TrackByTokenRequest(tracking_token=malformed)),
            "tracking_token",
        )


# --- authorization ----------------------------------------------------------------------


async def assert_every_read_is_not_found(
    query: Query, shipment_id: str, metadata: Metadata
) -> None:
    """GetShipment, GetTimeline and WatchShipment answer exactly as for no shipment."""
    reference = await rpc_error(
        query.stub.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id="no-such-shipment"), metadata=metadata
        )
    )
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "GetShipment": lambda: query.stub.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id=shipment_id), metadata=metadata
        ),
        "GetTimeline": lambda: query.stub.GetTimeline(
            tracking_pb2.GetTimelineRequest(shipment_id=shipment_id), metadata=metadata
        ),
        "WatchShipment": lambda: first_watch_message(query, shipment_id, metadata),
    }
    for name, call in calls.items():
        error = await rpc_error(call())
        assert error.code() == grpc.StatusCode.NOT_FOUND, name
        assert error.details() == reference.details(), name


async def listed(query: Query, metadata: Metadata, **filters: Any) -> list[str]:
    return [s.shipment_id for page in await walk(query, metadata, 100, **filters) for s in page]


async def test_another_tenants_shipment_is_not_found_by_any_rpc(query: Query) -> None:
    """Projected: acme and globex each have a shipment "both" (different customers);
    only acme has "acme-only"."""
    log = (
        shipment_log(TENANT, "acme-only", customer="cust-1")
        + shipment_log(TENANT, "both", customer="cust-1")
        + shipment_log(OTHER_TENANT, "both", customer="cust-g", vehicle="gv")
    )
    await project(query.settings, log)
    globex = bearer(Role.DISPATCHER, tenant=OTHER_TENANT)
    globex_customer = bearer(Role.CUSTOMER, tenant=OTHER_TENANT, customer_id="cust-1")

    for metadata in (globex, globex_customer):
        await assert_every_read_is_not_found(query, "acme-only", metadata)
    assert await listed(query, globex) == ["both"]
    assert await listed(query, globex, customer_id="cust-1") == []
    assert await listed(query, globex_customer) == []
    own = await query.stub.GetShipment(
        tracking_pb2.GetShipmentRequest(shipment_id="both"), metadata=globex
    )
    assert own.shipment.customer_id == "cust-g"
    assert (await first_watch_message(query, "both", globex)).customer_id == "cust-g"
    timeline = await query.stub.GetTimeline(
        tracking_pb2.GetTimelineRequest(shipment_id="both"), metadata=globex
    )
    assert [e.event_id for e in timeline.entries] == [f"both-e{i}" for i in range(4)]
    # Public tracking crosses tenants by design: the token is the secret, not the caller.
    acme_token = (
        await query.stub.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id="acme-only"), metadata=OPS
        )
    ).shipment.tracking_token
    public = await query.stub.TrackByToken(
        tracking_pb2.TrackByTokenRequest(tracking_token=acme_token), metadata=globex
    )
    assert public.shipment.reference == "ref-acme-only"


async def test_a_customer_sees_only_its_own_shipments(query: Query) -> None:
    """Projected: cust-1 owns "mine", cust-2 owns "theirs", in the same tenant."""
    log = shipment_log(TENANT, "mine", customer="cust-1") + shipment_log(
        TENANT, "theirs", customer="cust-2"
    )
    await project(query.settings, log)
    customer = bearer(Role.CUSTOMER, tenant=TENANT, customer_id="cust-1")

    await assert_every_read_is_not_found(query, "theirs", customer)
    assert await listed(query, customer) == ["mine"]
    assert await listed(query, customer, customer_id="cust-2") == []
    assert await listed(query, OPS) == ["theirs", "mine"]
    mine = await query.stub.GetShipment(
        tracking_pb2.GetShipmentRequest(shipment_id="mine"), metadata=customer
    )
    assert mine.shipment.customer_id == "cust-1"
    assert (await first_watch_message(query, "mine", customer)).shipment_id == "mine"


def every_authenticated_rpc(
    query: Query, metadata: Metadata | None
) -> dict[str, Awaitable[object]]:
    stub = query.stub
    return {
        "GetShipment": stub.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id="x"), metadata=metadata
        ),
        "ListShipments": stub.ListShipments(tracking_pb2.ListShipmentsRequest(), metadata=metadata),
        "GetTimeline": stub.GetTimeline(
            tracking_pb2.GetTimelineRequest(shipment_id="x"), metadata=metadata
        ),
        "WatchShipment": first_watch_message(query, "x", metadata or ()),
    }


async def test_no_token_is_unauthenticated_except_for_public_tracking(query: Query) -> None:
    for name, call in every_authenticated_rpc(query, None).items():
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name
    error = await rpc_error(
        query.stub.TrackByToken(tracking_pb2.TrackByTokenRequest(tracking_token="A" * 22))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_drivers_may_not_read_and_the_reader_roles_may(query: Query) -> None:
    driver = bearer(Role.DRIVER, tenant=TENANT, vehicle_id="v1")
    for name, call in every_authenticated_rpc(query, driver).items():
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, name
    readers = [
        bearer(Role.OPS, tenant=TENANT),
        bearer(Role.SHIPPER, tenant=TENANT),
        bearer(Role.DISPATCHER, tenant=TENANT),
        bearer(Role.CUSTOMER, tenant=TENANT, customer_id="cust-1"),
    ]
    for metadata in readers:
        await query.stub.ListShipments(tracking_pb2.ListShipmentsRequest(), metadata=metadata)
        error = await rpc_error(
            query.stub.GetShipment(
                tracking_pb2.GetShipmentRequest(shipment_id="x"), metadata=metadata
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND


# --- health and process ---------------------------------------------------------------


async def test_health_and_reflection(query: Query) -> None:
    health = health_pb2_grpc.HealthStub(query.service.channel)
    for name in ["", SERVICE_NAME, "liveness"]:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    stub = reflection_pb2_grpc.ServerReflectionStub(query.service.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    [reply] = [reply async for reply in call]
    assert SERVICE_NAME in {s.name for s in reply.list_services_response.service}


async def test_cargotrack_serve_tracking_query_drains_watches_and_stops_on_sigterm(
    kafka_bootstrap: str, database_url: str, pg_schema: str
) -> None:
    """The real process: `cargotrack serve tracking-query`, a watch open, SIGTERM: the
    watch ends with OK, the process exits 0."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "DATABASE_URL": database_url,
        "CARGOTRACK_DB_SCHEMA": pg_schema,
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_GRPC_PORT": "0",
        "CARGOTRACK_SHUTDOWN_GRACE_S": "20",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from services.cli import main; main()",
        "serve",
        "tracking-query",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=None,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("tracking-query listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        connection = await asyncpg.connect(database_url, server_settings={"search_path": pg_schema})
        try:
            await store.save_shipments(connection, list(many_states(1).values()))
        finally:
            await connection.close()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_health(channel)
            call = tracking_pb2_grpc.TrackingServiceStub(channel).WatchShipment(
                tracking_pb2.WatchShipmentRequest(shipment_id="shp-0000"), metadata=OPS
            )
            await next_shipment(call)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
