"""The visibility table (issue 12, finding 2): every cell, audience × status × field.

The expected cells are read from docs/query.md ("Visibility"), so the documented
table and the code cannot drift apart; a few properties are also stated literally,
so that a wrong edit of both at once still fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.domain.visibility import (
    ALL_STATUSES,
    ON_THE_WAY,
    SHIPMENT_FIELDS,
    TIMELINE_FIELDS,
    Audience,
    Status,
    clip_route,
    redact_shipment,
    redact_timeline,
    visible_fields,
    visible_timeline,
)
from shared.pb import common_pb2, delivery_pb2, shipment_pb2, tracking_pb2

DOC = Path(__file__).resolve().parents[2] / "docs" / "query.md"
AUDIENCES = [Audience.STAFF, Audience.CUSTOMER, Audience.PUBLIC]
STATUSES = sorted(ALL_STATUSES)
PUBLIC_FIELDS = frozenset(f.name for f in tracking_pb2.PublicShipment.DESCRIPTOR.fields)


def _table(first_header: str) -> dict[str, list[str]]:
    """The markdown table of docs/query.md whose first column is `first_header`:
    row name -> cells (staff, customer, public)."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    assert lines[start].split("|")[2:5] == [" staff ", " customer ", " public "]
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def _statuses(cell: str) -> frozenset[Status]:
    """The statuses a cell lists ("all", "never", or names; parentheses are remarks)."""
    words = re.sub(r"\(.*?\)", "", cell).strip()
    if words == "all":
        return ALL_STATUSES
    if words == "never":
        return frozenset()
    return frozenset(
        shipment_pb2.ShipmentStatus.Value(f"SHIPMENT_STATUS_{name.strip().upper()}")
        for name in words.split(",")
    )


FIELD_TABLE = _table("field")
TIMELINE_TABLE = _table("timeline")


def test_the_documented_table_names_every_shipment_field_once() -> None:
    assert set(FIELD_TABLE) == SHIPMENT_FIELDS
    assert set(TIMELINE_TABLE) == TIMELINE_FIELDS | {"entries recorded as anomalies"}


@pytest.mark.parametrize("status", STATUSES, ids=shipment_pb2.ShipmentStatus.Name)
@pytest.mark.parametrize("audience", AUDIENCES, ids=str)
def test_every_cell_of_the_field_table(audience: Audience, status: Status) -> None:
    column = AUDIENCES.index(audience)
    expected = {field for field, cells in FIELD_TABLE.items() if status in _statuses(cells[column])}
    assert visible_fields(audience, status) == expected


@pytest.mark.parametrize("audience", AUDIENCES, ids=str)
def test_every_cell_of_the_timeline_table(audience: Audience) -> None:
    column = AUDIENCES.index(audience)
    fields, anomalies = visible_timeline(audience)
    expected = {f for f in TIMELINE_FIELDS if TIMELINE_TABLE[f][column] == "yes"}
    assert fields == expected
    assert anomalies == (TIMELINE_TABLE["entries recorded as anomalies"][column] == "yes")


# --- the properties the issue asks for, stated literally ---------------------------------

LIVE_OR_IDENTITY = ("last_position", "progress", "vehicle_id", "driver_id")
NOT_ON_THE_WAY = sorted(ALL_STATUSES - ON_THE_WAY)


@pytest.mark.parametrize("status", NOT_ON_THE_WAY, ids=shipment_pb2.ShipmentStatus.Name)
@pytest.mark.parametrize("audience", [Audience.CUSTOMER, Audience.PUBLIC], ids=str)
def test_no_position_vehicle_or_driver_before_pickup_or_after_delivery(
    audience: Audience, status: Status
) -> None:
    assert not set(LIVE_OR_IDENTITY) & visible_fields(audience, status)


@pytest.mark.parametrize("status", STATUSES, ids=shipment_pb2.ShipmentStatus.Name)
def test_the_public_never_sees_identities_and_only_public_fields(status: Status) -> None:
    visible = visible_fields(Audience.PUBLIC, status)
    assert visible <= PUBLIC_FIELDS
    assert not visible & {"driver_id", "vehicle_id", "customer_id", "proof", "tracking_token"}
    if "last_position" in visible:  # the vehicle only while it moves towards the recipient
        assert status in (
            shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT,
            shipment_pb2.SHIPMENT_STATUS_OUT_FOR_DELIVERY,
        )


def test_the_public_route_ends_at_its_own_destination() -> None:
    route = [(52.0, 13.0), (52.1, 13.0), (52.2, 13.0), (52.3, 13.0), (52.4, 13.0)]
    clipped = clip_route(route, (52.21, 13.001))
    assert clipped == [(52.0, 13.0), (52.1, 13.0), (52.2, 13.0), (52.21, 13.001)]
    assert clip_route([], (52.0, 13.0)) == []


def test_staff_see_everything_in_every_status() -> None:
    for status in STATUSES:
        assert visible_fields(Audience.STAFF, status) == SHIPMENT_FIELDS


def test_an_unknown_status_number_gets_the_most_restrictive_view() -> None:
    assert visible_fields(
        Audience.CUSTOMER, shipment_pb2.ShipmentStatus.ValueType(99)
    ) == visible_fields(Audience.CUSTOMER, shipment_pb2.SHIPMENT_STATUS_CREATED)


# --- redaction of real messages -----------------------------------------------------------


def full_shipment(status: Status) -> tracking_pb2.Shipment:
    """A Shipment with every field set to a recognisable value."""
    stamp = common_pb2.LatLng(latitude=52.5, longitude=13.4)
    message = tracking_pb2.Shipment(
        shipment_id="s-1",
        customer_id="cust-secret",
        status=status,
        planned_route="_p~iF~ps|U",
        reference="PO-1",
        vehicle_id="veh-secret",
        driver_id="drv-secret",
        tracking_token="tok",
        delivery_attempts=1,
        origin=stamp,
        destination=stamp,
        proof=delivery_pb2.DeliveryConfirmation(
            confirmation_id="c-1", vehicle_id="veh-secret", recipient_name="R"
        ),
    )
    message.promised_window.start.seconds = 1
    message.promised_window.end.seconds = 2
    message.last_position.location.CopyFrom(stamp)
    message.progress.remaining_m = 500.0
    message.eta.remaining_m = 1000.0
    message.delivered_at.seconds = 3
    message.anomalies.add(event_id="e-1", reason="odd")
    message.created_at.seconds = 4
    message.updated_at.seconds = 5
    return message


def present(message: tracking_pb2.Shipment) -> set[str]:
    return {descriptor.name for descriptor, _ in message.ListFields()}


def test_the_full_shipment_sets_every_field() -> None:
    assert present(full_shipment(shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT)) == SHIPMENT_FIELDS


@pytest.mark.parametrize("status", STATUSES, ids=shipment_pb2.ShipmentStatus.Name)
@pytest.mark.parametrize("audience", AUDIENCES, ids=str)
def test_redaction_keeps_exactly_the_visible_fields(audience: Audience, status: Status) -> None:
    redacted = redact_shipment(full_shipment(status), audience)
    expected = set(visible_fields(audience, status))
    if status == shipment_pb2.SHIPMENT_STATUS_UNSPECIFIED:
        expected.discard("status")  # the default value is not "set" on the wire
    assert present(redacted) == expected
    if "vehicle_id" not in expected:  # nor inside the proof
        assert b"veh-secret" not in redacted.SerializeToString()


def test_a_customer_sees_the_proof_of_its_delivery_without_the_vehicle() -> None:
    redacted = redact_shipment(
        full_shipment(shipment_pb2.SHIPMENT_STATUS_DELIVERED), Audience.CUSTOMER
    )
    assert redacted.proof.confirmation_id == "c-1"
    assert redacted.proof.vehicle_id == ""


def test_timeline_redaction_drops_anomalies_and_fields_by_audience() -> None:
    def entries() -> list[tracking_pb2.TimelineEntry]:
        return [
            tracking_pb2.TimelineEntry(
                event_id="e1",
                kind="created",
                status=shipment_pb2.SHIPMENT_STATUS_CREATED,
                detail="made",
            ),
            tracking_pb2.TimelineEntry(
                event_id="e2",
                kind="picked_up",
                status=shipment_pb2.SHIPMENT_STATUS_CREATED,
                detail="odd",
                anomaly=True,
            ),
        ]

    staff = redact_timeline(entries(), Audience.STAFF)
    assert staff == entries()
    customer = redact_timeline(entries(), Audience.CUSTOMER)
    assert customer == [
        tracking_pb2.TimelineEntry(
            kind="created", status=shipment_pb2.SHIPMENT_STATUS_CREATED, detail="made"
        )
    ]
    public = redact_timeline(entries(), Audience.PUBLIC)
    assert public == [
        tracking_pb2.TimelineEntry(kind="created", status=shipment_pb2.SHIPMENT_STATUS_CREATED)
    ]
