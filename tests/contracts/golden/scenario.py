"""The facts every version's golden records encode, and how today's code writes them.

One tenant (`acme`), one vehicle, two shipments:

* `shp-golden-1` goes through every lifecycle kind but `cancelled`: created, vehicle
  assigned, picked up, in transit, an exception (weather), out for delivery, a failed
  delivery (recipient absent), out for delivery again (the retry), delivered, and the
  driver's delivery confirmation (on its own topic) right after `delivered`;
* `shp-golden-2` is created and cancelled;
* vehicle `veh-golden-7` sends two GPS batches: three points, then two (one of them
  older than the vehicle's last position, which must not move it back);
* the projector published one LATE alert for `shp-golden-1`;
* the projector dead-lettered one undecodable record from the shipment-events topic.

Each record is written by the code that writes it in production:

* shipment events: `ShipmentEventsServicer._record` (the shipment-events service's own
  envelope builder), with the tracking token minting fixed so the bytes are repeatable;
* delivery confirmations and GPS batches: `shared.ingest.envelope_for` and
  `shared.envelopes.encode`, exactly as the two servicers call them, with the event id
  of a GPS batch from `shared.domain.ids.gps_batch_event_id`;
* the alert: the envelope the outbox relay (services/projector/outbox.py) builds;
* the dead letter: `shared.kafka.dead_letter_headers`, as the projection runner does.

Times are fixed (recorded one second after they occurred), so a version's records are
the same every time they are made.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from unittest import mock

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from services.shipment_events import servicer as shipment_servicer
from shared.auth import Principal, Role
from shared.domain.ids import alert_id, gps_batch_event_id
from shared.envelopes import EncodedRecord, PoisonRecord, decode, encode, timestamp
from shared.ingest import envelope_for
from shared.kafka import dead_letter_headers
from shared.pb import alerts_pb2, common_pb2, delivery_pb2, envelope_pb2, gps_pb2, shipment_pb2

TENANT = "acme"
SHIPMENT = "shp-golden-1"
CANCELLED_SHIPMENT = "shp-golden-2"
VEHICLE = "veh-golden-7"
DEVICE = "dev-golden-7"
#: What the shipment-events service would have minted (a random token in production).
TRACKING_TOKENS = {SHIPMENT: "gOlDeNtOkEn1-aaaaaaaaa", CANCELLED_SHIPMENT: "gOlDeNtOkEn2-bbbbbbbbb"}
ORIGIN = (52.5200, 13.4050)
DESTINATION = (52.3906, 13.0645)
#: Logical topic names (the deployed names carry the prefix, `cargotrack.` by default).
TOPICS = (
    "gps-points",
    "shipment-events",
    "delivery-confirmations",
    "shipment-alerts",
    "dead-letters",
)

OPS = Principal(subject="ops-golden", tenant_id=TENANT, role=Role.SHIPPER)
DRIVER = Principal(subject="driver-golden", tenant_id=TENANT, role=Role.DRIVER, vehicle_id=VEHICLE)


@dataclass(frozen=True)
class GoldenRecord:
    """One record as it lies on a topic: its name in the corpus, topic, bytes, headers."""

    name: str
    topic: str
    record: EncodedRecord
    note: str


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _latlng(where: tuple[float, float]) -> common_pb2.LatLng:
    return common_pb2.LatLng(latitude=where[0], longitude=where[1])


@contextlib.contextmanager
def _fixed_tracking_tokens(shipment_id: str) -> Iterator[None]:
    with mock.patch.object(
        shipment_servicer, "mint_tracking_token", return_value=TRACKING_TOKENS[shipment_id]
    ):
        yield


def _event(
    number: int, shipment_id: str, occurred: str, **payload: Message
) -> tuple[str, GoldenRecord]:
    [(kind, value)] = payload.items()
    event = shipment_pb2.ShipmentEvent(
        event_id=f"evt-golden-{shipment_id[-1]}-{number:02d}",
        shipment_id=shipment_id,
        occurred_at=timestamp(at(occurred)),
    )
    getattr(event, kind).CopyFrom(value)
    recorded = at(occurred) + timedelta(seconds=1)
    with _fixed_tracking_tokens(shipment_id):
        record, _ = shipment_servicer.ShipmentEventsServicer._record(event, OPS, recorded, "")
    name = f"shipment-event-{shipment_id[-1]}-{number:02d}-{kind}"
    return kind, GoldenRecord(name, "shipment-events", record, f"ShipmentEvent `{kind}`")


def shipment_events() -> list[GoldenRecord]:
    s = shipment_pb2
    created = s.ShipmentCreated(
        customer_id="cust-golden",
        origin=_latlng(ORIGIN),
        destination=_latlng(DESTINATION),
        promised_window=common_pb2.TimeWindow(
            start=timestamp(at("2026-03-02T12:00:00")), end=timestamp(at("2026-03-02T14:00:00"))
        ),
        reference="PO-1001",
        tracking_token="client-chosen-and-replaced",
    )
    steps: list[tuple[str, str, dict[str, Message]]] = [
        (SHIPMENT, "2026-03-02T08:00:00", {"created": created}),
        (
            SHIPMENT,
            "2026-03-02T08:05:00",
            {
                "vehicle_assigned": s.VehicleAssigned(
                    vehicle_id=VEHICLE, driver_id="drv-golden", stop_sequence=2
                )
            },
        ),
        (SHIPMENT, "2026-03-02T08:30:00", {"picked_up": s.PickedUp()}),
        (SHIPMENT, "2026-03-02T08:45:00", {"in_transit": s.InTransit()}),
        (
            SHIPMENT,
            "2026-03-02T09:00:00",
            {
                "exception": s.ShipmentException(
                    kind=s.EXCEPTION_KIND_WEATHER, description="heavy rain on the A10"
                )
            },
        ),
        (SHIPMENT, "2026-03-02T11:30:00", {"out_for_delivery": s.OutForDelivery()}),
        (
            SHIPMENT,
            "2026-03-02T12:10:00",
            {
                "delivery_failed": s.DeliveryFailed(
                    reason=s.DELIVERY_FAILURE_REASON_RECIPIENT_ABSENT,
                    note="nobody home",
                    retry_at=timestamp(at("2026-03-03T09:00:00")),
                )
            },
        ),
        (SHIPMENT, "2026-03-03T08:30:00", {"out_for_delivery": s.OutForDelivery()}),
        (SHIPMENT, "2026-03-03T09:05:00", {"delivered": s.Delivered()}),
        (CANCELLED_SHIPMENT, "2026-03-02T07:00:00", {"created": created}),
        (
            CANCELLED_SHIPMENT,
            "2026-03-02T07:30:00",
            {"cancelled": s.Cancelled(reason="order withdrawn by the customer")},
        ),
    ]
    numbers: dict[str, int] = {}
    records = []
    for shipment_id, occurred, payload in steps:
        numbers[shipment_id] = numbers.get(shipment_id, 0) + 1
        _, record = _event(numbers[shipment_id], shipment_id, occurred, **payload)
        records.append(record)
    return records


def delivery_confirmation() -> GoldenRecord:
    confirmation = delivery_pb2.DeliveryConfirmation(
        confirmation_id="conf-golden-1",
        shipment_id=SHIPMENT,
        vehicle_id=VEHICLE,
        recipient_name="R. Receiver",
        confirmed_at=timestamp(at("2026-03-03T09:06:00")),
        location=_latlng((52.3907, 13.0647)),
        method=delivery_pb2.CONFIRMATION_METHOD_SIGNATURE,
        proof_sha256=hashlib.sha256(b"golden signature").hexdigest(),
        note="signed at the door",
    )
    # As services/delivery_confirmations/servicer.py: the confirmation id is the event id.
    envelope = envelope_for(
        DRIVER,
        event_id=confirmation.confirmation_id,
        occurred_at=confirmation.confirmed_at,
        recorded_at=timestamp(at("2026-03-03T09:06:01")),
    )
    envelope.delivery_confirmation.CopyFrom(confirmation)
    return GoldenRecord(
        "delivery-confirmation-1",
        "delivery-confirmations",
        encode(envelope, confirmation.shipment_id),
        "DeliveryConfirmation (signature, 18 m from the destination)",
    )


def _gps_batch(sequence: int, points: list[tuple[str, float, float, float]]) -> GoldenRecord:
    batch = gps_pb2.GpsBatch(vehicle_id=VEHICLE, device_id=DEVICE, sequence=sequence)
    for recorded, lat, lon, speed in points:
        batch.points.add(
            recorded_at=timestamp(at(recorded)),
            latitude=lat,
            longitude=lon,
            accuracy_m=5.0,
            speed_mps=speed,
            heading_deg=225.0,
        )
    # As services/gps_ingest/servicer.py: occurred at the batch's newest point.
    newest = max(point.recorded_at.ToDatetime(tzinfo=UTC) for point in batch.points)
    envelope = envelope_for(
        DRIVER,
        event_id=gps_batch_event_id(TENANT, DEVICE, sequence),
        occurred_at=timestamp(newest),
        recorded_at=timestamp(newest + timedelta(seconds=1)),
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    envelope.gps_batch.CopyFrom(batch)
    return GoldenRecord(
        f"gps-batch-{sequence}",
        "gps-points",
        encode(envelope, VEHICLE),
        f"GpsBatch sequence {sequence}, {len(batch.points)} points, with a traceparent",
    )


def gps_batches() -> list[GoldenRecord]:
    return [
        _gps_batch(
            1,
            [
                ("2026-03-02T08:40:00", 52.5000, 13.3800, 12.5),
                ("2026-03-02T08:41:00", 52.4950, 13.3700, 13.0),
                ("2026-03-02T08:42:00", 52.4900, 13.3600, 13.5),
            ],
        ),
        _gps_batch(
            2,
            [
                ("2026-03-02T08:43:00", 52.4850, 13.3500, 14.0),
                # Older than the vehicle's last position: history only.
                ("2026-03-02T08:39:00", 52.5050, 13.3900, 11.0),
            ],
        ),
    ]


def alert() -> GoldenRecord:
    kind = alerts_pb2.ALERT_KIND_LATE
    alert = alerts_pb2.Alert(
        alert_id=alert_id(SHIPMENT, kind, "evt-golden-1-06", tenant_id=TENANT),
        shipment_id=SHIPMENT,
        vehicle_id=VEHICLE,
        kind=kind,
        severity=alerts_pb2.SEVERITY_WARNING,
        detected_at=timestamp(at("2026-03-02T13:50:00")),
        eta=common_pb2.Eta(estimated_arrival=timestamp(at("2026-03-02T14:25:00"))),
        promised_window=common_pb2.TimeWindow(
            start=timestamp(at("2026-03-02T12:00:00")), end=timestamp(at("2026-03-02T14:00:00"))
        ),
        last_location=_latlng((52.4100, 13.1000)),
        expected_delay=Duration(seconds=25 * 60),
        message="expected 25 min after the promised window",
        customer_id="cust-golden",
    )
    # As services/projector/outbox.py.
    envelope = envelope_pb2.Envelope(
        event_id=alert.alert_id, tenant_id=TENANT, principal="projector", alert=alert
    )
    envelope.occurred_at.CopyFrom(alert.detected_at)
    envelope.recorded_at.CopyFrom(timestamp(at("2026-03-02T13:50:01")))
    return GoldenRecord(
        "alert-late-1", "shipment-alerts", encode(envelope, SHIPMENT), "Alert LATE (outbox relay)"
    )


#: The bytes of the dead-lettered record: a truncated varint, undecodable as an Envelope.
POISON_VALUE = b"\x0a\xff"


def dead_letter() -> GoldenRecord:
    original_headers = [
        ("ct-schema-type", b"cargotrack.v1.ShipmentEvent"),
        ("ct-event-id", b"evt-golden-poison"),
        ("ct-tenant-id", TENANT.encode()),
    ]
    try:
        decode(POISON_VALUE, original_headers)
    except PoisonRecord as error:
        reason = str(error)  # what the projection runner puts in the header
    else:
        raise AssertionError("the poison value decodes: choose other bytes")
    headers = dead_letter_headers(
        original_headers,
        reason,
        "cargotrack.shipment-events",
        3,
        41,
        "cargotrack.tracking",
    )
    return GoldenRecord(
        "dead-letter-1",
        "dead-letters",
        EncodedRecord(SHIPMENT.encode(), POISON_VALUE, headers),
        "an undecodable shipment-events record, dead-lettered by the projector",
    )


def golden_records() -> list[GoldenRecord]:
    """Every record of the scenario, in the order each topic holds them."""
    return [
        *gps_batches(),
        *shipment_events(),
        delivery_confirmation(),
        alert(),
        dead_letter(),
    ]
