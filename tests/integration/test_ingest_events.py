"""shipment-events and delivery-confirmations against the session's real Kafka broker."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from aiokafka.partitioner import murmur2

from shared.auth import Role
from shared.domain.ids import uuid7_unix_ms
from shared.envelopes import timestamp, utc_now
from shared.pb import delivery_pb2, delivery_pb2_grpc, shipment_pb2, shipment_pb2_grpc
from shared.rpc import field_violations
from tests.ingest_helpers import (
    RunningService,
    bearer,
    consume_envelopes,
    delivery_confirmation,
    running_service,
    service_settings,
    shipment_created,
    shipment_event,
    topic_end_offsets,
)

pytestmark = pytest.mark.timeout(90)

SHIPPER = bearer(Role.SHIPPER, tenant="tenant-a")
OPS = bearer(Role.OPS, tenant="tenant-a")
DRIVER_1 = bearer(Role.DRIVER, tenant="tenant-a", vehicle_id="veh-1")


@pytest.fixture
async def events(kafka_bootstrap: str, topic_prefix: str) -> AsyncIterator[RunningService]:
    async with running_service(
        "shipment-events", service_settings(kafka_bootstrap, topic_prefix)
    ) as service:
        yield service


@pytest.fixture
async def deliveries(kafka_bootstrap: str, topic_prefix: str) -> AsyncIterator[RunningService]:
    async with running_service(
        "delivery-confirmations", service_settings(kafka_bootstrap, topic_prefix)
    ) as service:
        yield service


def events_stub(service: RunningService) -> shipment_pb2_grpc.ShipmentEventsServiceStub:
    return shipment_pb2_grpc.ShipmentEventsServiceStub(service.channel)


def deliveries_stub(
    service: RunningService,
) -> delivery_pb2_grpc.DeliveryConfirmationsServiceStub:
    return delivery_pb2_grpc.DeliveryConfirmationsServiceStub(service.channel)


async def stored(service: RunningService, kafka_bootstrap: str, topic: str) -> int:
    return await topic_end_offsets(kafka_bootstrap, topic, service.settings.topics.partitions)


async def record_event(
    service: RunningService, event: shipment_pb2.ShipmentEvent, metadata: object = SHIPPER
) -> shipment_pb2.RecordEventResponse:
    answer: shipment_pb2.RecordEventResponse = await events_stub(service).RecordEvent(
        shipment_pb2.RecordEventRequest(event=event), metadata=metadata, timeout=10
    )
    return answer


async def invalid_fields(call: object) -> list[str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return [name for name, _ in field_violations(caught.value)]


# --- shipment events ------------------------------------------------------------------


async def test_an_event_is_stored_keyed_by_shipment_with_the_clients_event_id(
    events: RunningService, kafka_bootstrap: str
) -> None:
    created = shipment_created("shp-1")
    picked = shipment_event("shp-1", event_id="evt-picked")
    first = await record_event(events, created)
    second = await record_event(events, picked, OPS)
    assert first.event_id == created.event_id
    assert second.event_id == "evt-picked"
    assert first.recorded_at.seconds > 0

    records = await consume_envelopes(kafka_bootstrap, events.settings.topics.shipment_events, 2)
    assert [r.key for r in records] == [b"shp-1", b"shp-1"]
    token = records[0].envelope.shipment_event.created.tracking_token
    created.created.tracking_token = token  # minted by the service (next test)
    assert [r.envelope.shipment_event for r in records] == [created, picked]
    assert [r.envelope.event_id for r in records] == [created.event_id, "evt-picked"]
    assert [r.envelope.principal for r in records] == ["shipper@tenant-a", "ops@tenant-a"]
    assert {r.envelope.tenant_id for r in records} == {"tenant-a"}
    assert records[0].envelope.occurred_at == created.occurred_at
    assert records[0].envelope.recorded_at == first.recorded_at
    assert records[0].envelope.schema_type == "cargotrack.v1.ShipmentEvent"


async def test_an_event_without_id_gets_a_minted_uuid7(
    events: RunningService, kafka_bootstrap: str
) -> None:
    answer = await record_event(events, shipment_event("shp-2", event_id=""))
    assert uuid7_unix_ms(answer.event_id) > 0
    [record] = await consume_envelopes(kafka_bootstrap, events.settings.topics.shipment_events, 1)
    assert record.envelope.event_id == answer.event_id
    assert record.envelope.shipment_event.event_id == answer.event_id


async def test_created_events_get_a_random_tracking_token_replacing_the_clients(
    events: RunningService, kafka_bootstrap: str
) -> None:
    first, second = shipment_created("shp-11"), shipment_created("shp-12")
    first.created.tracking_token = "guessable"
    await record_event(events, first)
    await events_stub(events).RecordEvents(
        shipment_pb2.RecordEventsRequest(events=[second, shipment_event("shp-12")]),
        metadata=SHIPPER,
        timeout=10,
    )
    records = await consume_envelopes(kafka_bootstrap, events.settings.topics.shipment_events, 3)
    tokens = [
        r.envelope.shipment_event.created.tracking_token
        for r in records
        if r.envelope.shipment_event.HasField("created")
    ]
    assert len(tokens) == 2
    assert "guessable" not in tokens
    assert len(set(tokens)) == 2
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", token) for token in tokens)


async def test_record_events_stores_all_in_order_after_validating_all(
    events: RunningService, kafka_bootstrap: str
) -> None:
    batch = [shipment_created("shp-3"), shipment_event("shp-3"), shipment_event("shp-4")]
    answer = await events_stub(events).RecordEvents(
        shipment_pb2.RecordEventsRequest(events=batch), metadata=SHIPPER, timeout=10
    )
    assert [r.event_id for r in answer.results] == [e.event_id for e in batch]
    records = await consume_envelopes(kafka_bootstrap, events.settings.topics.shipment_events, 3)
    shp3 = [r.envelope.event_id for r in records if r.key == b"shp-3"]
    assert shp3 == [batch[0].event_id, batch[1].event_id]


async def test_one_bad_event_refuses_the_whole_call_naming_its_index(
    events: RunningService, kafka_bootstrap: str
) -> None:
    batch = [shipment_event("shp-5") for _ in range(5)]
    batch[3].shipment_id = ""
    batch[1].ClearField("occurred_at")
    fields = await invalid_fields(
        events_stub(events).RecordEvents(
            shipment_pb2.RecordEventsRequest(events=batch), metadata=SHIPPER, timeout=10
        )
    )
    assert fields == ["events[1].occurred_at", "events[3].shipment_id"]
    assert await stored(events, kafka_bootstrap, events.settings.topics.shipment_events) == 0


async def test_more_than_500_events_are_refused(events: RunningService) -> None:
    batch = [shipment_event("shp-6") for _ in range(501)]
    fields = await invalid_fields(
        events_stub(events).RecordEvents(
            shipment_pb2.RecordEventsRequest(events=batch), metadata=SHIPPER, timeout=10
        )
    )
    assert fields == ["events"]


async def test_a_repeated_event_id_within_one_call_is_refused(events: RunningService) -> None:
    batch = [shipment_event("shp-7", event_id="same"), shipment_event("shp-7", event_id="same")]
    fields = await invalid_fields(
        events_stub(events).RecordEvents(
            shipment_pb2.RecordEventsRequest(events=batch), metadata=SHIPPER, timeout=10
        )
    )
    assert fields == ["events[1].event_id"]


@pytest.mark.parametrize(
    ("breaks", "field"),
    [
        (lambda e: setattr(e, "shipment_id", ""), "event.shipment_id"),
        (lambda e: e.ClearField("occurred_at"), "event.occurred_at"),
        (
            lambda e: e.occurred_at.CopyFrom(timestamp(utc_now() + timedelta(hours=2))),
            "event.occurred_at",
        ),
        (lambda e: e.ClearField("event"), "event.event"),
        (
            lambda e: e.delivery_failed.CopyFrom(shipment_pb2.DeliveryFailed(reason=99)),  # type: ignore[arg-type]
            "event.delivery_failed.reason",
        ),
        (lambda e: e.exception.SetInParent(), "event.exception.kind"),
        (lambda e: setattr(e, "shipment_id", "has space"), "event.shipment_id"),
    ],
    ids=["empty-id", "no-time", "future", "no-kind", "unknown-enum", "unspecified-enum", "space"],
)
async def test_each_bad_event_field_is_named(
    events: RunningService, breaks: object, field: str
) -> None:
    event = shipment_event("shp-8")
    breaks(event)  # type: ignore[operator]
    fields = await invalid_fields(
        events_stub(events).RecordEvent(
            shipment_pb2.RecordEventRequest(event=event), metadata=SHIPPER, timeout=10
        )
    )
    assert field in fields


async def test_created_with_bad_coordinates_names_them(events: RunningService) -> None:
    event = shipment_created("shp-9")
    event.created.origin.latitude = float("nan")
    event.created.destination.longitude = 200.0
    fields = await invalid_fields(
        events_stub(events).RecordEvent(
            shipment_pb2.RecordEventRequest(event=event), metadata=SHIPPER, timeout=10
        )
    )
    assert fields == ["event.created.origin.latitude", "event.created.destination.longitude"]


@pytest.mark.parametrize("role", [Role.DRIVER, Role.CUSTOMER, Role.DISPATCHER])
async def test_other_roles_may_not_record_events(events: RunningService, role: Role) -> None:
    metadata = bearer(role, vehicle_id="veh-1", customer_id="cust-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record_event(events, shipment_event(), metadata)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- delivery confirmations -----------------------------------------------------------


async def test_a_confirmation_is_stored_co_partitioned_with_the_shipments_events(
    deliveries: RunningService, events: RunningService, kafka_bootstrap: str
) -> None:
    confirmation = delivery_confirmation("shp-10", "veh-1")
    answer = await deliveries_stub(deliveries).ConfirmDelivery(
        delivery_pb2.ConfirmDeliveryRequest(confirmation=confirmation),
        metadata=DRIVER_1,
        timeout=10,
    )
    assert answer.confirmation_id == confirmation.confirmation_id
    await record_event(events, shipment_event("shp-10"))

    topics = deliveries.settings.topics
    [record] = await consume_envelopes(kafka_bootstrap, topics.delivery_confirmations, 1)
    [event] = await consume_envelopes(kafka_bootstrap, topics.shipment_events, 1)
    assert record.key == b"shp-10"
    assert record.envelope.delivery_confirmation == confirmation
    assert record.envelope.event_id == confirmation.confirmation_id
    assert record.envelope.occurred_at == confirmation.confirmed_at
    assert record.envelope.recorded_at == answer.recorded_at
    assert record.envelope.tenant_id == "tenant-a"
    assert record.envelope.principal == "driver@tenant-a"
    assert record.partition == event.partition
    assert record.partition == (murmur2(b"shp-10") & 0x7FFFFFFF) % topics.partitions


async def test_ops_may_confirm_for_any_vehicle(
    deliveries: RunningService, kafka_bootstrap: str
) -> None:
    await deliveries_stub(deliveries).ConfirmDelivery(
        delivery_pb2.ConfirmDeliveryRequest(confirmation=delivery_confirmation(vehicle_id="veh-7")),
        metadata=OPS,
        timeout=10,
    )
    await consume_envelopes(kafka_bootstrap, deliveries.settings.topics.delivery_confirmations, 1)


async def test_a_driver_confirming_for_another_vehicle_is_denied(
    deliveries: RunningService, kafka_bootstrap: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await deliveries_stub(deliveries).ConfirmDelivery(
            delivery_pb2.ConfirmDeliveryRequest(
                confirmation=delivery_confirmation(vehicle_id="veh-2")
            ),
            metadata=DRIVER_1,
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    topic = deliveries.settings.topics.delivery_confirmations
    assert await stored(deliveries, kafka_bootstrap, topic) == 0


@pytest.mark.parametrize(
    ("breaks", "field"),
    [
        (lambda c: setattr(c, "vehicle_id", ""), "confirmation.vehicle_id"),
        (lambda c: setattr(c, "confirmation_id", ""), "confirmation.confirmation_id"),
        (lambda c: setattr(c, "shipment_id", ""), "confirmation.shipment_id"),
        (lambda c: setattr(c, "method", 42), "confirmation.method"),
        (lambda c: setattr(c, "method", 0), "confirmation.method"),
        (lambda c: setattr(c, "proof_sha256", "not-hex"), "confirmation.proof_sha256"),
        (lambda c: c.ClearField("confirmed_at"), "confirmation.confirmed_at"),
        (
            lambda c: c.confirmed_at.CopyFrom(timestamp(utc_now() + timedelta(days=1))),
            "confirmation.confirmed_at",
        ),
        (lambda c: setattr(c.location, "latitude", float("inf")), "confirmation.location.latitude"),
        (lambda c: setattr(c.location, "latitude", -90.5), "confirmation.location.latitude"),
    ],
    ids=[
        "no-vehicle",
        "no-id",
        "no-shipment",
        "unknown-method",
        "unspecified-method",
        "bad-proof",
        "no-time",
        "future",
        "inf",
        "lat-range",
    ],
)
async def test_each_bad_confirmation_field_is_named(
    deliveries: RunningService, breaks: object, field: str
) -> None:
    confirmation = delivery_confirmation(vehicle_id="veh-1")
    breaks(confirmation)  # type: ignore[operator]
    fields = await invalid_fields(
        deliveries_stub(deliveries).ConfirmDelivery(
            delivery_pb2.ConfirmDeliveryRequest(confirmation=confirmation),
            metadata=DRIVER_1,
            timeout=10,
        )
    )
    assert field in fields


async def test_a_shipper_may_not_confirm_deliveries(deliveries: RunningService) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await deliveries_stub(deliveries).ConfirmDelivery(
            delivery_pb2.ConfirmDeliveryRequest(confirmation=delivery_confirmation()),
            metadata=SHIPPER,
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
