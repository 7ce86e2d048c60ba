"""Kafka down: every ingest call fails with UNAVAILABLE within its deadline, never hangs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import OutOfOrderSequenceNumber
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.devstack import KafkaBroker
from devtools.devstack.ports import free_ports
from shared.auth import Role
from shared.envelopes import EncodedRecord
from shared.ingest import KafkaLink
from shared.kafka import KafkaUnavailable, topic_specs
from shared.pb import (
    delivery_pb2,
    delivery_pb2_grpc,
    gps_pb2,
    gps_pb2_grpc,
    shipment_pb2,
    shipment_pb2_grpc,
)
from tests.ingest_helpers import (
    ConsumedEnvelope,
    RunningService,
    bearer,
    consume_envelopes,
    delivery_confirmation,
    gps_batch,
    high_water_dedupe,
    running_service,
    service_settings,
    shipment_event,
    wait_health,
)
from tests.unit.test_kafka_producer import assert_idempotent_acks_all

pytestmark = pytest.mark.timeout(120)

DRIVER = bearer(Role.DRIVER, vehicle_id="veh-1")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def nowhere(topic_prefix: str) -> AsyncIterator[dict[str, RunningService]]:
    """The three services, configured for a Kafka port where nothing listens."""
    [closed_port] = free_ports(1)
    settings = service_settings(
        f"127.0.0.1:{closed_port}", topic_prefix, CARGOTRACK_KAFKA_TIMEOUT_S=1.5
    )
    async with (
        running_service("gps-ingest", settings, wait_serving=False) as gps,
        running_service("shipment-events", settings, wait_serving=False) as events,
        running_service("delivery-confirmations", settings, wait_serving=False) as deliveries,
    ):
        yield {"gps": gps, "events": events, "deliveries": deliveries}


async def stream(
    service: RunningService, batches: list[gps_pb2.GpsBatch], deadline_s: float
) -> list[gps_pb2.StreamPointsResponse]:
    call = gps_pb2_grpc.GpsIngestServiceStub(service.channel).StreamPoints(
        iter([gps_pb2.StreamPointsRequest(batch=b) for b in batches]),
        metadata=DRIVER,
        timeout=deadline_s,
    )
    return [answer async for answer in call]


async def unavailable_within(deadline_s: float, call: object) -> float:
    """Await call; assert it failed with UNAVAILABLE before deadline_s; return the time taken."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    took = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert took < deadline_s
    return took


async def test_health_is_not_serving_while_kafka_is_unreachable(
    nowhere: dict[str, RunningService],
) -> None:
    for service in nowhere.values():
        health = health_pb2_grpc.HealthStub(service.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == NOT_SERVING


async def test_gps_stream_gets_unavailable_after_the_kafka_timeout(
    nowhere: dict[str, RunningService],
) -> None:
    took = await unavailable_within(5.0, stream(nowhere["gps"], [gps_batch("veh-1", 1)], 5.0))
    assert took >= 1.0, "it waited for Kafka (CARGOTRACK_KAFKA_TIMEOUT_S=1.5) first"


async def test_shipment_event_gets_unavailable(nowhere: dict[str, RunningService]) -> None:
    stub = shipment_pb2_grpc.ShipmentEventsServiceStub(nowhere["events"].channel)
    shipper = bearer(Role.SHIPPER)
    await unavailable_within(
        5.0,
        stub.RecordEvent(
            shipment_pb2.RecordEventRequest(event=shipment_event()), metadata=shipper, timeout=5
        ),
    )
    await unavailable_within(
        5.0,
        stub.RecordEvents(
            shipment_pb2.RecordEventsRequest(events=[shipment_event(), shipment_event()]),
            metadata=shipper,
            timeout=5,
        ),
    )


async def test_delivery_confirmation_gets_unavailable(nowhere: dict[str, RunningService]) -> None:
    stub = delivery_pb2_grpc.DeliveryConfirmationsServiceStub(nowhere["deliveries"].channel)
    await unavailable_within(
        5.0,
        stub.ConfirmDelivery(
            delivery_pb2.ConfirmDeliveryRequest(confirmation=delivery_confirmation()),
            metadata=DRIVER,
            timeout=5,
        ),
    )


async def test_a_deadline_shorter_than_the_kafka_timeout_still_gets_unavailable(
    topic_prefix: str,
) -> None:
    """The service answers UNAVAILABLE before the client's deadline, not DEADLINE_EXCEEDED.

    A 4 s deadline, far below the 30 s Kafka timeout: the service keeps 10 % of it
    (0.4 s) for the answer to travel back, enough on a busy machine (1 s left 0.1 s)."""
    [closed_port] = free_ports(1)
    settings = service_settings(
        f"127.0.0.1:{closed_port}", topic_prefix, CARGOTRACK_KAFKA_TIMEOUT_S=30
    )
    async with running_service("gps-ingest", settings, wait_serving=False) as gps:
        await unavailable_within(4.0, stream(gps, [gps_batch("veh-1", 1)], 4.0))
    async with running_service("shipment-events", settings, wait_serving=False) as events:
        stub = shipment_pb2_grpc.ShipmentEventsServiceStub(events.channel)
        await unavailable_within(
            4.0,
            stub.RecordEvent(
                shipment_pb2.RecordEventRequest(event=shipment_event()),
                metadata=bearer(Role.OPS),
                timeout=4.0,
            ),
        )


async def test_broker_stopped_mid_stream_then_back_loses_nothing(
    dedicated_broker: KafkaBroker, topic_prefix: str
) -> None:
    """A dedicated broker: ack, stop it, UNAVAILABLE within the deadline, NOT_SERVING;
    start it again, resend the unacknowledged batches: every sequence is stored once
    per copy with one event id, first copies in order."""
    broker = dedicated_broker
    try:
        settings = service_settings(
            broker.bootstrap_servers, topic_prefix, CARGOTRACK_KAFKA_TIMEOUT_S=2
        )
        async with running_service("gps-ingest", settings) as gps:
            stub = gps_pb2_grpc.GpsIngestServiceStub(gps.channel)
            call = stub.StreamPoints(metadata=DRIVER, timeout=10)
            await call.write(gps_pb2.StreamPointsRequest(batch=gps_batch("veh-1", 1)))
            first = await call.read()
            assert first.outcome == gps_pb2.BATCH_OUTCOME_ACCEPTED

            await broker.stop()

            unacked = [gps_batch("veh-1", 2), gps_batch("veh-1", 3)]
            started = time.monotonic()
            for batch in unacked:
                await call.write(gps_pb2.StreamPointsRequest(batch=batch))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 10
            assert "resend" in (caught.value.details() or "")
            await wait_health(gps.channel, NOT_SERVING, timeout_s=10)

            await broker.start(keep_data=True)
            await wait_health(gps.channel, timeout_s=60)
            answers = await stream(gps, unacked, 30)
            assert [(a.sequence, a.outcome) for a in answers] == [
                (2, gps_pb2.BATCH_OUTCOME_ACCEPTED),
                (3, gps_pb2.BATCH_OUTCOME_ACCEPTED),
            ]

            def complete(found: list[ConsumedEnvelope]) -> bool:
                return {r.envelope.gps_batch.sequence for r in found} == {1, 2, 3}

            records = await consume_envelopes(
                broker.bootstrap_servers, settings.topics.gps_points, until=complete
            )
            ids: dict[int, set[str]] = {}
            for record in records:
                ids.setdefault(record.envelope.gps_batch.sequence, set()).add(
                    record.envelope.event_id
                )
            assert all(len(found) == 1 for found in ids.values())
            sequences = [r.envelope.gps_batch.sequence for r in records]
            assert list(dict.fromkeys(sequences)) == [1, 2, 3]
            assert high_water_dedupe(records) == [1, 2, 3]

            # A crash this time, and the service stops while its producer still holds
            # an unacknowledged record: shutdown is bounded, not a hang.
            await broker.kill()
            await unavailable_within(10.0, stream(gps, [gps_batch("veh-1", 4)], 10))
            stopping = time.monotonic()
        took = time.monotonic() - stopping
        grace, kafka_timeout = settings.grpc.shutdown_grace_s, settings.kafka.request_timeout_s
        assert took < grace + 2 * kafka_timeout + 1
    finally:
        await broker.kill()


async def test_a_producer_out_of_sync_with_the_broker_is_replaced(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """aiokafka#1017: after a broker outage longer than the Kafka timeout, a batch can
    be failed unsent with its sequence number spent, and the broker then refuses
    every later batch of the partition as out of order, for good. KafkaLink replaces
    such a producer. The broker outage cannot make that state happen on demand (it
    needs a batch to expire in the instant the restarted broker has no leader yet),
    so the test puts the producer in exactly that state, a spent sequence number on
    every partition, and the real broker does the rest."""
    settings = service_settings(kafka_bootstrap, topic_prefix, CARGOTRACK_KAFKA_TIMEOUT_S=2)
    topic = settings.topics.shipment_events
    link = KafkaLink(settings.kafka, topic_specs(settings.topics))
    await link.start()
    try:
        assert await link.wait_connected(60)
        broken = await link.producer(5)
        assert_idempotent_acks_all(broken)
        await link.write(topic, EncodedRecord(b"shp-1", b"before", []), 10)
        for partition in range(settings.topics.partitions):
            broken._txn_manager.increment_sequence_number(TopicPartition(topic, partition), 1)
        with pytest.raises(KafkaUnavailable) as refused:
            await link.write(topic, EncodedRecord(b"shp-1", b"refused", []), 5)
        assert isinstance(refused.value.__cause__, OutOfOrderSequenceNumber)
        failures = []
        async with asyncio.timeout(30):
            while True:
                try:
                    await link.write(topic, EncodedRecord(b"shp-1", b"after", []), 2)
                    break
                except KafkaUnavailable as error:  # the new producer is connecting
                    failures.append(repr(error.__cause__))
                    await asyncio.sleep(0.2)
        assert await link.producer(5) is not broken
    finally:
        await link.stop()
    assert not any("OutOfOrder" in failure for failure in failures), failures
