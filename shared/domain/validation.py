"""Validation of the payloads cargotrack accepts over gRPC, before anything reaches Kafka.

Every validator returns :class:`Violation` values (an empty list means valid) and never
raises for any message content: garbage in, violations out. Only a programming error
raises ``ValueError`` (a naive ``now``, a negative skew). Each violation names the
offending field by its path from the request's root, as in
``google.rpc.BadRequest.FieldViolation`` — ``batch.points[3].latitude``,
``event.created.promised_window``, ``confirmation.location`` — so a service can return
them as they are (:func:`as_field_violations`).

Common rules, applied wherever the field occurs:

* **ids** (shipment, vehicle, device, customer, ...): non-empty, at most
  :data:`MAX_ID_LENGTH` characters, printable, no whitespace. An optional id may be
  empty but, when given, follows the same rules.
* **free text** (reference, note, reason, ...): at most :data:`MAX_TEXT_LENGTH` characters,
  no NUL (U+0000: PostgreSQL cannot store it);
  a planned route (encoded polyline) at most :data:`MAX_ROUTE_LENGTH`.
* **coordinates**: finite; latitude within [-90, 90], longitude within [-180, 180];
  (0, 0) — "null island", what an unset coordinate reads as — is refused (within
  :data:`NULL_ISLAND_TOLERANCE_DEG`), reported on the point or LatLng as a whole.
* **timestamps**: required ones must be set (seconds != 0 or nanos != 0); nanos within
  [0, 10**9); not before :data:`EARLIEST_TIME` (2000); not after :data:`LATEST_TIME`
  (2100). A timestamp of something that *happened* (a GPS fix, an event's
  ``occurred_at``, ``confirmed_at``) must also not be more than ``max_future_skew``
  (default :data:`DEFAULT_MAX_FUTURE_SKEW`, 5 minutes) after ``now``. Planned times
  (promised window, ``retry_at``) may lie in the future.
* **enums**: proto3 enums are open, so a message may carry a number its enum does not
  define; such a value is refused. Where a value is required, ``*_UNSPECIFIED`` (0) is
  refused too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from shared.pb import common_pb2, delivery_pb2, gps_pb2, shipment_pb2

MAX_POINTS_PER_BATCH = 1000
MAX_ID_LENGTH = 128
MAX_TEXT_LENGTH = 1024
#: Characters of an encoded planned route (tens of thousands of points). Without a
#: bound, a route under the gRPC message limit made a Kafka record over the broker's
#: limit, which Kafka refused for good while the client was told to retry.
MAX_ROUTE_LENGTH = 256 * 1024
DEFAULT_MAX_FUTURE_SKEW = timedelta(minutes=5)
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2100, 1, 1, tzinfo=UTC)
NULL_ISLAND_TOLERANCE_DEG = 1e-6

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_S = 1_000_000_000
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PROOF_METHODS = frozenset(
    {
        delivery_pb2.CONFIRMATION_METHOD_SIGNATURE,
        delivery_pb2.CONFIRMATION_METHOD_PHOTO,
    }
)


@dataclass(frozen=True)
class Violation:
    """One refused field: its path from the request root, and the rule it breaks."""

    field: str
    description: str


@dataclass(frozen=True)
class GpsBatchVerdict:
    """What to do with one GPS batch.

    ``batch_violations`` refuse the whole batch (bad vehicle/device id or sequence, no
    points or too many). ``point_violations`` maps the index of each bad point to its
    violations. ``valid_points`` are the batch's own point messages (not copies) that
    passed, in batch order; it is empty whenever the batch as a whole is refused.
    ``newest`` is the valid point recorded last (the first of equals), None when
    ``valid_points`` is empty; not compared (it follows from ``valid_points``).
    """

    batch_violations: list[Violation]
    point_violations: dict[int, list[Violation]]
    valid_points: list[gps_pb2.GpsPoint]
    newest: gps_pb2.GpsPoint | None = field(default=None, compare=False)

    @property
    def accepted(self) -> bool:
        """True when there is something to store: no batch violation and >= 1 valid point."""
        return not self.batch_violations and bool(self.valid_points)

    @property
    def outcome(self) -> gps_pb2.BatchOutcome.ValueType:
        """ACCEPTED (all points valid), PARTIALLY_ACCEPTED, or REJECTED (nothing to store)."""
        if not self.accepted:
            return gps_pb2.BATCH_OUTCOME_REJECTED
        if self.point_violations:
            return gps_pb2.BATCH_OUTCOME_PARTIALLY_ACCEPTED
        return gps_pb2.BATCH_OUTCOME_ACCEPTED

    def violations(self) -> list[Violation]:
        """Every violation: the batch's first, then the points' in index order."""
        flat = list(self.batch_violations)
        for index in sorted(self.point_violations):
            flat.extend(self.point_violations[index])
        return flat


def as_field_violations(violations: list[Violation]) -> list[common_pb2.FieldViolation]:
    """The violations as protobuf ``FieldViolation`` messages, in the same order."""
    return [common_pb2.FieldViolation(field=v.field, description=v.description) for v in violations]


# --- the clock ------------------------------------------------------------------------


def _ns(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


_EARLIEST_NS = _ns(EARLIEST_TIME)
_LATEST_NS = _ns(LATEST_TIME)


@dataclass(frozen=True)
class _Clock:
    now: datetime
    skew: timedelta
    #: The latest acceptable instant for a timestamp of something that happened.
    happened_limit_ns: int


def _clock(now: datetime, max_future_skew: timedelta) -> _Clock:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    if max_future_skew < timedelta(0):
        raise ValueError("max_future_skew must not be negative")
    return _Clock(now, max_future_skew, _ns(now + max_future_skew))


# --- field rules ----------------------------------------------------------------------


def _check_id(out: list[Violation], path: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            out.append(Violation(path, "must not be empty"))
        return
    if len(value) > MAX_ID_LENGTH:
        out.append(Violation(path, f"must be at most {MAX_ID_LENGTH} characters"))
    elif not value.isprintable() or any(ch.isspace() for ch in value):
        out.append(Violation(path, "must consist of printable characters without whitespace"))


def _check_text(out: list[Violation], path: str, value: str) -> None:
    if len(value) > MAX_TEXT_LENGTH:
        out.append(Violation(path, f"must be at most {MAX_TEXT_LENGTH} characters"))
    elif "\x00" in value:
        # PostgreSQL text and jsonb cannot hold U+0000: the projector could never
        # store the event, and would stop at it.
        out.append(Violation(path, "must not contain NUL (U+0000) characters"))


def _check_lat_lon(
    out: list[Violation], path: str, lat_path: str, lon_path: str, lat: float, lon: float
) -> None:
    ok = True
    if not math.isfinite(lat):
        out.append(Violation(lat_path, "must be a finite number"))
        ok = False
    elif not -90.0 <= lat <= 90.0:
        out.append(Violation(lat_path, "must be within [-90, 90] degrees"))
        ok = False
    if not math.isfinite(lon):
        out.append(Violation(lon_path, "must be a finite number"))
        ok = False
    elif not -180.0 <= lon <= 180.0:
        out.append(Violation(lon_path, "must be within [-180, 180] degrees"))
        ok = False
    if ok and abs(lat) < NULL_ISLAND_TOLERANCE_DEG and abs(lon) < NULL_ISLAND_TOLERANCE_DEG:
        out.append(Violation(path, "must not be (0, 0), the 'null island' of an unset coordinate"))


def _check_latlng(out: list[Violation], path: str, value: common_pb2.LatLng) -> None:
    _check_lat_lon(
        out, path, f"{path}.latitude", f"{path}.longitude", value.latitude, value.longitude
    )


def _check_non_negative(out: list[Violation], path: str, value: float) -> None:
    if not math.isfinite(value):
        out.append(Violation(path, "must be a finite number"))
    elif value < 0.0:
        out.append(Violation(path, "must not be negative"))


def _check_timestamp(
    out: list[Violation],
    path: str,
    value: Timestamp,
    clock: _Clock,
    *,
    happened: bool,
    required: bool = True,
) -> bool:
    """Check one timestamp; True when it is set and valid."""
    if value.seconds == 0 and value.nanos == 0:
        if required:
            out.append(Violation(path, "is required"))
        return False
    if not 0 <= value.nanos < _NS_PER_S:
        out.append(Violation(path, "must have nanos within [0, 999999999]"))
        return False
    instant = value.seconds * _NS_PER_S + value.nanos
    if instant < _EARLIEST_NS:
        out.append(Violation(path, f"must not be before {EARLIEST_TIME:%Y-%m-%d}"))
        return False
    if happened and instant > clock.happened_limit_ns:
        skew = int(clock.skew.total_seconds())
        out.append(
            Violation(
                path, f"must not be more than {skew} s in the future of {clock.now.isoformat()}"
            )
        )
        return False
    if instant >= _LATEST_NS:
        out.append(Violation(path, f"must be before {LATEST_TIME:%Y-%m-%d}"))
        return False
    return True


def _check_enum(
    out: list[Violation], path: str, value: int, enum: EnumDescriptor, *, required: bool
) -> None:
    if value not in enum.values_by_number:
        out.append(Violation(path, f"{value} is not a known {enum.name} value"))
    elif required and value == 0:
        out.append(Violation(path, f"is required (must not be {enum.values_by_number[0].name})"))


def _check_polyline(out: list[Violation], path: str, encoded: str) -> None:
    if len(encoded) > MAX_ROUTE_LENGTH:
        out.append(Violation(path, f"must be at most {MAX_ROUTE_LENGTH} characters"))
        return
    # Imported here, not at the top, so that this module does not depend on the
    # polyline module at import time (it was written concurrently with this one).
    from shared.domain.polyline import decode

    try:
        points = decode(encoded)
    except ValueError as error:
        out.append(Violation(path, f"must be a Google encoded polyline (precision 5): {error}"))
        return
    if len(points) < 2:
        out.append(Violation(path, "must have at least 2 points"))


# --- GPS ------------------------------------------------------------------------------


def _check_gps_point(
    out: list[Violation], path: str, point: gps_pb2.GpsPoint, clock: _Clock
) -> None:
    _check_timestamp(out, f"{path}.recorded_at", point.recorded_at, clock, happened=True)
    _check_lat_lon(
        out, path, f"{path}.latitude", f"{path}.longitude", point.latitude, point.longitude
    )
    _check_non_negative(out, f"{path}.accuracy_m", point.accuracy_m)
    _check_non_negative(out, f"{path}.speed_mps", point.speed_mps)
    heading_path = f"{path}.heading_deg"
    _check_non_negative(out, heading_path, point.heading_deg)
    if math.isfinite(point.heading_deg) and point.heading_deg >= 360.0:
        out.append(Violation(heading_path, "must be below 360 degrees"))


def validate_gps_batch(
    batch: gps_pb2.GpsBatch,
    now: datetime,
    *,
    max_future_skew: timedelta = DEFAULT_MAX_FUTURE_SKEW,
    root: str = "batch",
) -> GpsBatchVerdict:
    """Validate one GPS batch as ``StreamPoints`` receives it.

    Batch rules (a violation refuses the whole batch): ``vehicle_id`` and ``device_id``
    are ids; ``sequence`` >= 1; 1 to :data:`MAX_POINTS_PER_BATCH` points. With more
    points than that the points are not examined at all (the work stays bounded).

    Point rules (a violation refuses only that point): ``recorded_at`` set, from 2000
    on, at most ``max_future_skew`` after ``now``; valid coordinates, not (0, 0);
    ``accuracy_m``, ``speed_mps`` and ``heading_deg`` finite and >= 0 (0 = unknown);
    ``heading_deg`` < 360. Point paths are ``{root}.points[i].<field>``, or
    ``{root}.points[i]`` for null island.

    ``now`` must be timezone-aware.
    """
    clock = _clock(now, max_future_skew)
    batch_violations: list[Violation] = []
    _check_id(batch_violations, f"{root}.vehicle_id", batch.vehicle_id)
    _check_id(batch_violations, f"{root}.device_id", batch.device_id)
    if batch.sequence < 1:
        batch_violations.append(
            Violation(f"{root}.sequence", "must be at least 1 (a device numbers batches from 1)")
        )
    count = len(batch.points)
    if not 1 <= count <= MAX_POINTS_PER_BATCH:
        batch_violations.append(
            Violation(
                f"{root}.points", f"must hold 1 to {MAX_POINTS_PER_BATCH} points, not {count}"
            )
        )
    if count > MAX_POINTS_PER_BATCH:
        return GpsBatchVerdict(batch_violations, {}, [])
    point_violations: dict[int, list[Violation]] = {}
    valid_points: list[gps_pb2.GpsPoint] = []
    # The common case, a valid point, is decided by plain comparisons (NaN fails
    # every one of them, and an unset timestamp is before EARLIEST_TIME); only a
    # point that fails one is examined by _check_gps_point, which names its fields
    # and says why. A point the fast test refuses but the full check passes is
    # still valid: the fast test may be stricter, never more lenient.
    latest_ns = min(clock.happened_limit_ns, _LATEST_NS - 1)
    newest: gps_pb2.GpsPoint | None = None
    newest_ns = -1  # every valid instant is later (EARLIEST_TIME)
    for index, point in enumerate(batch.points):
        recorded_at = point.recorded_at
        nanos = recorded_at.nanos
        instant = recorded_at.seconds * _NS_PER_S + nanos
        lat = point.latitude
        lon = point.longitude
        if (
            0 <= nanos < _NS_PER_S
            and _EARLIEST_NS <= instant <= latest_ns
            and -90.0 <= lat <= 90.0
            and -180.0 <= lon <= 180.0
            and not (
                -NULL_ISLAND_TOLERANCE_DEG < lat < NULL_ISLAND_TOLERANCE_DEG
                and -NULL_ISLAND_TOLERANCE_DEG < lon < NULL_ISLAND_TOLERANCE_DEG
            )
            and 0.0 <= point.accuracy_m < math.inf
            and 0.0 <= point.speed_mps < math.inf
            and 0.0 <= point.heading_deg < 360.0
        ):
            valid_points.append(point)
            if instant > newest_ns:
                newest, newest_ns = point, instant
            continue
        found: list[Violation] = []
        _check_gps_point(found, f"{root}.points[{index}]", point, clock)
        if found:
            point_violations[index] = found
        else:
            valid_points.append(point)
            if instant > newest_ns:
                newest, newest_ns = point, instant
    if batch_violations:
        return GpsBatchVerdict(batch_violations, point_violations, [])
    return GpsBatchVerdict(batch_violations, point_violations, valid_points, newest)


# --- shipment events ------------------------------------------------------------------

_EVENT_KINDS = ", ".join(
    field.name for field in shipment_pb2.ShipmentEvent.DESCRIPTOR.oneofs_by_name["event"].fields
)


def _check_created(
    out: list[Violation], path: str, created: shipment_pb2.ShipmentCreated, clock: _Clock
) -> None:
    _check_id(out, f"{path}.customer_id", created.customer_id)
    if created.HasField("origin"):
        _check_latlng(out, f"{path}.origin", created.origin)
    else:
        out.append(Violation(f"{path}.origin", "is required"))
    if created.HasField("destination"):
        _check_latlng(out, f"{path}.destination", created.destination)
    else:
        out.append(Violation(f"{path}.destination", "is required"))
    window_path = f"{path}.promised_window"
    if created.HasField("promised_window"):
        window = created.promised_window
        start_ok = _check_timestamp(
            out, f"{window_path}.start", window.start, clock, happened=False
        )
        end_ok = _check_timestamp(out, f"{window_path}.end", window.end, clock, happened=False)
        start = (window.start.seconds, window.start.nanos)
        end = (window.end.seconds, window.end.nanos)
        if start_ok and end_ok and not start < end:
            out.append(Violation(window_path, "start must be before end"))
    else:
        out.append(Violation(window_path, "is required"))
    if created.planned_route:
        _check_polyline(out, f"{path}.planned_route", created.planned_route)
    _check_text(out, f"{path}.reference", created.reference)


def validate_shipment_event(
    event: shipment_pb2.ShipmentEvent,
    now: datetime,
    *,
    max_future_skew: timedelta = DEFAULT_MAX_FUTURE_SKEW,
    root: str = "event",
) -> list[Violation]:
    """Validate one lifecycle event as ``RecordEvent`` receives it; [] when valid.

    * ``event_id`` optional (the service mints one when empty), an id when given;
      ``shipment_id`` an id; ``occurred_at`` required, at most ``max_future_skew``
      after ``now``.
    * exactly one member of the ``event`` oneof set (reported as ``{root}.event``; an
      event type this build does not know arrives with none set).
    * ``created``: ``customer_id`` an id; ``origin`` and ``destination`` required,
      valid coordinates; ``promised_window`` required, ``start`` and ``end`` set,
      ``start < end`` (both may be in the future); ``planned_route`` optional, but when
      given a Google encoded polyline (precision 5) of >= 2 points; ``reference`` text.
    * ``vehicle_assigned``: ``vehicle_id`` an id; ``driver_id`` optional id.
    * ``delivery_failed``: ``reason`` required (a known value, not UNSPECIFIED — OTHER
      exists for the rest); ``note`` text; ``retry_at`` optional, may be in the future.
    * ``cancelled``: ``reason`` text. ``exception``: ``kind`` required, ``description`` text.
    * ``picked_up``, ``in_transit``, ``out_for_delivery``, ``delivered``: nothing more.

    For ``RecordEvents``, pass ``root=f"events[{i}]"``. ``now`` must be timezone-aware.
    """
    clock = _clock(now, max_future_skew)
    out: list[Violation] = []
    _check_id(out, f"{root}.event_id", event.event_id, required=False)
    _check_id(out, f"{root}.shipment_id", event.shipment_id)
    _check_timestamp(out, f"{root}.occurred_at", event.occurred_at, clock, happened=True)
    kind = event.WhichOneof("event")
    path = f"{root}.{kind}"
    if kind is None:
        out.append(Violation(f"{root}.event", f"must set exactly one of: {_EVENT_KINDS}"))
    elif kind == "created":
        _check_created(out, path, event.created, clock)
    elif kind == "vehicle_assigned":
        _check_id(out, f"{path}.vehicle_id", event.vehicle_assigned.vehicle_id)
        _check_id(out, f"{path}.driver_id", event.vehicle_assigned.driver_id, required=False)
    elif kind == "delivery_failed":
        failed = event.delivery_failed
        _check_enum(
            out,
            f"{path}.reason",
            failed.reason,
            shipment_pb2.DeliveryFailureReason.DESCRIPTOR,
            required=True,
        )
        _check_text(out, f"{path}.note", failed.note)
        _check_timestamp(
            out, f"{path}.retry_at", failed.retry_at, clock, happened=False, required=False
        )
    elif kind == "cancelled":
        _check_text(out, f"{path}.reason", event.cancelled.reason)
    elif kind == "exception":
        _check_enum(
            out,
            f"{path}.kind",
            event.exception.kind,
            shipment_pb2.ExceptionKind.DESCRIPTOR,
            required=True,
        )
        _check_text(out, f"{path}.description", event.exception.description)
    return out


# --- delivery confirmations -----------------------------------------------------------


def validate_delivery_confirmation(
    confirmation: delivery_pb2.DeliveryConfirmation,
    now: datetime,
    *,
    max_future_skew: timedelta = DEFAULT_MAX_FUTURE_SKEW,
    root: str = "confirmation",
) -> list[Violation]:
    """Validate one proof of delivery as ``ConfirmDelivery`` receives it; [] when valid.

    ``confirmation_id`` and ``shipment_id`` are ids; ``vehicle_id`` an optional id;
    ``confirmed_at`` required, at most ``max_future_skew`` after ``now``; ``location``
    optional, valid coordinates when set; ``method`` required; ``proof_sha256`` 64
    lower-case hex characters, required when ``method`` is SIGNATURE or PHOTO and
    checked whenever given; ``recipient_name`` and ``note`` text. ``now`` must be
    timezone-aware.
    """
    clock = _clock(now, max_future_skew)
    out: list[Violation] = []
    _check_id(out, f"{root}.confirmation_id", confirmation.confirmation_id)
    _check_id(out, f"{root}.shipment_id", confirmation.shipment_id)
    _check_id(out, f"{root}.vehicle_id", confirmation.vehicle_id, required=False)
    _check_text(out, f"{root}.recipient_name", confirmation.recipient_name)
    _check_timestamp(out, f"{root}.confirmed_at", confirmation.confirmed_at, clock, happened=True)
    if confirmation.HasField("location"):
        _check_latlng(out, f"{root}.location", confirmation.location)
    _check_enum(
        out,
        f"{root}.method",
        confirmation.method,
        delivery_pb2.ConfirmationMethod.DESCRIPTOR,
        required=True,
    )
    proof_path = f"{root}.proof_sha256"
    if confirmation.proof_sha256:
        if not _SHA256_HEX.fullmatch(confirmation.proof_sha256):
            out.append(Violation(proof_path, "must be 64 lower-case hexadecimal characters"))
    elif confirmation.method in _PROOF_METHODS:
        out.append(Violation(proof_path, "is required when method is SIGNATURE or PHOTO"))
    _check_text(out, f"{root}.note", confirmation.note)
    return out
