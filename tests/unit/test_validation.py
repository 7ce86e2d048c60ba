"""Validation of incoming payloads: the rules, and that garbage never raises."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.domain.polyline import encode
from shared.domain.validation import (
    MAX_ID_LENGTH,
    MAX_POINTS_PER_BATCH,
    GpsBatchVerdict,
    Violation,
    as_field_violations,
    validate_delivery_confirmation,
    validate_gps_batch,
    validate_shipment_event,
)
from shared.pb import common_pb2, delivery_pb2, gps_pb2, shipment_pb2

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SHA = "ab" * 32


def ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def point(**overrides: object) -> gps_pb2.GpsPoint:
    fields: dict[str, object] = {
        "recorded_at": ts(NOW - timedelta(seconds=30)),
        "latitude": 52.52,
        "longitude": 13.405,
        "accuracy_m": 8.0,
        "speed_mps": 12.5,
        "heading_deg": 90.0,
    }
    fields.update(overrides)
    return gps_pb2.GpsPoint(**fields)  # type: ignore[arg-type]


def batch(*points: gps_pb2.GpsPoint, **overrides: object) -> gps_pb2.GpsBatch:
    fields: dict[str, object] = {"vehicle_id": "VAN-7", "device_id": "dev-1", "sequence": 1}
    fields.update(overrides)
    return gps_pb2.GpsBatch(points=list(points) or [point()], **fields)  # type: ignore[arg-type]


def created_event(**overrides: object) -> shipment_pb2.ShipmentEvent:
    created = shipment_pb2.ShipmentCreated(
        customer_id="C-1",
        origin=common_pb2.LatLng(latitude=52.40, longitude=13.05),
        destination=common_pb2.LatLng(latitude=52.52, longitude=13.405),
        promised_window=common_pb2.TimeWindow(
            start=ts(NOW + timedelta(hours=20)), end=ts(NOW + timedelta(hours=22))
        ),
        planned_route=encode([(52.40, 13.05), (52.52, 13.405)]),
        reference="PO 4711",
    )
    for name, value in overrides.items():
        if isinstance(value, Message):
            getattr(created, name).CopyFrom(value)
        else:
            setattr(created, name, value)
    return shipment_pb2.ShipmentEvent(
        event_id="e-1", shipment_id="S-1", occurred_at=ts(NOW), created=created
    )


def confirmation(**overrides: object) -> delivery_pb2.DeliveryConfirmation:
    fields: dict[str, object] = {
        "confirmation_id": "conf-1",
        "shipment_id": "S-1",
        "vehicle_id": "VAN-7",
        "recipient_name": "A. Person",
        "confirmed_at": ts(NOW - timedelta(minutes=1)),
        "location": common_pb2.LatLng(latitude=52.52, longitude=13.405),
        "method": delivery_pb2.CONFIRMATION_METHOD_SIGNATURE,
        "proof_sha256": SHA,
    }
    fields.update(overrides)
    return delivery_pb2.DeliveryConfirmation(**fields)  # type: ignore[arg-type]


def fields_of(violations: list[Violation]) -> list[str]:
    return [v.field for v in violations]


# --- GPS --------------------------------------------------------------------------------


def test_valid_batch_is_accepted() -> None:
    verdict = validate_gps_batch(batch(point(), point(latitude=-33.9, longitude=151.2)), NOW)
    assert verdict.batch_violations == []
    assert verdict.point_violations == {}
    assert len(verdict.valid_points) == 2
    assert verdict.outcome == gps_pb2.BATCH_OUTCOME_ACCEPTED
    assert verdict.accepted


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"latitude": 90.5}, "batch.points[0].latitude"),
        ({"latitude": math.nan}, "batch.points[0].latitude"),
        ({"longitude": -180.01}, "batch.points[0].longitude"),
        ({"longitude": math.inf}, "batch.points[0].longitude"),
        ({"latitude": 0.0, "longitude": 0.0}, "batch.points[0]"),
        ({"recorded_at": Timestamp()}, "batch.points[0].recorded_at"),
        ({"recorded_at": ts(NOW + timedelta(minutes=6))}, "batch.points[0].recorded_at"),
        ({"recorded_at": ts(datetime(1999, 12, 31, tzinfo=UTC))}, "batch.points[0].recorded_at"),
        (
            {"recorded_at": Timestamp(seconds=1_700_000_000, nanos=-1)},
            "batch.points[0].recorded_at",
        ),
        ({"accuracy_m": -1.0}, "batch.points[0].accuracy_m"),
        ({"speed_mps": math.nan}, "batch.points[0].speed_mps"),
        ({"heading_deg": 360.0}, "batch.points[0].heading_deg"),
        ({"heading_deg": -0.5}, "batch.points[0].heading_deg"),
    ],
)
def test_bad_point_is_refused_alone(overrides: dict[str, object], field: str) -> None:
    good = point(latitude=48.1, longitude=11.6)
    verdict = validate_gps_batch(batch(point(**overrides), good), NOW)
    assert verdict.batch_violations == []
    assert fields_of(verdict.point_violations[0]) == [field]
    assert list(verdict.valid_points) == [good]
    assert verdict.outcome == gps_pb2.BATCH_OUTCOME_PARTIALLY_ACCEPTED


def test_newest_is_the_first_valid_point_recorded_last() -> None:
    late = NOW - timedelta(seconds=5)
    points = [
        point(recorded_at=ts(NOW - timedelta(seconds=50))),
        point(recorded_at=ts(late), speed_mps=1.0),
        point(recorded_at=ts(NOW - timedelta(seconds=1)), latitude=math.nan),  # refused
        point(recorded_at=ts(late), speed_mps=2.0),
        point(recorded_at=ts(NOW - timedelta(seconds=40))),
    ]
    verdict = validate_gps_batch(batch(*points), NOW)
    assert verdict.newest is verdict.valid_points[1]
    assert verdict.newest is not None
    assert verdict.newest.speed_mps == 1.0
    assert validate_gps_batch(batch(point(latitude=math.nan)), NOW).newest is None
    assert validate_gps_batch(batch(point(), sequence=0), NOW).newest is None


def test_future_within_skew_is_accepted_and_skew_is_configurable() -> None:
    soon = batch(point(recorded_at=ts(NOW + timedelta(minutes=4))))
    assert validate_gps_batch(soon, NOW).accepted
    strict = validate_gps_batch(soon, NOW, max_future_skew=timedelta(minutes=1))
    assert fields_of(strict.violations()) == ["batch.points[0].recorded_at"]


def test_all_points_bad_is_rejected() -> None:
    verdict = validate_gps_batch(batch(point(latitude=100.0), point(accuracy_m=-2.0)), NOW)
    assert verdict.outcome == gps_pb2.BATCH_OUTCOME_REJECTED
    assert not verdict.accepted
    assert sorted(verdict.point_violations) == [0, 1]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"vehicle_id": ""}, "batch.vehicle_id"),
        ({"vehicle_id": "VAN 7"}, "batch.vehicle_id"),
        ({"device_id": "x" * (MAX_ID_LENGTH + 1)}, "batch.device_id"),
        ({"device_id": "dev\x00"}, "batch.device_id"),
        ({"sequence": 0}, "batch.sequence"),
    ],
)
def test_bad_batch_fields_refuse_the_batch(overrides: dict[str, object], field: str) -> None:
    verdict = validate_gps_batch(batch(point(), **overrides), NOW)
    assert fields_of(verdict.batch_violations) == [field]
    assert verdict.valid_points == []
    assert verdict.outcome == gps_pb2.BATCH_OUTCOME_REJECTED


def test_point_count_limits() -> None:
    empty = gps_pb2.GpsBatch(vehicle_id="V", device_id="D", sequence=1)
    assert fields_of(validate_gps_batch(empty, NOW).batch_violations) == ["batch.points"]
    full = batch(*[point()] * MAX_POINTS_PER_BATCH)
    assert validate_gps_batch(full, NOW).outcome == gps_pb2.BATCH_OUTCOME_ACCEPTED
    over = batch(*[point(latitude=math.nan)] * (MAX_POINTS_PER_BATCH + 1))
    verdict = validate_gps_batch(over, NOW)
    assert fields_of(verdict.batch_violations) == ["batch.points"]
    assert verdict.point_violations == {}  # not examined: bounded work


def test_root_and_field_violation_conversion() -> None:
    verdict = validate_gps_batch(batch(point(latitude=95.0)), NOW, root="req.batch")
    converted = as_field_violations(verdict.violations())
    assert [v.field for v in converted] == ["req.batch.points[0].latitude"]
    assert isinstance(converted[0], common_pb2.FieldViolation)


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_gps_batch(batch(), datetime(2025, 1, 1))


# --- shipment events --------------------------------------------------------------------


def test_valid_created_event_passes() -> None:
    assert validate_shipment_event(created_event(), NOW) == []
    assert validate_shipment_event(created_event(planned_route="", reference=""), NOW) == []


def test_event_without_member_names_the_oneof() -> None:
    event = shipment_pb2.ShipmentEvent(shipment_id="S", occurred_at=ts(NOW))
    assert fields_of(validate_shipment_event(event, NOW)) == ["event.event"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"customer_id": ""}, "event.created.customer_id"),
        ({"origin": common_pb2.LatLng()}, "event.created.origin"),
        (
            {"destination": common_pb2.LatLng(latitude=math.nan, longitude=1)},
            "event.created.destination.latitude",
        ),
        ({"planned_route": "not a polyline!"}, "event.created.planned_route"),
        ({"planned_route": encode([(52.4, 13.0)])}, "event.created.planned_route"),
        ({"reference": "r" * 2000}, "event.created.reference"),
        ({"reference": "nul \x00 inside"}, "event.created.reference"),
        (
            {"planned_route": encode([(52.0 + i * 1e-3, 13.0) for i in range(2)]) + "?" * 300_000},
            "event.created.planned_route",
        ),
        (
            {
                "promised_window": common_pb2.TimeWindow(
                    start=ts(NOW + timedelta(hours=2)), end=ts(NOW + timedelta(hours=1))
                )
            },
            "event.created.promised_window",
        ),
        (
            {"promised_window": common_pb2.TimeWindow(start=ts(NOW))},
            "event.created.promised_window.end",
        ),
    ],
)
def test_created_rules(overrides: dict[str, object], field: str) -> None:
    assert fields_of(validate_shipment_event(created_event(**overrides), NOW)) == [field]


def test_created_requires_origin_destination_and_window() -> None:
    event = created_event()
    for name in ("origin", "destination", "promised_window"):
        event.created.ClearField(name)
    assert fields_of(validate_shipment_event(event, NOW)) == [
        "event.created.origin",
        "event.created.destination",
        "event.created.promised_window",
    ]


def test_common_event_fields() -> None:
    event = shipment_pb2.ShipmentEvent(
        event_id="has space",
        shipment_id="",
        occurred_at=ts(NOW + timedelta(hours=1)),
        picked_up=shipment_pb2.PickedUp(),
    )
    assert fields_of(validate_shipment_event(event, NOW, root="events[3]")) == [
        "events[3].event_id",
        "events[3].shipment_id",
        "events[3].occurred_at",
    ]
    event.event_id = ""  # optional: the service mints one
    event.shipment_id = "S"
    event.occurred_at.CopyFrom(ts(NOW))
    assert validate_shipment_event(event, NOW) == []


def test_enums_unknown_and_unspecified_are_refused() -> None:
    base = {"shipment_id": "S", "occurred_at": ts(NOW)}
    failed = shipment_pb2.ShipmentEvent(**base, delivery_failed=shipment_pb2.DeliveryFailed())  # type: ignore[arg-type]
    assert fields_of(validate_shipment_event(failed, NOW)) == ["event.delivery_failed.reason"]
    failed.delivery_failed.reason = 99  # type: ignore[assignment]
    assert "99" in validate_shipment_event(failed, NOW)[0].description
    failed.delivery_failed.reason = shipment_pb2.DELIVERY_FAILURE_REASON_REFUSED
    failed.delivery_failed.retry_at.CopyFrom(ts(NOW + timedelta(days=1)))  # future is fine
    assert validate_shipment_event(failed, NOW) == []
    exception = shipment_pb2.ShipmentEvent(**base, exception=shipment_pb2.ShipmentException())  # type: ignore[arg-type]
    assert fields_of(validate_shipment_event(exception, NOW)) == ["event.exception.kind"]


def test_vehicle_assigned_needs_a_vehicle() -> None:
    event = shipment_pb2.ShipmentEvent(
        shipment_id="S",
        occurred_at=ts(NOW),
        vehicle_assigned=shipment_pb2.VehicleAssigned(driver_id="d 1"),
    )
    assert fields_of(validate_shipment_event(event, NOW)) == [
        "event.vehicle_assigned.vehicle_id",
        "event.vehicle_assigned.driver_id",
    ]


# --- delivery confirmations -------------------------------------------------------------


def test_valid_confirmation_passes() -> None:
    assert validate_delivery_confirmation(confirmation(), NOW) == []
    pin = confirmation(method=delivery_pb2.CONFIRMATION_METHOD_PIN_CODE, proof_sha256="")
    pin.ClearField("location")
    assert validate_delivery_confirmation(pin, NOW) == []


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"confirmation_id": ""}, "confirmation.confirmation_id"),
        ({"proof_sha256": ""}, "confirmation.proof_sha256"),
        ({"proof_sha256": SHA.upper()}, "confirmation.proof_sha256"),
        ({"proof_sha256": SHA[:-1]}, "confirmation.proof_sha256"),
        ({"method": delivery_pb2.CONFIRMATION_METHOD_UNSPECIFIED}, "confirmation.method"),
        ({"method": 42}, "confirmation.method"),
        ({"location": common_pb2.LatLng()}, "confirmation.location"),
        (
            {"location": common_pb2.LatLng(latitude=52, longitude=math.inf)},
            "confirmation.location.longitude",
        ),
        ({"confirmed_at": Timestamp()}, "confirmation.confirmed_at"),
        ({"note": "\x00"}, "confirmation.note"),
    ],
)
def test_confirmation_rules(overrides: dict[str, object], field: str) -> None:
    assert fields_of(validate_delivery_confirmation(confirmation(**overrides), NOW)) == [field]


# --- properties: garbage never raises, paths exist, valid passes ------------------------

_SEGMENT = re.compile(r"^([a-z_][a-z0-9_]*)(?:\[(\d+)\])?$")


def resolves(path: str, root: str, message: Message) -> bool:
    """True when ``path`` names a field (or oneof) of ``message`` under ``root``."""
    descriptor = cast(Descriptor, message.DESCRIPTOR)
    if not path.startswith(root + ".") and path != root:
        return False
    parts = path[len(root) + 1 :].split(".") if path != root else []
    desc: Descriptor | None = descriptor
    current: object = message
    for position, part in enumerate(parts):
        match = _SEGMENT.match(part)
        if match is None or desc is None:
            return False
        name, index = match.group(1), match.group(2)
        last = position == len(parts) - 1
        if name in desc.oneofs_by_name and name not in desc.fields_by_name:
            return last and index is None
        field = desc.fields_by_name.get(name)
        if field is None:
            return False
        value = getattr(current, name)
        if field.is_repeated:
            if index is None:
                return last
            if int(index) >= len(value):
                return False
            value = value[int(index)]
        elif index is not None:
            return False
        desc, current = field.message_type, value
    return True


def check_paths(violations: list[Violation], root: str, message: Message) -> None:
    for violation in violations:
        assert violation.field, violation
        assert violation.description, violation
        assert resolves(violation.field, root, message), violation


ids = st.text(max_size=140)
#: Free text as ingest accepts it: anything but NUL (PostgreSQL cannot store it), in
#: valid UTF-8 (a protobuf string field cannot hold a lone surrogate).
no_nul = st.characters(exclude_characters="\x00", codec="utf-8")
doubles = st.floats(allow_nan=True, allow_infinity=True)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
enums = st.integers(-(2**31), 2**31 - 1)


@st.composite
def timestamps(draw: st.DrawFn) -> Timestamp:
    plausible = st.builds(lambda s: ts(NOW + timedelta(seconds=s)), st.integers(-(10**9), 10**9))
    raw = st.builds(
        lambda s, n: Timestamp(seconds=s, nanos=n),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(-(2**31), 2**31 - 1),
    )
    return draw(st.one_of(st.just(Timestamp()), plausible, raw))


def latlngs() -> st.SearchStrategy[common_pb2.LatLng]:
    return st.builds(common_pb2.LatLng, latitude=doubles, longitude=doubles)


def parsed(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Messages parsed from random bytes: unknown fields, odd enum numbers, anything."""

    def parse(data: bytes) -> Message | None:
        try:
            return cls.FromString(data)
        except DecodeError:
            return None

    return st.binary(max_size=200).map(parse).filter(lambda m: m is not None)  # type: ignore[return-value]


garbage_points = st.builds(
    gps_pb2.GpsPoint,
    recorded_at=timestamps(),
    latitude=doubles,
    longitude=doubles,
    accuracy_m=floats32,
    speed_mps=floats32,
    heading_deg=floats32,
)
garbage_batches = st.one_of(
    st.builds(
        gps_pb2.GpsBatch,
        vehicle_id=ids,
        device_id=ids,
        sequence=st.integers(0, 2**64 - 1),
        points=st.lists(garbage_points, max_size=8),
    ),
    parsed(gps_pb2.GpsBatch),
)


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(garbage_batches)
def test_garbage_batches_never_raise_and_name_real_fields(message: gps_pb2.GpsBatch) -> None:
    verdict = validate_gps_batch(message, NOW)
    check_paths(verdict.violations(), "batch", message)
    for index, found in verdict.point_violations.items():
        assert all(v.field.startswith(f"batch.points[{index}]") for v in found)
    if verdict.batch_violations:
        assert verdict.valid_points == []
    else:
        assert len(verdict.valid_points) + len(verdict.point_violations) == len(message.points)
    assert_newest(verdict)
    assert verdict.outcome in gps_pb2.BatchOutcome.DESCRIPTOR.values_by_number


#: Values at and around each edge of the point rules.
_EDGE_DEGREES = [
    *(0.0, -0.0, 1e-6, -1e-6, 9.9e-7, -9.9e-7, 1e-7, 90.0, -90.0, 90.000001, -90.000001),
    *(180.0, -180.0, 180.00001, -180.00001, 52.5, 13.4, math.nan, math.inf, -math.inf),
]
_EDGE_NON_NEGATIVE = [
    *(0.0, -0.0, -1e-30, 1e-30, 359.99, 360.0, 360.01, 1e38, math.nan, math.inf, -math.inf),
]
_edge_degrees = st.sampled_from(_EDGE_DEGREES)
_edge_non_negative = st.sampled_from(_EDGE_NON_NEGATIVE)
_LATE_NOW = datetime(2099, 12, 31, 23, 58, tzinfo=UTC)  # its skew limit is after 2100


def _edge_instants() -> list[Timestamp]:
    stamps = [Timestamp(), Timestamp(seconds=0, nanos=1), Timestamp(seconds=-1, nanos=0)]
    for moment in (
        datetime(2000, 1, 1, tzinfo=UTC),
        datetime(2100, 1, 1, tzinfo=UTC),
        NOW + timedelta(minutes=5),
        _LATE_NOW + timedelta(minutes=5),
    ):
        base = ts(moment)
        for delta_ns in (-1, 0, 1):
            seconds, nanos = divmod(base.seconds * 10**9 + base.nanos + delta_ns, 10**9)
            stamps.append(Timestamp(seconds=seconds, nanos=nanos))
    stamps.append(Timestamp(seconds=1_700_000_000, nanos=10**9))
    stamps.append(Timestamp(seconds=1_700_000_000, nanos=-1))
    return stamps


edge_points = st.builds(
    gps_pb2.GpsPoint,
    recorded_at=st.one_of(st.sampled_from(_edge_instants()), timestamps()),
    latitude=st.one_of(_edge_degrees, doubles),
    longitude=st.one_of(_edge_degrees, doubles),
    accuracy_m=st.one_of(_edge_non_negative, floats32),
    speed_mps=st.one_of(_edge_non_negative, floats32),
    heading_deg=st.one_of(_edge_non_negative, floats32),
)


def _full_check_agrees(message: gps_pb2.GpsBatch, now: datetime) -> None:
    """validate_gps_batch decides each point exactly as the full per-point check does."""
    from shared.domain.validation import _check_gps_point, _clock

    verdict = validate_gps_batch(message, now)
    clock = _clock(now, timedelta(minutes=5))
    expected_valid = []
    for index, stored in enumerate(message.points):
        found: list[Violation] = []
        _check_gps_point(found, f"batch.points[{index}]", stored, clock)
        assert verdict.point_violations.get(index, []) == found, stored
        if not found:
            expected_valid.append(stored)
    assert list(verdict.valid_points) == expected_valid
    assert_newest(verdict)


def assert_newest(verdict: GpsBatchVerdict) -> None:
    """`newest` is the first valid point with the latest recorded_at, or None."""
    if not verdict.valid_points:
        assert verdict.newest is None
        return
    latest = max(verdict.valid_points, key=lambda p: (p.recorded_at.seconds, p.recorded_at.nanos))
    assert verdict.newest is latest


def test_each_edge_value_gets_the_full_checks_verdict() -> None:
    """Every edge of every point rule, one field at a time, around a valid point."""
    edges: dict[str, list[Any]] = {
        "recorded_at": list(_edge_instants()),
        "latitude": _EDGE_DEGREES,
        "longitude": _EDGE_DEGREES,
        "accuracy_m": _EDGE_NON_NEGATIVE,
        "speed_mps": _EDGE_NON_NEGATIVE,
        "heading_deg": _EDGE_NON_NEGATIVE,
    }
    for now in (NOW, _LATE_NOW):
        base = {"recorded_at": ts(now - timedelta(seconds=30))}
        points = [
            point(**{**base, name: value}) for name, values in edges.items() for value in values
        ]
        points += [
            point(latitude=lat, longitude=lon) for lat in _EDGE_DEGREES for lon in _EDGE_DEGREES
        ]
        assert len(points) <= MAX_POINTS_PER_BATCH
        _full_check_agrees(batch(*points), now)


@settings(max_examples=300)
@given(st.lists(edge_points, min_size=1, max_size=10), st.sampled_from([NOW, _LATE_NOW]))
def test_each_point_gets_the_full_checks_verdict(
    points: list[gps_pb2.GpsPoint], now: datetime
) -> None:
    """Random mixtures of edge values and garbage: as the full per-point check decides."""
    _full_check_agrees(batch(*points), now)


members = {
    "created": st.builds(
        shipment_pb2.ShipmentCreated,
        customer_id=ids,
        origin=latlngs(),
        destination=latlngs(),
        promised_window=st.builds(common_pb2.TimeWindow, start=timestamps(), end=timestamps()),
        planned_route=st.one_of(st.text(max_size=40), st.just("_p~iF~ps|U_ulLnnqC_mqNvxq`@")),
        reference=st.text(max_size=1100),
    ),
    "vehicle_assigned": st.builds(
        shipment_pb2.VehicleAssigned,
        vehicle_id=ids,
        driver_id=ids,
        stop_sequence=st.integers(0, 2**32 - 1),
    ),
    "picked_up": st.just(shipment_pb2.PickedUp()),
    "delivered": st.just(shipment_pb2.Delivered()),
    "delivery_failed": st.builds(
        shipment_pb2.DeliveryFailed, reason=enums, note=st.text(), retry_at=timestamps()
    ),
    "cancelled": st.builds(shipment_pb2.Cancelled, reason=st.text()),
    "exception": st.builds(shipment_pb2.ShipmentException, kind=enums, description=st.text()),
}


@st.composite
def garbage_events(draw: st.DrawFn) -> shipment_pb2.ShipmentEvent:
    event = shipment_pb2.ShipmentEvent(
        event_id=draw(ids), shipment_id=draw(ids), occurred_at=draw(timestamps())
    )
    name = draw(st.sampled_from([*members, None]))
    if name is not None:
        getattr(event, name).CopyFrom(draw(members[name]))
    return event


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(st.one_of(garbage_events(), parsed(shipment_pb2.ShipmentEvent)))
def test_garbage_events_never_raise_and_name_real_fields(
    message: shipment_pb2.ShipmentEvent,
) -> None:
    check_paths(validate_shipment_event(message, NOW), "event", message)


garbage_confirmations = st.one_of(
    st.builds(
        delivery_pb2.DeliveryConfirmation,
        confirmation_id=ids,
        shipment_id=ids,
        vehicle_id=ids,
        recipient_name=st.text(),
        confirmed_at=timestamps(),
        location=st.one_of(st.none(), latlngs()),
        method=enums,
        proof_sha256=st.one_of(st.text(max_size=70), st.just(SHA)),
        note=st.text(),
    ),
    parsed(delivery_pb2.DeliveryConfirmation),
)


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(garbage_confirmations)
def test_garbage_confirmations_never_raise_and_name_real_fields(
    message: delivery_pb2.DeliveryConfirmation,
) -> None:
    check_paths(validate_delivery_confirmation(message, NOW), "confirmation", message)


# Valid messages: every generated value within the rules.
good_ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True)
good_lat = st.floats(0.001, 90).flatmap(lambda v: st.sampled_from([v, -v]))
good_lon = st.floats(-180, 180)
past = st.integers(0, 10 * 365 * 86400).map(lambda s: ts(NOW - timedelta(seconds=s)))
good_points = st.builds(
    gps_pb2.GpsPoint,
    recorded_at=st.one_of(past, st.just(ts(NOW + timedelta(minutes=5)))),
    latitude=good_lat,
    longitude=good_lon,
    accuracy_m=st.floats(0, 1e6, width=32),
    speed_mps=st.floats(0, 1e3, width=32),
    heading_deg=st.floats(0, 359.5, width=32),
)


@given(
    st.builds(
        gps_pb2.GpsBatch,
        vehicle_id=good_ids,
        device_id=good_ids,
        sequence=st.integers(1, 2**64 - 1),
        points=st.lists(good_points, min_size=1, max_size=20),
    )
)
def test_valid_batches_pass(message: gps_pb2.GpsBatch) -> None:
    verdict = validate_gps_batch(message, NOW)
    assert verdict.violations() == []
    assert len(verdict.valid_points) == len(message.points)


@st.composite
def good_events(draw: st.DrawFn) -> shipment_pb2.ShipmentEvent:
    event = shipment_pb2.ShipmentEvent(
        event_id=draw(st.one_of(st.just(""), good_ids)),
        shipment_id=draw(good_ids),
        occurred_at=draw(past),
    )
    name = draw(st.sampled_from(list(shipment_pb2.ShipmentEvent.DESCRIPTOR.oneofs[0].fields)))
    member = getattr(event, name.name)
    member.SetInParent()
    if name.name == "created":
        start = draw(st.integers(-(10**8), 10**8))
        route = draw(st.lists(st.tuples(good_lat, good_lon), min_size=2, max_size=5))
        member.CopyFrom(
            shipment_pb2.ShipmentCreated(
                customer_id=draw(good_ids),
                origin=common_pb2.LatLng(latitude=draw(good_lat), longitude=draw(good_lon)),
                destination=common_pb2.LatLng(latitude=draw(good_lat), longitude=draw(good_lon)),
                promised_window=common_pb2.TimeWindow(
                    start=ts(NOW + timedelta(seconds=start)),
                    end=ts(NOW + timedelta(seconds=start + draw(st.integers(1, 10**6)))),
                ),
                planned_route=draw(st.one_of(st.just(""), st.just(encode(route)))),
                reference=draw(st.text(no_nul, max_size=100)),
            )
        )
    elif name.name == "vehicle_assigned":
        member.vehicle_id = draw(good_ids)
        member.driver_id = draw(st.one_of(st.just(""), good_ids))
    elif name.name == "delivery_failed":
        member.reason = draw(st.integers(1, 5))
    elif name.name == "exception":
        member.kind = draw(st.integers(1, 6))
    return event


@given(good_events())
def test_valid_events_pass(message: shipment_pb2.ShipmentEvent) -> None:
    assert validate_shipment_event(message, NOW) == []


@given(
    st.builds(
        delivery_pb2.DeliveryConfirmation,
        confirmation_id=good_ids,
        shipment_id=good_ids,
        vehicle_id=st.one_of(st.just(""), good_ids),
        recipient_name=st.text(no_nul, max_size=50),
        confirmed_at=past,
        location=st.one_of(
            st.none(), st.builds(common_pb2.LatLng, latitude=good_lat, longitude=good_lon)
        ),
        method=st.integers(1, 5),
        proof_sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
        note=st.text(no_nul, max_size=50),
    )
)
def test_valid_confirmations_pass(message: delivery_pb2.DeliveryConfirmation) -> None:
    assert validate_delivery_confirmation(message, NOW) == []


def test_path_resolver_is_not_vacuous() -> None:
    message = batch(point(), point())
    assert resolves("batch.points[1].latitude", "batch", message)
    assert resolves("batch.points", "batch", message)
    assert not resolves("batch.points[2].latitude", "batch", message)
    assert not resolves("batch.points[0].altitude", "batch", message)
    assert not resolves("batch.vehicle_id[0]", "batch", message)
    assert not resolves("event.vehicle_id", "batch", message)
    event = created_event()
    assert resolves("event.event", "event", event)
    assert resolves("event.created.promised_window.end", "event", event)
    assert not resolves("event.created.promised_window.end.x", "event", event)
