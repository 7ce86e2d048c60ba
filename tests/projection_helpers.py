"""Helpers for tests of the projector against real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared.config import Settings, load_settings
from shared.db import Connection, migrate
from shared.domain import tracking
from shared.domain.tracking import ShipmentState, VehicleState
from shared.envelopes import encode, timestamp
from shared.kafka import ensure_topics, make_producer, topic_specs
from shared.pb import common_pb2, envelope_pb2, gps_pb2, shipment_pb2
from shared.projection import Delivered, Projection

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)


def projector_settings(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, schema: str, **extra: str
) -> Settings:
    return load_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "DATABASE_URL": database_url,
            "CARGOTRACK_DB_SCHEMA": schema,
            "CARGOTRACK_DEV_MODE": "1",
            "CARGOTRACK_TOPIC_PREFIX": topic_prefix,
            "CARGOTRACK_TOPIC_PARTITIONS": "3",
            "CARGOTRACK_KAFKA_TIMEOUT_S": "10",
            "CARGOTRACK_LOG_FORMAT": "console",
            **extra,
        }
    )


def in_process_server_settings(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, schema: str, **extra: str
) -> Settings:
    """`projector_settings` for a service that serves gRPC in this process: on
    127.0.0.1, on a port the system picks (`extra` adds or overrides settings)."""
    return projector_settings(
        kafka_bootstrap,
        database_url,
        topic_prefix,
        schema,
        CARGOTRACK_GRPC_HOST="127.0.0.1",
        CARGOTRACK_GRPC_PORT="0",
        **extra,
    )


class WrappedProjection:
    """A projection that hands everything to `inner`; a test subclasses it and
    overrides `apply` to step into the runner's transactions."""

    def __init__(self, inner: Projection) -> None:
        self.inner = inner
        self.name = inner.name

    @property
    def topics(self) -> Sequence[str]:
        return self.inner.topics

    @property
    def payloads(self) -> Mapping[str, Collection[str]]:
        return self.inner.payloads

    async def apply(self, connection: Connection, records: Sequence[Delivered]) -> None:
        await self.inner.apply(connection, records)

    def committed(self) -> None:
        self.inner.committed()

    def forget(self) -> None:
        self.inner.forget()


async def prepare(settings: Settings) -> None:
    """Schema migrated and topics created, as the services do at start."""
    await migrate(settings.database)
    await ensure_topics(settings.kafka, topic_specs(settings.topics))


@contextlib.asynccontextmanager
async def producer_for(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def end_offsets(settings: Settings, topics: Iterable[str]) -> dict[TopicPartition, int]:
    """Kafka's next offset of every partition of the topics (what 'caught up' means)."""
    consumer = AIOKafkaConsumer(**settings.kafka.client_options())
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or [])
        ]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [
                TopicPartition(topic, p)
                for topic in topics
                for p in sorted(consumer.partitions_for_topic(topic) or [])
            ]
        offsets: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return offsets
    finally:
        await consumer.stop()


def envelope_for(
    tenant: str,
    event_id: str,
    at: datetime,
    *,
    shipment_event: shipment_pb2.ShipmentEvent | None = None,
    gps_batch: gps_pb2.GpsBatch | None = None,
) -> envelope_pb2.Envelope:
    envelope = envelope_pb2.Envelope(
        event_id=event_id,
        tenant_id=tenant,
        principal="test",
        shipment_event=shipment_event,
        gps_batch=gps_batch,
    )
    envelope.occurred_at.CopyFrom(timestamp(at))
    envelope.recorded_at.CopyFrom(timestamp(at + timedelta(seconds=1)))
    return envelope


def lifecycle(
    tenant: str, shipment_id: str, vehicle_id: str, start: datetime, *, window_h: float = 4.0
) -> list[envelope_pb2.Envelope]:
    """created → assigned → picked up → in transit, as envelopes."""
    created = shipment_pb2.ShipmentCreated(
        customer_id="cust-1",
        origin=common_pb2.LatLng(latitude=53.40, longitude=-2.99),
        destination=common_pb2.LatLng(latitude=53.43, longitude=-2.90),
        reference=f"ref-{shipment_id}",
    )
    created.promised_window.start.CopyFrom(timestamp(start))
    created.promised_window.end.CopyFrom(timestamp(start + timedelta(hours=window_h)))
    steps: list[shipment_pb2.ShipmentEvent] = [
        shipment_pb2.ShipmentEvent(created=created),
        shipment_pb2.ShipmentEvent(
            vehicle_assigned=shipment_pb2.VehicleAssigned(vehicle_id=vehicle_id, driver_id="d1")
        ),
        shipment_pb2.ShipmentEvent(picked_up=shipment_pb2.PickedUp()),
        shipment_pb2.ShipmentEvent(in_transit=shipment_pb2.InTransit()),
    ]
    envelopes = []
    for i, event in enumerate(steps):
        at = start + timedelta(minutes=i)
        event.event_id = f"{shipment_id}-e{i}"
        event.shipment_id = shipment_id
        event.occurred_at.CopyFrom(timestamp(at))
        envelopes.append(envelope_for(tenant, event.event_id, at, shipment_event=event))
    return envelopes


def gps_envelope(
    tenant: str,
    vehicle_id: str,
    device: str,
    sequence: int,
    points: list[tuple[datetime, float, float]],
) -> envelope_pb2.Envelope:
    batch = gps_pb2.GpsBatch(vehicle_id=vehicle_id, device_id=device, sequence=sequence)
    for at, lat, lon in points:
        point = batch.points.add(latitude=lat, longitude=lon, speed_mps=10.0)
        point.recorded_at.CopyFrom(timestamp(at))
    newest = max(p[0] for p in points)
    return envelope_for(tenant, f"{vehicle_id}-{device}-{sequence}", newest, gps_batch=batch)


async def send_all(
    producer: AIOKafkaProducer, settings: Settings, envelopes: Iterable[envelope_pb2.Envelope]
) -> None:
    """Write envelopes to their topic, keyed as ingest does; wait for every ack."""
    futures = []
    for envelope in envelopes:
        payload = envelope.WhichOneof("payload")
        if payload == "gps_batch":
            topic, key = settings.topics.gps_points, envelope.gps_batch.vehicle_id
        elif payload == "delivery_confirmation":
            topic = settings.topics.delivery_confirmations
            key = envelope.delivery_confirmation.shipment_id
        else:
            topic, key = settings.topics.shipment_events, envelope.shipment_event.shipment_id
        record = encode(envelope, key)
        futures.append(
            await producer.send(topic, record.value, key=record.key, headers=record.headers)
        )
    await asyncio.gather(*futures)


def fold_log(
    envelopes: Iterable[envelope_pb2.Envelope],
) -> tuple[dict[tuple[str, str], ShipmentState], dict[tuple[str, str], VehicleState]]:
    """The pure fold of a log: what the projection must hold after consuming it.

    Records of one key keep their order (one partition each), which is all the
    folds depend on.
    """
    shipments: dict[tuple[str, str], ShipmentState] = {}
    vehicles: dict[tuple[str, str], VehicleState] = {}
    for envelope in envelopes:
        payload = envelope.WhichOneof("payload")
        if payload == "gps_batch":
            key = (envelope.tenant_id, envelope.gps_batch.vehicle_id)
            vehicles[key] = tracking.apply_gps(vehicles.get(key), envelope)
        elif payload in ("shipment_event", "delivery_confirmation"):
            shipment_id = (
                envelope.shipment_event.shipment_id
                if payload == "shipment_event"
                else envelope.delivery_confirmation.shipment_id
            )
            key = (envelope.tenant_id, shipment_id)
            state = tracking.apply(shipments.get(key), envelope)
            if state is not None:
                shipments[key] = state
    return shipments, vehicles


@contextlib.asynccontextmanager
async def fresh_schema(database_url: str) -> AsyncIterator[str]:
    """A new, empty schema with a unique name, dropped with everything in it on exit.

    No connection is held in between, so the caller may stop and restart PostgreSQL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await connection.close()
    try:
        yield name
    finally:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await connection.close()
