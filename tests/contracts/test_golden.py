"""Golden records: what every released version wrote still decodes and folds the same way.

`shipment-events` is kept forever and every projection replays it from the start, so
a change that makes an old record unreadable, or folds it differently, breaks the next
rebuild. For each version under tests/contracts/golden/ this decodes the stored bytes
and headers with today's code, folds them, and compares with the expected state stored
beside them (see tests/contracts/golden/corpus.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from shared.envelopes import HEADER_EVENT_ID, HEADER_SCHEMA_TYPE, PAYLOAD_FIELDS, decode
from shared.pb import shipment_pb2
from tests.contracts.golden import corpus, scenario

VERSIONS = corpus.versions()


def test_there_is_a_golden_version() -> None:
    assert "v0.1.0" in VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_records_fold_to_the_expected_states(version: str) -> None:
    expected = corpus.expected(version)
    assert expected, f"{version} has no expected states"
    assert corpus.fold(corpus.load(version)) == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_every_payload_type_on_every_topic_is_covered(version: str) -> None:
    records = corpus.load(version)
    topics = {r.topic for r in records}
    assert topics == set(scenario.TOPICS)
    payloads: dict[str, set[str]] = {}
    event_kinds: set[str] = set()
    for record in records:
        if record.topic == "dead-letters":
            continue
        envelope = decode(record.value, record.headers)
        payload = envelope.WhichOneof("payload")
        assert payload is not None
        payloads.setdefault(record.topic, set()).add(payload)
        if payload == "shipment_event":
            event_kinds.add(envelope.shipment_event.WhichOneof("event") or "")
    assert payloads == {
        "gps-points": {"gps_batch"},
        "shipment-events": {"shipment_event"},
        "delivery-confirmations": {"delivery_confirmation"},
        "shipment-alerts": {"alert"},
    }
    assert set().union(*payloads.values()) == set(PAYLOAD_FIELDS.values())
    every_kind = {
        f.name for f in shipment_pb2.ShipmentEvent.DESCRIPTOR.oneofs_by_name["event"].fields
    }
    assert event_kinds == every_kind


@pytest.mark.parametrize("version", VERSIONS)
def test_every_record_carries_the_routing_headers(version: str) -> None:
    for record in corpus.load(version):
        names = {name for name, _ in record.headers}
        assert {HEADER_SCHEMA_TYPE, HEADER_EVENT_ID, "ct-tenant-id"} <= names, record.name


def _expected(name: str) -> Any:
    return corpus.expected("v0.1.0")[name]


def test_the_expected_states_say_what_the_scenario_says() -> None:
    """Facts read off scenario.py by hand, independent of the fold that wrote the files:
    a regenerated expected file that changed them fails here."""
    delivered = _expected("shipment-shp-golden-1")
    assert delivered["status"] == shipment_pb2.SHIPMENT_STATUS_DELIVERED
    assert delivered["delivery_attempts"] == 2  # the failed attempt and the delivery
    assert delivered["delivered_at"] == "2026-03-03T09:05:00+00:00"
    assert delivered["tracking_token"] == scenario.TRACKING_TOKENS[scenario.SHIPMENT]
    assert delivered["vehicle_id"] == scenario.VEHICLE
    assert delivered["anomalies"] == []
    assert [e["kind"] for e in delivered["timeline"]] == [
        "created",
        "vehicle_assigned",
        "picked_up",
        "in_transit",
        "exception",
        "out_for_delivery",
        "delivery_failed",
        "out_for_delivery",
        "delivered",
        "delivery_confirmed",
    ]
    assert delivered["proof"]["confirmation_id"] == "conf-golden-1"
    assert 17 < delivered["proof"]["distance_to_destination_m"] < 18.5

    cancelled = _expected("shipment-shp-golden-2")
    assert cancelled["status"] == shipment_pb2.SHIPMENT_STATUS_CANCELLED
    assert [e["status_after"] for e in cancelled["timeline"]] == [
        shipment_pb2.SHIPMENT_STATUS_CREATED,
        shipment_pb2.SHIPMENT_STATUS_CANCELLED,
    ]

    vehicle = _expected(f"vehicle-{scenario.VEHICLE}")
    # The 08:39 point of batch 2 is older than 08:42: it never moves the vehicle back.
    assert vehicle["last_position"]["recorded_at"] == "2026-03-02T08:43:00+00:00"
    assert vehicle["device_sequences"] == [[scenario.DEVICE, 2]]

    [alert] = _expected("alerts")
    assert alert["alert"]["kind"] == "ALERT_KIND_LATE"
    assert alert["schemaType"] == "cargotrack.v1.Alert"

    [dead] = _expected("dead-letters")
    assert dead["still_refused"] is True
    assert dead["headers"]["ct-dlq-topic"] == "cargotrack.shipment-events"
