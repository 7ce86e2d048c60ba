"""Streams end when the caller's token expires (issue 12, finding 3), real services.

WatchShipment (tracking-query) and SubscribeDelays (dispatch) are opened with tokens
that live two seconds. Each stream must end with UNAUTHENTICATED soon after the
expiry, and a client that renews its token and resumes must lose nothing: a watch
starts again with the current state, a subscription resumes from the resume token of
the last alert it received. Before issue 12 both streams kept delivering.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaProducer

from shared.auth import STREAM_TOKEN_EXPIRED, Role
from shared.pb import gps_pb2, gps_pb2_grpc, shipment_pb2, tracking_pb2, tracking_pb2_grpc
from tests.ingest_helpers import bearer, gps_batch, running_service, service_settings
from tests.integration.test_dispatch import (
    LATE,
    alert_envelope,
    expect_error,
    publish,
    running_dispatch,
    subscribe,
)
from tests.integration.test_tracking_query import (
    TENANT,
    Query,
    event,
    next_shipment,
    project,
    query_settings,
    shipment_log,
)
from tests.projection_helpers import T0, prepare, producer_for

pytestmark = pytest.mark.timeout(120)

#: Seconds a short-lived token lives (its `exp` is whole seconds, so 1 to 2 s in fact).
SHORT_TTL_S = 2


@pytest.fixture
async def query(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> AsyncIterator[Query]:
    settings = query_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    async with running_service("tracking-query", settings) as service:
        yield Query(settings, service, tracking_pb2_grpc.TrackingServiceStub(service.channel))


async def stream_error(call: Any) -> grpc.aio.AioRpcError:
    """Read the stream until it fails (bounded); its error."""
    async with asyncio.timeout(30):
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as error:
            return error
    raise AssertionError("the stream ended normally")


async def test_a_watch_ends_unauthenticated_at_expiry_and_a_renewed_watch_misses_nothing(
    query: Query,
) -> None:
    await project(query.settings, shipment_log(TENANT, "s1", steps=2))  # assigned
    short = bearer(Role.OPS, tenant=TENANT, ttl_s=SHORT_TTL_S)
    watch = query.stub.WatchShipment(
        tracking_pb2.WatchShipmentRequest(shipment_id="s1"), metadata=short
    )
    first = await next_shipment(watch)
    assert first.status == shipment_pb2.SHIPMENT_STATUS_ASSIGNED

    error = await stream_error(watch)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == STREAM_TOKEN_EXPIRED
    # The same token is refused from now on, also for a new watch.
    again = query.stub.WatchShipment(
        tracking_pb2.WatchShipmentRequest(shipment_id="s1"), metadata=short
    )
    assert (await stream_error(again)).code() == grpc.StatusCode.UNAUTHENTICATED

    # A change while the client holds no valid token...
    picked = event(
        TENANT, "s1", "s1-pick", T0 + timedelta(minutes=30), picked_up=shipment_pb2.PickedUp()
    )
    await project(query.settings, [picked])
    # ...is the first thing the renewed watch shows.
    renewed = query.stub.WatchShipment(
        tracking_pb2.WatchShipmentRequest(shipment_id="s1"),
        metadata=bearer(Role.OPS, tenant=TENANT),
    )
    try:
        assert (await next_shipment(renewed)).status == shipment_pb2.SHIPMENT_STATUS_PICKED_UP
    finally:
        renewed.cancel()


async def test_a_subscription_ends_unauthenticated_at_expiry_and_resumes_without_a_gap(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = service_settings(kafka_bootstrap, topic_prefix)
    producer: AIOKafkaProducer
    async with producer_for(settings) as producer, running_dispatch(settings) as dispatch:
        short = bearer(Role.DISPATCHER, tenant="tenant-a", ttl_s=SHORT_TTL_S)
        subscriber = subscribe(dispatch.channel, short)
        await subscriber.subscribed()
        before = await publish(
            producer, settings, [alert_envelope(f"s{i}", LATE) for i in range(5)]
        )
        assert sorted(await subscriber.read(5)) == sorted(before)

        error = await expect_error(subscriber)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == STREAM_TOKEN_EXPIRED

        # Alerts written while the client renews its token.
        meanwhile = await publish(
            producer, settings, [alert_envelope(f"s{i}", LATE) for i in range(5)]
        )
        resumed = subscribe(
            dispatch.channel,
            bearer(Role.DISPATCHER, tenant="tenant-a"),
            resume_token=subscriber.last_token,
        )
        try:
            assert sorted(await resumed.read(5)) == sorted(meanwhile)
        finally:
            resumed.cancel()
        seen = subscriber.ids + resumed.ids
        assert len(seen) == len(set(seen)), "an alert was delivered twice"


async def test_a_gps_stream_ends_unauthenticated_at_expiry_after_answering_its_batches(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The bound applies to every streaming response, GPS ingest's bidi stream too: the
    driver's app reconnects with a new token and resends what was not answered."""
    settings = service_settings(kafka_bootstrap, topic_prefix)
    async with running_service("gps-ingest", settings) as service:
        stub = gps_pb2_grpc.GpsIngestServiceStub(service.channel)
        short = bearer(Role.DRIVER, tenant="tenant-a", vehicle_id="veh-1", ttl_s=SHORT_TTL_S)
        call = stub.StreamPoints(metadata=short)
        await call.write(gps_pb2.StreamPointsRequest(batch=gps_batch("veh-1", 1)))
        async with asyncio.timeout(30):
            first = await call.read()
        assert first.outcome == gps_pb2.BATCH_OUTCOME_ACCEPTED
        error = await stream_error(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == STREAM_TOKEN_EXPIRED
