"""Record size against the session's real Kafka broker (issue 12, finding 4).

A request whose record would be over its topic's max.message.bytes is refused with
INVALID_ARGUMENT naming the field, before anything is produced, and the next valid
write on the same partition goes through on the same producer. Unknown fields never
reach Kafka.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from bench.workload import varint
from shared.auth import Role
from shared.config import Settings
from shared.domain.polyline import encode as encode_polyline
from shared.ingest import IngestServer
from shared.kafka import topic_record_limits, topic_specs
from shared.pb import gps_pb2, gps_pb2_grpc, shipment_pb2, shipment_pb2_grpc
from shared.rpc import field_violations
from tests.ingest_helpers import (
    RunningService,
    bearer,
    consume_envelopes,
    gps_batch,
    running_service,
    service_settings,
    shipment_created,
    shipment_event,
    topic_end_offsets,
)

pytestmark = pytest.mark.timeout(90)

SHIPPER = bearer(Role.SHIPPER, tenant="tenant-a")
DRIVER = bearer(Role.DRIVER, tenant="tenant-a", vehicle_id="veh-1")
#: The topics' max.message.bytes in these tests: a plain event fits, a long planned
#: route (valid: at most 256 KiB) or a 1000-point GPS batch does not.
SMALL_LIMIT = 16 * 1024


async def create_topics(settings: Settings, max_message_bytes: int) -> None:
    """Create every topic of `settings` before the service does, with a record limit."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    spec.name,
                    spec.partitions,
                    spec.replication_factor,
                    topic_configs={"max.message.bytes": str(max_message_bytes)},
                )
                for spec in topic_specs(settings.topics)
            ]
        )
    finally:
        await admin.close()


async def set_record_limit(settings: Settings, topic: str, max_message_bytes: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(max_message_bytes)}
                )
            ]
        )
    finally:
        await admin.close()
    # The broker applies a topic's new configuration asynchronously.
    async with asyncio.timeout(20):
        while True:
            limits = await topic_record_limits(settings.kafka, [topic])
            if limits.get(topic) == max_message_bytes:
                return
            await asyncio.sleep(0.1)


@pytest.fixture
async def small_topics(kafka_bootstrap: str, topic_prefix: str) -> Settings:
    settings = service_settings(kafka_bootstrap, topic_prefix)
    await create_topics(settings, SMALL_LIMIT)
    return settings


@pytest.fixture
async def events(small_topics: Settings) -> AsyncIterator[RunningService]:
    async with running_service("shipment-events", small_topics) as service:
        yield service


def long_route(points: int = 20_000) -> str:
    """A valid encoded polyline of `points` points (about 8 bytes each)."""
    return encode_polyline([(48.0 + i * 1e-3, 11.0 + (i % 7) * 1e-3) for i in range(points)])


def oversized_created(shipment_id: str) -> shipment_pb2.ShipmentEvent:
    event = shipment_created(shipment_id)
    event.created.planned_route = long_route()
    return event


def producer_of(service: RunningService) -> object:
    server = service.server
    assert isinstance(server, IngestServer)
    return server.kafka._producer


async def record_event(service: RunningService, event: shipment_pb2.ShipmentEvent) -> None:
    await shipment_pb2_grpc.ShipmentEventsServiceStub(service.channel).RecordEvent(
        shipment_pb2.RecordEventRequest(event=event), metadata=SHIPPER, timeout=10
    )


async def test_unknown_fields_are_discarded_before_encoding(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = service_settings(kafka_bootstrap, topic_prefix)
    async with running_service("shipment-events", settings) as service:
        event = shipment_event("shp-unknown")
        # Field 4000, length-delimited (wire type 2), 1.5 MiB: unknown to ShipmentEvent.
        junk = b"x" * (3 << 19)
        raw = event.SerializeToString() + varint(4000 << 3 | 2) + varint(len(junk)) + junk
        carrying = shipment_pb2.ShipmentEvent.FromString(raw)
        assert carrying.ByteSize() > len(junk), "the message carries the unknown field"
        await record_event(service, carrying)
        [stored] = await consume_envelopes(kafka_bootstrap, settings.topics.shipment_events, 1)
    assert stored.envelope.shipment_event.event_id == event.event_id
    assert stored.envelope.ByteSize() < 2000, "the unknown field was not written to Kafka"


async def test_oversized_record_is_refused_and_the_next_write_succeeds(
    events: RunningService, kafka_bootstrap: str
) -> None:
    topics = events.settings.topics
    producer = producer_of(events)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record_event(events, oversized_created("shp-1"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    [(field, description)] = field_violations(caught.value)
    assert field == "event"
    assert f"{SMALL_LIMIT}-byte limit" in description

    # A valid request right after it, same key (same partition), same producer: it is
    # answered within a deadline shorter than the Kafka timeout a stall would cost.
    await shipment_pb2_grpc.ShipmentEventsServiceStub(events.channel).RecordEvent(
        shipment_pb2.RecordEventRequest(event=shipment_event("shp-1")),
        metadata=SHIPPER,
        timeout=events.settings.kafka.request_timeout_s / 2,
    )
    assert producer_of(events) is producer, "the producer was not replaced"

    # In a batch, nothing is written when one record is too large, and it is named.
    before = await topic_end_offsets(kafka_bootstrap, topics.shipment_events, topics.partitions)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await shipment_pb2_grpc.ShipmentEventsServiceStub(events.channel).RecordEvents(
            shipment_pb2.RecordEventsRequest(
                events=[shipment_event("shp-2"), oversized_created("shp-3")]
            ),
            metadata=SHIPPER,
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(caught.value)] == ["events[1]"]
    after = await topic_end_offsets(kafka_bootstrap, topics.shipment_events, topics.partitions)
    assert after == before == 1


async def test_oversized_gps_batch_is_rejected_and_the_stream_goes_on(
    small_topics: Settings,
) -> None:
    async with running_service("gps-ingest", small_topics) as service:
        call = gps_pb2_grpc.GpsIngestServiceStub(service.channel).StreamPoints(
            metadata=DRIVER, timeout=30
        )
        for batch in (gps_batch("veh-1", 1, points=1000), gps_batch("veh-1", 2, points=5)):
            await call.write(gps_pb2.StreamPointsRequest(batch=batch))
        await call.done_writing()
        answers = [answer async for answer in call]
    assert [a.outcome for a in answers] == [
        gps_pb2.BATCH_OUTCOME_REJECTED,
        gps_pb2.BATCH_OUTCOME_ACCEPTED,
    ]
    assert [v.field for v in answers[0].violations] == ["batch"]


async def test_broker_refusal_is_permanent_and_does_not_stall_the_partition(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The topic's limit is lowered after the service read it: the broker refuses the
    record itself. The client still gets INVALID_ARGUMENT (never UNAVAILABLE), and
    the next valid write of that partition succeeds within a short deadline."""
    settings = service_settings(kafka_bootstrap, topic_prefix)
    async with running_service("shipment-events", settings) as service:
        await set_record_limit(settings, settings.topics.shipment_events, SMALL_LIMIT)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await record_event(service, oversized_created("shp-1"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        await shipment_pb2_grpc.ShipmentEventsServiceStub(service.channel).RecordEvent(
            shipment_pb2.RecordEventRequest(event=shipment_event("shp-1")),
            metadata=SHIPPER,
            timeout=settings.kafka.request_timeout_s / 2,
        )
        # The new producer's connection re-read the limit: now refused before producing.
        server = service.server
        assert isinstance(server, IngestServer)
        assert server.kafka.record_limit(settings.topics.shipment_events) == SMALL_LIMIT
