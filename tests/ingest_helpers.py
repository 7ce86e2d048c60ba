"""Helpers for tests that talk to cargotrack's gRPC services in-process.

- `service_settings`: Settings built by `load_settings` from an environment, as in
  production, for a test's Kafka and topic prefix (override any variable).
- `running_service`: a service started in-process on 127.0.0.1:<free port> (the same
  `IngestServer` wiring `cargotrack serve` runs), with a channel to it. A service
  module takes part by exposing `server(settings)` returning an async context
  manager with a `port` (see services/gps_ingest/app.py).
- `bearer`: call metadata with a development token for a role.
- `consume_envelopes`: read a topic until a number of records arrived (never sleeps).
- `gps_point`, `gps_batch`, `shipment_event`, `delivery_confirmation`: valid messages
  to start from; tests break them one field at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
from aiokafka import AIOKafkaConsumer, TopicPartition
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.registry import SERVICES
from shared.auth import Role, mint_token
from shared.config import DEV_JWT_SECRET, Settings, load_settings
from shared.envelopes import decode, timestamp, utc_now
from shared.pb import common_pb2, delivery_pb2, envelope_pb2, gps_pb2, shipment_pb2

#: Used when a test gives no DATABASE_URL: the ingest services never connect to it.
UNUSED_DATABASE_URL = "postgresql://unused@127.0.0.1:1/unused"

Metadata = tuple[tuple[str, str], ...]


def service_settings(
    kafka_bootstrap: str, topic_prefix: str, **environ: str | float | int
) -> Settings:
    """Settings for one test: its Kafka, its topic prefix, the development key, a free port.

    Keyword arguments are environment variables and win over the defaults, e.g.
    `CARGOTRACK_KAFKA_TIMEOUT_S=2`; `DATABASE_URL=""` gives no database (for
    delivery-confirmations: no read-model pre-check).
    """
    env: dict[str, str] = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "DATABASE_URL": UNUSED_DATABASE_URL,
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_TOPIC_PREFIX": topic_prefix,
        "CARGOTRACK_TOPIC_PARTITIONS": "3",
        "CARGOTRACK_GRPC_HOST": "127.0.0.1",
        "CARGOTRACK_GRPC_PORT": "0",
        "CARGOTRACK_KAFKA_TIMEOUT_S": "5",
        "CARGOTRACK_SHUTDOWN_GRACE_S": "1",
        "CARGOTRACK_LOG_FORMAT": "console",
    }
    env.update({name: str(value) for name, value in environ.items()})
    return load_settings(env, database_optional=True)


@dataclass
class RunningService:
    """A service started by `running_service`, and a channel to it."""

    name: str
    port: int
    settings: Settings
    channel: grpc.aio.Channel
    server: object

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


async def wait_health(
    channel: grpc.aio.Channel,
    status: int = health_pb2.HealthCheckResponse.SERVING,
    timeout_s: float = 30.0,
    service: str = "",
) -> None:
    """Wait until grpc.health.v1 Watch reports `status` (TimeoutError otherwise)."""
    stub = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(timeout_s):
        call = stub.Watch(health_pb2.HealthCheckRequest(service=service))
        try:
            async for reply in call:
                if reply.status == status:
                    return
        finally:
            call.cancel()
    raise AssertionError("health Watch ended without reporting the awaited status")


@contextlib.asynccontextmanager
async def running_service(
    name: str, settings: Settings, *, wait_serving: bool = True
) -> AsyncIterator[RunningService]:
    """Start service `name` (a key of services.registry.SERVICES) in-process; stop it after.

    With wait_serving, returns once health reports SERVING (Kafka reachable, topics
    created). The service is stopped as in production (health NOT_SERVING, drain,
    producer flush) when the block exits.
    """
    module = importlib.import_module(SERVICES[name].module)
    factory = getattr(module, "server", None)
    if factory is None:
        raise TypeError(f"{SERVICES[name].module} has no server(settings) to run in-process")
    async with factory(settings) as server:
        port: int = server.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            if wait_serving:
                await wait_health(channel)
            yield RunningService(name, port, settings, channel, server)


def bearer(
    role: Role,
    *,
    tenant: str = "tenant-a",
    vehicle_id: str | None = None,
    customer_id: str | None = None,
    subject: str | None = None,
    ttl_s: int = 3600,
    secret: str = DEV_JWT_SECRET,
    kid: str | None = None,
) -> Metadata:
    """Call metadata carrying a development bearer token for `role` (signed with
    `secret`, naming key `kid` in its header when given)."""
    token = mint_token(
        secret,
        role=role,
        tenant_id=tenant,
        subject=subject or f"{role.value}@{tenant}",
        vehicle_id=vehicle_id,
        customer_id=customer_id,
        ttl_s=ttl_s,
        kid=kid,
    )
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class ConsumedEnvelope:
    partition: int
    offset: int
    key: bytes | None
    headers: list[tuple[str, bytes]]
    envelope: envelope_pb2.Envelope


async def consume_envelopes(
    bootstrap_servers: str,
    topic: str,
    count: int | None = None,
    *,
    until: Callable[[list[ConsumedEnvelope]], bool] | None = None,
    timeout_s: float = 30.0,
) -> list[ConsumedEnvelope]:
    """Read `topic` from the start until `count` records arrived (or `until` holds for
    what arrived); decode each envelope.

    With `count`, the topic must then hold exactly `count` records (its end offsets
    add up to it): a record written twice, or one too many, fails the test instead
    of waiting unread behind the first `count`. Records come back in partition
    order, then offset order. Raises TimeoutError naming how many arrived when the
    condition did not hold within timeout_s.
    """
    if until is None:
        if count is None:
            raise TypeError("give count or until")
        wanted = count

        def until(found: list[ConsumedEnvelope]) -> bool:
            return len(found) >= wanted

    # Without a group, a subscription is assigned every partition, read from the start.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    found: list[ConsumedEnvelope] = []
    try:
        try:
            async with asyncio.timeout(timeout_s):
                while not until(found):
                    batches = await consumer.getmany(timeout_ms=200)
                    for records in batches.values():
                        for record in records:
                            headers = [(k, bytes(v)) for k, v in record.headers]
                            found.append(
                                ConsumedEnvelope(
                                    record.partition,
                                    record.offset,
                                    record.key,
                                    headers,
                                    decode(record.value, headers),
                                )
                            )
        except TimeoutError:
            raise TimeoutError(
                f"{len(found)} records arrived on {topic} in {timeout_s:g}s, "
                f"not what the test waited for ({count or 'see until'})"
            ) from None
        if count is not None:
            ends = await consumer.end_offsets(list(consumer.assignment()))
            held = sum(ends.values())
            assert held == count, f"{topic} holds {held} records, the test expected {count}"
    finally:
        await consumer.stop()
    return sorted(found, key=lambda c: (c.partition, c.offset))


def high_water_dedupe(records: list[ConsumedEnvelope]) -> list[int]:
    """GPS batch sequences kept by the consumer rule of gps.proto: a batch whose sequence
    is not above the highest already seen for its (tenant, device) is a duplicate."""
    highest: dict[tuple[str, str], int] = {}
    kept: list[int] = []
    for record in records:
        batch = record.envelope.gps_batch
        device = (record.envelope.tenant_id, batch.device_id)
        if batch.sequence > highest.get(device, 0):
            highest[device] = batch.sequence
            kept.append(batch.sequence)
    return kept


async def topic_end_offsets(bootstrap_servers: str, topic: str, partitions: int) -> int:
    """How many records `topic` (with `partitions` partitions) holds: sum of end offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return int(sum(ends.values()))
    finally:
        await consumer.stop()


# --- valid messages -------------------------------------------------------------------

_counter = itertools.count(1)


def gps_point(
    moment: datetime | None = None, latitude: float = 52.52, longitude: float = 13.405
) -> gps_pb2.GpsPoint:
    """A valid point (Berlin) taken at `moment` (default: a second ago)."""
    return gps_pb2.GpsPoint(
        recorded_at=timestamp(moment or utc_now() - timedelta(seconds=1)),
        latitude=latitude,
        longitude=longitude,
        accuracy_m=5.0,
        speed_mps=12.0,
        heading_deg=90.0,
    )


def gps_batch(
    vehicle_id: str,
    sequence: int,
    points: int = 3,
    *,
    device_id: str | None = None,
    start: datetime | None = None,
) -> gps_pb2.GpsBatch:
    """A valid batch of `points` points one second apart, moving east, ending a second ago."""
    end = start or utc_now() - timedelta(seconds=1)
    return gps_pb2.GpsBatch(
        vehicle_id=vehicle_id,
        device_id=device_id or f"device-{vehicle_id}",
        sequence=sequence,
        points=[
            gps_point(end - timedelta(seconds=points - 1 - i), longitude=13.405 + 0.0001 * i)
            for i in range(points)
        ],
    )


def shipment_event(
    shipment_id: str = "shp-1", event_id: str | None = None, **kind: object
) -> shipment_pb2.ShipmentEvent:
    """A valid event; by default `picked_up`, else the one oneof member given."""
    event = shipment_pb2.ShipmentEvent(
        event_id=event_id if event_id is not None else f"evt-{next(_counter)}",
        shipment_id=shipment_id,
        occurred_at=timestamp(utc_now() - timedelta(seconds=5)),
        **(kind or {"picked_up": shipment_pb2.PickedUp()}),  # type: ignore[arg-type]
    )
    return event


def shipment_created(shipment_id: str = "shp-1") -> shipment_pb2.ShipmentEvent:
    now = utc_now()
    return shipment_event(
        shipment_id,
        created=shipment_pb2.ShipmentCreated(
            customer_id="cust-1",
            origin=common_pb2.LatLng(latitude=52.52, longitude=13.405),
            destination=common_pb2.LatLng(latitude=48.137, longitude=11.575),
            promised_window=common_pb2.TimeWindow(
                start=timestamp(now + timedelta(hours=6)), end=timestamp(now + timedelta(hours=8))
            ),
            reference="order 42",
        ),
    )


def delivery_confirmation(
    shipment_id: str = "shp-1", vehicle_id: str = "veh-1", **fields: object
) -> delivery_pb2.DeliveryConfirmation:
    confirmation = delivery_pb2.DeliveryConfirmation(
        confirmation_id=f"conf-{next(_counter)}",
        shipment_id=shipment_id,
        vehicle_id=vehicle_id,
        recipient_name="A. Recipient",
        confirmed_at=timestamp(utc_now() - timedelta(seconds=2)),
        location=common_pb2.LatLng(latitude=48.137, longitude=11.575),
        method=delivery_pb2.CONFIRMATION_METHOD_SIGNATURE,
        proof_sha256=hashlib.sha256(b"signature").hexdigest(),
    )
    for name, value in fields.items():
        setattr(confirmation, name, value)
    return confirmation
