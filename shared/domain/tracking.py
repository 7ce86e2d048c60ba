"""The tracking projections as pure folds: ``apply(state, envelope) -> state``.

Two projections, each keyed by its aggregate (the Kafka record key):

* :class:`ShipmentState`, folded by :func:`apply` from the shipment-event and
  delivery-confirmation topics (both keyed by shipment id, co-partitioned, so one
  projector instance sees every record of a shipment);
* :class:`VehicleState`, folded by :func:`apply_gps` from the GPS topic (keyed by
  vehicle id).

Nothing here does I/O, reads a clock or raises for any content of a record: the
projector's shell loads a state, folds the records of a poll batch into it and writes it
back with the consumed offsets. Everything is a frozen dataclass of plain values, so
states compare with ``==`` and hash, and the same log always folds to an equal state.

Shipment lifecycle (the arrows of ``shipment.proto``), as decided here:

* **Forward skips are allowed**: reporting systems miss scans, so e.g. CREATED ->
  IN_TRANSIT is accepted. Repeating the current status (a second ``in_transit`` scan at
  a hub) is accepted without a status change. **Backward moves are anomalies**
  (``picked_up`` while OUT_FOR_DELIVERY), except leaving DELIVERY_FAILED for IN_TRANSIT
  or OUT_FOR_DELIVERY, which is how a failed delivery is retried.
* A **delivery outcome** (``delivered``, ``delivery_failed``, a delivery confirmation)
  needs the goods on board: PICKED_UP, IN_TRANSIT, OUT_FOR_DELIVERY or DELIVERY_FAILED.
  From CREATED or ASSIGNED it is an anomaly ("before the shipment was picked up").
  ``delivery_attempts`` counts the accepted outcomes: each ``delivery_failed`` and the
  successful delivery.
* ``vehicle_assigned`` is accepted in every state before DELIVERED/CANCELLED; it moves
  CREATED to ASSIGNED and otherwise only (re)assigns the vehicle.
* ``cancelled`` is accepted from every non-final state. DELIVERED and CANCELLED are final:
  a later lifecycle event is an anomaly, with two exceptions that are facts about the
  delivery itself: a delivery confirmation or ``delivered`` after DELIVERED (the driver's
  proof and the TMS's ``delivered`` come from different producers, on different topics,
  in either order) only adds to the timeline (a confirmation also attaches its proof,
  if the shipment has none yet).
* **Who may confirm** (issue 12, finding 1): a delivery confirmation that names a vehicle
  is applied only when that vehicle is the shipment's assigned vehicle at that point of
  the log; otherwise it is an anomaly and changes neither the status nor the proof.
  Once a shipment is final and holds a proof, that proof is never replaced: a further
  confirmation is an anomaly. The fold is the authority for both rules because it is
  the one place that knows the assignment exactly as of each record, identically on
  every replay and rebuild (the ingest service sees only the request).
* ``exception`` never changes the status and is accepted in every status once created
  (damage can be reported after delivery).
* **Before ``created``** (no state yet, or state None): events from other producers may
  overtake the TMS's ``created``. Such an event makes a placeholder state with status
  UNSPECIFIED, recording the event as an anomaly without applying its status. When
  ``created`` arrives it fills in the details and sets CREATED; the earlier anomalies
  stay, so operations can see what was not applied. A back-office confirmation (no
  vehicle) still attaches its proof, and its distance to the destination is checked
  once known; a driver's confirmation cannot match an assignment yet and is refused.
* An **anomaly** never raises: it adds an :class:`Anomaly` and a timeline entry with
  ``anomaly=True``, and leaves the status unchanged.
* **Duplicates** (an envelope whose ``event_id`` was applied) return the given state
  object itself. An envelope without an event id (the record decoder refuses those)
  cannot be deduplicated and is always applied.

The timeline is in **arrival order** (the order of the log), not sorted by event time:
the log order is the one order every replay reproduces, and it shows what the system
knew when. ``updated_at`` is the latest event time seen. Timeline ``detail`` texts never
name the vehicle, driver, customer or recipient, because the public tracking page
shows the timeline; the shipper's own free texts (cancellation reason, exception
description) are included as given.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import TypeAlias

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from shared.domain.geo import Fix, haversine_m
from shared.pb import common_pb2, delivery_pb2, envelope_pb2, gps_pb2, shipment_pb2

Status: TypeAlias = shipment_pb2.ShipmentStatus.ValueType
LatLon: TypeAlias = tuple[float, float]

UNSPECIFIED = shipment_pb2.SHIPMENT_STATUS_UNSPECIFIED
CREATED = shipment_pb2.SHIPMENT_STATUS_CREATED
ASSIGNED = shipment_pb2.SHIPMENT_STATUS_ASSIGNED
PICKED_UP = shipment_pb2.SHIPMENT_STATUS_PICKED_UP
IN_TRANSIT = shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT
OUT_FOR_DELIVERY = shipment_pb2.SHIPMENT_STATUS_OUT_FOR_DELIVERY
DELIVERED = shipment_pb2.SHIPMENT_STATUS_DELIVERED
DELIVERY_FAILED = shipment_pb2.SHIPMENT_STATUS_DELIVERY_FAILED
CANCELLED = shipment_pb2.SHIPMENT_STATUS_CANCELLED

#: A delivery confirmed farther than this from the destination is flagged as an anomaly.
MAX_CONFIRMATION_DISTANCE_M = 500.0
#: Characters of the public tracking token (22 base64url characters = 132 bits).
TRACKING_TOKEN_LENGTH = 22
#: Timeline kind of a delivery confirmation (the lifecycle events use their oneof name).
DELIVERY_CONFIRMED = "delivery_confirmed"

# Bounds on what one aggregate's state holds (issue 12, finding 6): a client that
# records events without end for one shipment, or streams from ever new device ids for
# one vehicle, must not grow a state (and the row the projector rewrites on every
# change) without limit. What happens at each bound is documented where it applies.
#: A timeline keeps its first TIMELINE_HEAD entries (how the shipment started) and its
#: last TIMELINE_TAIL (what happens now); entries in between are dropped, oldest first,
#: and counted in ShipmentState.timeline_dropped.
TIMELINE_HEAD = 20
TIMELINE_TAIL = 480
#: The most recent MAX_ANOMALIES anomalies are kept; older ones are counted in
#: ShipmentState.anomalies_dropped (each also has its timeline entry, within the bound).
MAX_ANOMALIES = 100
#: A vehicle remembers the batch sequence of at most this many devices, the most
#: recently written ones; see VehicleState.device_sequences for what forgetting means.
MAX_DEVICES_PER_VEHICLE = 16

FINAL = frozenset({DELIVERED, CANCELLED})
#: The goods are on board: a delivery outcome is possible.
HOLDING = frozenset({PICKED_UP, IN_TRANSIT, OUT_FOR_DELIVERY, DELIVERY_FAILED})
_OPEN = frozenset({CREATED, ASSIGNED}) | HOLDING
#: A vehicle carries the shipment, so live progress and ETA apply (read-model queries
#: pass it to SQL as a list; the projector's live tracking tests membership).
ACTIVE = frozenset({ASSIGNED, PICKED_UP, IN_TRANSIT, OUT_FOR_DELIVERY, DELIVERY_FAILED})
#: The goods are on board and the vehicle is expected to report (the stale scan).
MOVING = frozenset({PICKED_UP, IN_TRANSIT, OUT_FOR_DELIVERY})

#: For each status a lifecycle event moves to, the statuses it may be entered from.
ALLOWED_FROM: dict[Status, frozenset[Status]] = {
    PICKED_UP: frozenset({CREATED, ASSIGNED, PICKED_UP}),
    IN_TRANSIT: frozenset({CREATED, ASSIGNED, PICKED_UP, IN_TRANSIT, DELIVERY_FAILED}),
    OUT_FOR_DELIVERY: _OPEN,
    DELIVERED: HOLDING,
    DELIVERY_FAILED: HOLDING,
    CANCELLED: _OPEN,
}


# --- values -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Anomaly:
    """An event that made no sense when it arrived; recorded, never fatal."""

    event_id: str
    reason: str
    occurred_at: datetime | None


@dataclass(frozen=True)
class TimelineEntry:
    """One applied event, as the timeline shows it."""

    event_id: str
    #: The ShipmentEvent oneof name (``picked_up``, ...) or ``delivery_confirmed``.
    kind: str
    occurred_at: datetime | None
    recorded_at: datetime | None
    status_after: Status
    #: Human-readable; for an anomaly, its reasons. Never names vehicle, driver or people.
    detail: str
    anomaly: bool


@dataclass(frozen=True)
class Proof:
    """The proof of delivery, from the last delivery confirmation applied."""

    #: The envelope event id that carried it.
    event_id: str
    confirmation_id: str
    vehicle_id: str
    recipient_name: str
    confirmed_at: datetime | None
    location: LatLon | None
    method: delivery_pb2.ConfirmationMethod.ValueType
    proof_sha256: str
    note: str
    #: Great-circle distance to the destination, once both are known.
    distance_to_destination_m: float | None = None


@dataclass(frozen=True)
class ShipmentState:
    """One shipment, folded from its events. Build one only through :func:`apply`."""

    shipment_id: str
    tenant_id: str
    status: Status = UNSPECIFIED
    customer_id: str = ""
    origin: LatLon | None = None
    destination: LatLon | None = None
    #: (start, end), tz-aware UTC; None when not (yet) known.
    promised_window: tuple[datetime, datetime] | None = None
    #: Google encoded polyline, precision 5; "" when none.
    planned_route: str = ""
    reference: str = ""
    vehicle_id: str = ""
    driver_id: str = ""
    stop_sequence: int = 0
    created_event_id: str = ""
    #: See :func:`tracking_token`; "" until ``created`` is applied.
    tracking_token: str = ""
    #: Event time of ``created``.
    created_at: datetime | None = None
    #: Latest event time seen.
    updated_at: datetime | None = None
    #: Event time of the event that made it DELIVERED (for a confirmation, confirmed_at).
    delivered_at: datetime | None = None
    proof: Proof | None = None
    delivery_attempts: int = 0
    anomalies: tuple[Anomaly, ...] = ()
    timeline: tuple[TimelineEntry, ...] = ()
    applied_event_ids: frozenset[str] = frozenset()
    #: Timeline entries dropped at the bound (TIMELINE_HEAD / TIMELINE_TAIL).
    timeline_dropped: int = 0
    #: Anomalies dropped at the bound (MAX_ANOMALIES), the oldest first.
    anomalies_dropped: int = 0

    @property
    def is_created(self) -> bool:
        """True once ``created`` was applied (only ``created`` leaves UNSPECIFIED)."""
        return self.status != UNSPECIFIED


def tracking_token(tenant_id: str, shipment_id: str, created_event_id: str) -> str:
    """The fallback tracking token: 22 base64url characters of SHA-256(tenant, shipment, id).

    The shipment-events service mints a random token into every ``created`` event
    (``ShipmentCreated.tracking_token``) and the fold keeps it; this derivation is
    used only for a ``created`` record that carries none.

    Deterministic, so every replay and rebuild gives the same token, and the fold needs
    no secret. It is unguessable as long as the ``created`` event id is: that id never
    leaves the back office (no API returns it to the public), and it is a UUIDv7 when
    the shipment-events service mints it. A client that chooses guessable event ids
    ("evt-1") gets a guessable token; a keyed HMAC of (tenant, shipment) computed by the
    I/O shell would remove that dependence, at the price of a secret to manage.
    """
    material = "".join(
        f"{len(p)}:{p}" for p in ("tracking", tenant_id, shipment_id, created_event_id)
    )
    digest = hashlib.sha256(material.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:TRACKING_TOKEN_LENGTH]


# --- conversions (never raise) -----------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The range Timestamp.ToDatetime accepts (0001-01-01 to 9999-12-31).
_SECONDS_MIN, _SECONDS_MAX = -62_135_596_800, 253_402_300_799


def _representable(seconds: int, nanos: int) -> bool:
    """Whether a Timestamp's fields are set and within datetime's range."""
    return (seconds != 0 or nanos != 0) and (
        _SECONDS_MIN <= seconds <= _SECONDS_MAX and 0 <= nanos < 1_000_000_000
    )


def _dt(stamp: Timestamp) -> datetime | None:
    """``stamp.ToDatetime(tzinfo=UTC)``, None when unset or invalid; computed here
    because the library's version costs more than the rest of a GPS point's decoding."""
    seconds, nanos = stamp.seconds, stamp.nanos
    if not _representable(seconds, nanos):
        return None
    try:
        # Positional: timedelta's keyword form costs three times as much.
        return _EPOCH + timedelta(0, seconds, nanos // 1000)
    except OverflowError:
        return None


def _latlon(lat: float, lon: float) -> LatLon | None:
    if math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180:
        return (lat, lon)
    return None


def _latlng(value: common_pb2.LatLng) -> LatLon | None:
    return _latlon(value.latitude, value.longitude)


def _status_name(status: Status) -> str:
    try:
        name = shipment_pb2.ShipmentStatus.Name(status)
    except ValueError:
        return str(status)
    return name.removeprefix("SHIPMENT_STATUS_").lower().replace("_", " ")


def _enum_label(enum: EnumDescriptor, value: int, prefix: str) -> str | None:
    """A readable label ("recipient absent"); None for 0 or a number the enum lacks."""
    described = enum.values_by_number.get(value)
    if described is None or value == 0:
        return None
    return described.name.removeprefix(prefix).lower().replace("_", " ")


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


# --- the shipment fold --------------------------------------------------------------------


@dataclass(frozen=True)
class _Fact:
    event_id: str
    tenant_id: str
    occurred_at: datetime | None
    recorded_at: datetime | None


@dataclass(frozen=True)
class _Step:
    """The effect of one event, before the bookkeeping every event gets."""

    state: ShipmentState
    kind: str
    detail: str = ""
    #: Anomalies of this event.
    reasons: tuple[str, ...] = ()
    #: Anomalies of earlier events that this one revealed.
    revealed: tuple[Anomaly, ...] = ()


def _refusal(kind: str, status: Status, target: Status | None = None) -> str:
    if status == UNSPECIFIED:
        return f"{kind} before the shipment was created"
    if status in FINAL:
        return f"{kind} after the shipment was {_status_name(status)}"
    if target in (DELIVERED, DELIVERY_FAILED) and status in (CREATED, ASSIGNED):
        return f"{kind} before the shipment was picked up"
    return f"{kind} cannot follow status {_status_name(status)}"


def _far_from_destination(proof: Proof) -> str | None:
    distance = proof.distance_to_destination_m
    if distance is not None and distance > MAX_CONFIRMATION_DISTANCE_M:
        return f"delivery confirmed {distance:.0f} m from the destination"
    return None


def _with_distance(proof: Proof, destination: LatLon | None) -> Proof:
    if proof.location is None or destination is None:
        return proof
    distance = haversine_m(*proof.location, *destination)
    return replace(proof, distance_to_destination_m=distance)


Handler = Callable[[ShipmentState, _Fact, shipment_pb2.ShipmentEvent], _Step]


def _created(state: ShipmentState, fact: _Fact, event: shipment_pb2.ShipmentEvent) -> _Step:
    if state.is_created:
        return _Step(state, "created", reasons=("created again; the first creation stands",))
    created = event.created
    destination = _latlng(created.destination) if created.HasField("destination") else None
    window = None
    if created.HasField("promised_window"):
        start = _dt(created.promised_window.start)
        end = _dt(created.promised_window.end)
        window = (start, end) if start is not None and end is not None else None
    revealed: tuple[Anomaly, ...] = ()
    proof = state.proof
    if proof is not None:  # a confirmation overtook `created`: check it now
        proof = _with_distance(proof, destination)
        far = _far_from_destination(proof)
        if far is not None:
            revealed = (Anomaly(proof.event_id, far, proof.confirmed_at),)
    new = replace(
        state,
        status=CREATED,
        customer_id=created.customer_id,
        origin=_latlng(created.origin) if created.HasField("origin") else None,
        destination=destination,
        promised_window=window,
        planned_route=created.planned_route,
        reference=created.reference,
        created_event_id=fact.event_id,
        # Ingest mints a random token into the event; the derived one covers records
        # written before that (or by other producers).
        tracking_token=created.tracking_token
        or tracking_token(state.tenant_id, state.shipment_id, fact.event_id),
        created_at=fact.occurred_at,
        proof=proof,
    )
    return _Step(new, "created", "shipment created", revealed=revealed)


def _vehicle_assigned(
    state: ShipmentState, fact: _Fact, event: shipment_pb2.ShipmentEvent
) -> _Step:
    kind = "vehicle_assigned"
    if state.status in FINAL:
        return _Step(state, kind, reasons=(_refusal(kind, state.status),))
    assigned = event.vehicle_assigned
    again = bool(state.vehicle_id) and assigned.vehicle_id != state.vehicle_id
    detail = "vehicle reassigned" if again else "vehicle assigned"
    if assigned.stop_sequence:
        detail += f", stop {assigned.stop_sequence}"
    new = replace(
        state,
        status=ASSIGNED if state.status == CREATED else state.status,
        vehicle_id=assigned.vehicle_id,
        driver_id=assigned.driver_id,
        stop_sequence=assigned.stop_sequence,
    )
    return _Step(new, kind, detail)


def _move_to(target: Status, kind: str, detail: str) -> Handler:
    def handler(state: ShipmentState, fact: _Fact, event: shipment_pb2.ShipmentEvent) -> _Step:
        if state.status not in ALLOWED_FROM[target]:
            return _Step(state, kind, reasons=(_refusal(kind, state.status, target),))
        return _Step(replace(state, status=target), kind, detail)

    return handler


def _delivered(state: ShipmentState, fact: _Fact, event: shipment_pb2.ShipmentEvent) -> _Step:
    kind = "delivered"
    if state.status == DELIVERED:  # the other producer already reported it
        return _Step(state, kind, "delivered (already recorded)")
    if state.status not in ALLOWED_FROM[DELIVERED]:
        return _Step(state, kind, reasons=(_refusal(kind, state.status, DELIVERED),))
    new = replace(
        state,
        status=DELIVERED,
        delivered_at=fact.occurred_at,
        delivery_attempts=state.delivery_attempts + 1,
    )
    return _Step(new, kind, "delivered")


def _delivery_failed(state: ShipmentState, fact: _Fact, event: shipment_pb2.ShipmentEvent) -> _Step:
    kind = "delivery_failed"
    if state.status not in ALLOWED_FROM[DELIVERY_FAILED]:
        return _Step(state, kind, reasons=(_refusal(kind, state.status, DELIVERY_FAILED),))
    failed = event.delivery_failed
    reason = _enum_label(
        shipment_pb2.DeliveryFailureReason.DESCRIPTOR, failed.reason, "DELIVERY_FAILURE_REASON_"
    )
    detail = f"delivery failed: {reason}" if reason else "delivery failed"
    retry_at = _dt(failed.retry_at)
    if retry_at is not None:
        detail += f"; next attempt {retry_at.isoformat()}"
    new = replace(state, status=DELIVERY_FAILED, delivery_attempts=state.delivery_attempts + 1)
    return _Step(new, kind, detail)


def _cancelled(state: ShipmentState, fact: _Fact, event: shipment_pb2.ShipmentEvent) -> _Step:
    kind = "cancelled"
    if state.status not in ALLOWED_FROM[CANCELLED]:
        return _Step(state, kind, reasons=(_refusal(kind, state.status, CANCELLED),))
    reason = event.cancelled.reason
    return _Step(
        replace(state, status=CANCELLED), kind, f"cancelled: {reason}" if reason else "cancelled"
    )


def _exception(state: ShipmentState, fact: _Fact, event: shipment_pb2.ShipmentEvent) -> _Step:
    exception = event.exception
    label = _enum_label(shipment_pb2.ExceptionKind.DESCRIPTOR, exception.kind, "EXCEPTION_KIND_")
    detail = f"exception: {label}" if label else "exception"
    if exception.description:
        detail += f": {exception.description}"
    return _Step(state, "exception", detail)


#: Dispatch on the ShipmentEvent's oneof member name (see :func:`apply` for why).
HANDLERS: dict[str, Handler] = {
    "created": _created,
    "vehicle_assigned": _vehicle_assigned,
    "picked_up": _move_to(PICKED_UP, "picked_up", "picked up"),
    "in_transit": _move_to(IN_TRANSIT, "in_transit", "in transit"),
    "out_for_delivery": _move_to(OUT_FOR_DELIVERY, "out_for_delivery", "out for delivery"),
    "delivered": _delivered,
    "delivery_failed": _delivery_failed,
    "cancelled": _cancelled,
    "exception": _exception,
}


def _shipment_event(state: ShipmentState, fact: _Fact, event: shipment_pb2.ShipmentEvent) -> _Step:
    kind = event.WhichOneof("event")
    handler = HANDLERS.get(kind) if kind is not None else None
    if kind is None or handler is None:
        return _Step(
            state, kind or "unknown", reasons=("an event type this version does not know",)
        )
    if kind != "created" and not state.is_created:
        return _Step(state, kind, reasons=(_refusal(kind, state.status),))
    return handler(state, fact, event)


#: Anomaly reasons of the confirmations the fold refuses to apply (see _unauthorised_confirmation).
NOT_ASSIGNED_VEHICLE = "delivery confirmed by a vehicle the shipment is not assigned to"
PROOF_ALREADY_SETTLED = "delivery confirmed again; the proof already recorded stands"


def _unauthorised_confirmation(
    state: ShipmentState, confirmation: delivery_pb2.DeliveryConfirmation
) -> str | None:
    """Why a confirmation must not touch the state, or None when it may.

    * It names a vehicle that is not the shipment's assigned vehicle at this point of
      the log (including: no vehicle assigned yet, or the shipment not created yet).
      A confirmation without a vehicle comes from the back office: the
      delivery-confirmations service refuses a driver's confirmation that names no
      vehicle or another vehicle than its token's, so only ops can write one.
    * The shipment is final (delivered or cancelled) and already holds a proof: the
      first proof stands, a later one never replaces it.
    """
    if confirmation.vehicle_id and confirmation.vehicle_id != state.vehicle_id:
        return NOT_ASSIGNED_VEHICLE
    if state.status in FINAL and state.proof is not None:
        return PROOF_ALREADY_SETTLED
    return None


def _confirmation(
    state: ShipmentState, fact: _Fact, confirmation: delivery_pb2.DeliveryConfirmation
) -> _Step:
    kind = DELIVERY_CONFIRMED
    location = _latlng(confirmation.location) if confirmation.HasField("location") else None
    proof = Proof(
        event_id=fact.event_id,
        confirmation_id=confirmation.confirmation_id,
        vehicle_id=confirmation.vehicle_id,
        recipient_name=confirmation.recipient_name,
        confirmed_at=_dt(confirmation.confirmed_at),
        location=location,
        method=confirmation.method,
        proof_sha256=confirmation.proof_sha256,
        note=confirmation.note,
    )
    proof = _with_distance(proof, state.destination)
    method = _enum_label(
        delivery_pb2.ConfirmationMethod.DESCRIPTOR, confirmation.method, "CONFIRMATION_METHOD_"
    )
    detail = f"delivery confirmed: {method}" if method else "delivery confirmed"
    refused = _unauthorised_confirmation(state, confirmation)
    if refused is not None:
        # Not the assigned vehicle, or the proof is already settled: recorded, not applied.
        return _Step(state, kind, detail, reasons=(refused,))
    reasons: list[str] = []
    # The proof is evidence, so it is attached even when the transition is refused.
    new = replace(state, proof=proof)
    if state.status == DELIVERED:
        pass  # the `delivered` event came first: attach the proof only
    elif state.status in ALLOWED_FROM[DELIVERED]:
        new = replace(
            new,
            status=DELIVERED,
            delivered_at=proof.confirmed_at or fact.occurred_at,
            delivery_attempts=state.delivery_attempts + 1,
        )
    else:
        reasons.append(_refusal(kind, state.status, DELIVERED))
    far = _far_from_destination(proof)
    if far is not None:
        reasons.append(far)
    return _Step(new, kind, detail, reasons=tuple(reasons))


def _record(step: _Step, fact: _Fact) -> ShipmentState:
    """The bookkeeping of every applied event: timeline, anomalies, event id, updated_at."""
    state = step.state
    own = tuple(Anomaly(fact.event_id, reason, fact.occurred_at) for reason in step.reasons)
    detail = "; ".join(part for part in (step.detail, *step.reasons) if part)
    entry = TimelineEntry(
        event_id=fact.event_id,
        kind=step.kind,
        occurred_at=fact.occurred_at,
        recorded_at=fact.recorded_at,
        status_after=state.status,
        detail=detail,
        anomaly=bool(step.reasons),
    )
    applied = state.applied_event_ids
    if fact.event_id:
        applied = applied | {fact.event_id}
    timeline = (*state.timeline, entry)
    timeline_dropped = state.timeline_dropped
    excess = len(timeline) - (TIMELINE_HEAD + TIMELINE_TAIL)
    if excess > 0:  # keep the head, drop the oldest entries after it
        timeline = timeline[:TIMELINE_HEAD] + timeline[TIMELINE_HEAD + excess :]
        timeline_dropped += excess
    anomalies = state.anomalies + own + step.revealed
    anomalies_dropped = state.anomalies_dropped
    if len(anomalies) > MAX_ANOMALIES:
        anomalies_dropped += len(anomalies) - MAX_ANOMALIES
        anomalies = anomalies[-MAX_ANOMALIES:]
    return replace(
        state,
        anomalies=anomalies,
        timeline=timeline,
        applied_event_ids=applied,
        updated_at=_latest(state.updated_at, fact.occurred_at),
        timeline_dropped=timeline_dropped,
        anomalies_dropped=anomalies_dropped,
    )


def apply(state: ShipmentState | None, envelope: envelope_pb2.Envelope) -> ShipmentState | None:
    """Fold one record into a shipment's state; never raises.

    ``state`` is the current state of the shipment the payload names (None if there is
    none yet). Handles ``shipment_event`` and ``delivery_confirmation`` payloads; any
    other payload returns ``state`` unchanged (so the result is None only when ``state``
    was None and the payload is not a shipment payload). A duplicate (an applied
    ``event_id``) returns ``state`` itself. Semantics: see the module docstring.

    The event time is the envelope's ``occurred_at``, else the payload's own
    (``occurred_at`` / ``confirmed_at``); None when neither is set or valid.

    An envelope whose tenant differs from the state's, or whose payload names another
    shipment than the state, is not applied but recorded as an anomaly (the shell
    should key states by (tenant, shipment id), which makes this impossible).

    Dispatch is a dict keyed by the oneof member name (``WhichOneof``), not
    ``functools.singledispatch`` on message classes: the oneof name is the wire-level
    discriminator, so "no member set" and "a member this build does not know" are the
    same ``None`` case handled in one place; the table is data, checked by a test
    against the ``ShipmentEvent`` descriptor so a new member cannot be forgotten; and
    several members share one parameterised handler (the plain status moves).
    """
    payload = envelope.WhichOneof("payload")
    kind: str
    if payload == "shipment_event":
        shipment_id = envelope.shipment_event.shipment_id
        payload_time = envelope.shipment_event.occurred_at
        kind = envelope.shipment_event.WhichOneof("event") or "unknown"
    elif payload == "delivery_confirmation":
        shipment_id = envelope.delivery_confirmation.shipment_id
        payload_time = envelope.delivery_confirmation.confirmed_at
        kind = DELIVERY_CONFIRMED
    else:
        return state
    if state is not None and envelope.event_id and envelope.event_id in state.applied_event_ids:
        return state
    fact = _Fact(
        event_id=envelope.event_id,
        tenant_id=envelope.tenant_id,
        occurred_at=_dt(envelope.occurred_at) or _dt(payload_time),
        recorded_at=_dt(envelope.recorded_at),
    )
    current = state or ShipmentState(shipment_id=shipment_id, tenant_id=envelope.tenant_id)
    if current.tenant_id != fact.tenant_id:
        step = _Step(current, kind, reasons=("an event of another tenant was ignored",))
    elif current.shipment_id != shipment_id:
        step = _Step(current, kind, reasons=("an event of another shipment was ignored",))
    elif payload == "shipment_event":
        step = _shipment_event(current, fact, envelope.shipment_event)
    else:
        step = _confirmation(current, fact, envelope.delivery_confirmation)
    return _record(step, fact)


# --- the vehicle fold ------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseFilter:
    """Which newer points may move a vehicle's last position (all points go to history).

    * A point with ``accuracy_m`` above ``max_accuracy_m`` never moves it.
    * A point whose implied speed from the last position exceeds
      ``max_implied_speed_mps`` is a jump and does not move it. The implied speed is
      (distance - both accuracy radii) / max(elapsed, 1 s): the radii absorb honest GPS
      error, the 1 s floor sub-second fixes.
    * Unless the jump is real: ``jump_confirmations`` consecutive jump points that are
      plausible from one another (same speed rule) move the vehicle to the newest of
      them. Without this, one wild first fix would pin the vehicle forever.
    """

    max_implied_speed_mps: float = 70.0
    max_accuracy_m: float = 200.0
    jump_confirmations: int = 3


DEFAULT_NOISE_FILTER = NoiseFilter()
#: Every newer point moves the vehicle (tests, replays of trusted data).
NO_NOISE_FILTER = NoiseFilter(math.inf, math.inf, 1)


@dataclass(frozen=True)
class VehicleState:
    """One vehicle, folded from its GPS batches. Build one only through :func:`apply_gps`."""

    vehicle_id: str
    tenant_id: str
    #: The newest accepted fix by event time; None before the first one.
    last_position: Fix | None = None
    #: (device id, highest batch sequence applied), least recently written first; at
    #: most MAX_DEVICES_PER_VEHICLE. A batch from one device more evicts the least
    #: recently written device: if that device ever streams again, its sequence starts
    #: from 0 (a resend of one of its old batches would then add its points to the
    #: history a second time; its motion is still filtered as any point's). The
    #: latest position is unaffected. `evicted_devices` counts evictions.
    device_sequences: tuple[tuple[str, int], ...] = ()
    evicted_devices: int = 0
    #: The newest point of a pending jump (see NoiseFilter) and how many confirm it.
    jump_candidate: Fix | None = None
    jump_streak: int = 0

    def sequence_of(self, device_id: str) -> int:
        """The highest batch sequence applied for the device; 0 if none."""
        for device, sequence in self.device_sequences:
            if device == device_id:
                return sequence
        return 0


def gps_positions(batch: gps_pb2.GpsBatch) -> list[Fix]:
    """The batch's usable points as fixes, in batch order: one :class:`Fix` per point,
    which the fold's motion, the history rows and the projector's track cache share.

    A point is skipped when ingest would have refused it structurally: unset or
    unrepresentable ``recorded_at``, non-finite or out-of-range coordinates, (0, 0),
    non-finite or negative speed/heading/accuracy. (Ingest validates before producing,
    so this only guards the fold against foreign or old records; skipping also keeps
    NaN, which is unequal to itself, out of states that must compare equal.) A speed,
    heading or accuracy of 0 is unknown on the wire (gps.proto): ``None`` in the fix.
    """
    positions: list[Fix] = []
    trusted = Fix.trusted
    isfinite = math.isfinite
    for point in batch.points:
        stamp = point.recorded_at
        seconds, nanos = stamp.seconds, stamp.nanos
        where = _latlon(point.latitude, point.longitude)
        if not _representable(seconds, nanos) or where is None or where == (0.0, 0.0):
            continue
        speed, heading, accuracy = point.speed_mps, point.heading_deg, point.accuracy_m
        # Written out (not all(... for x in ...)): this runs for every point the
        # projector folds, and the generator cost as much as the checks.
        if not (
            isfinite(speed)
            and speed >= 0.0
            and isfinite(heading)
            and heading >= 0.0
            and isfinite(accuracy)
            and accuracy >= 0.0
        ):
            continue
        # _dt's conversion, with the epoch seconds from the same integers: exactly
        # what `recorded_at.timestamp()` gives (one correctly rounded division of the
        # microseconds), at a fifth of its cost.
        micros = nanos // 1000
        recorded_at = _EPOCH + timedelta(0, seconds, micros)
        # Checked above as Fix's constructor would: built without checking again.
        positions.append(
            trusted(
                recorded_at,
                where[0],
                where[1],
                speed or None,
                heading or None,
                accuracy or None,
                t=(seconds * 1_000_000 + micros) / 1_000_000,
            )
        )
    return positions


def is_duplicate_gps(state: VehicleState | None, envelope: envelope_pb2.Envelope) -> bool:
    """True when the batch's sequence is not above its device's highest applied sequence.

    Why a sequence at or below the highest is always a resend, never new data: ingest
    handles the batches of a stream in order, acknowledges each only after Kafka did,
    and ends the stream when a produce fails, so a later batch is never written after an
    earlier one failed; the client resends unacknowledged batches in their order; and
    the topic is keyed by vehicle, so one partition holds a device's batches in the
    order they were written. Per device the log therefore holds increasing sequences,
    with only resends repeating earlier ones. (This needs one active stream per device
    and a device that keeps its counter; see the lead's report.)
    """
    batch = envelope.gps_batch
    highest = state.sequence_of(batch.device_id) if state is not None else 0
    return batch.sequence <= highest


def accepted_history_points(
    state_before: VehicleState | None, envelope: envelope_pb2.Envelope
) -> list[Fix]:
    """The positions the shell should append to history for this record: [] for a duplicate."""
    if envelope.WhichOneof("payload") != "gps_batch" or is_duplicate_gps(state_before, envelope):
        return []
    return gps_positions(envelope.gps_batch)


def _implied_speed(a: Fix, b: Fix) -> float:
    elapsed = max((b.at - a.at).total_seconds(), 1.0)
    # An unknown accuracy radius absorbs nothing.
    radii = (a.accuracy_m or 0.0) + (b.accuracy_m or 0.0)
    distance = haversine_m(a.lat, a.lon, b.lat, b.lon) - radii
    return max(distance, 0.0) / elapsed


#: (last_position, jump_candidate, jump_streak): the part of a VehicleState a point moves.
_Motion = tuple[Fix | None, Fix | None, int]


def _advance(motion: _Motion, point: Fix, noise: NoiseFilter) -> _Motion:
    last, candidate, streak = motion
    if last is not None and point.at <= last.at:
        return motion  # older: history only, never moves the vehicle back
    if point.accuracy_m is not None and point.accuracy_m > noise.max_accuracy_m:
        return motion
    if last is None or _implied_speed(last, point) <= noise.max_implied_speed_mps:
        return point, None, 0
    if (
        candidate is not None
        and point.at > candidate.at
        and _implied_speed(candidate, point) <= noise.max_implied_speed_mps
    ):
        streak += 1
    else:
        streak = 1
    if streak >= noise.jump_confirmations:
        return point, None, 0
    return last, point, streak


def apply_gps(
    state: VehicleState | None,
    envelope: envelope_pb2.Envelope,
    noise: NoiseFilter = DEFAULT_NOISE_FILTER,
) -> VehicleState:
    """Fold one GPS batch record into its vehicle's state.

    A duplicate (see :func:`is_duplicate_gps`) returns ``state`` itself (or an empty
    state for the batch's vehicle when ``state`` is None). Otherwise the device's
    sequence is recorded and the batch's usable points (:func:`gps_positions`), taken in
    event-time order, may move ``last_position``: only a point newer than the current
    one, and only through the :class:`NoiseFilter`. An older point never moves the
    vehicle back. Never raises for any batch content; raises ``ValueError`` when the
    envelope holds no GPS batch (the shell routes records by schema type).
    """
    return fold_gps(state, envelope, noise)[0]


_EVENT_TIME = attrgetter("t")


def fold_gps(
    state: VehicleState | None,
    envelope: envelope_pb2.Envelope,
    noise: NoiseFilter = DEFAULT_NOISE_FILTER,
) -> tuple[VehicleState, list[Fix]]:
    """``(apply_gps(state, envelope), accepted_history_points(state, envelope))`` with the
    batch's points decoded once (the projector needs both for every GPS record)."""
    if envelope.WhichOneof("payload") != "gps_batch":
        raise ValueError("apply_gps needs an envelope with a gps_batch payload")
    batch = envelope.gps_batch
    current = state or VehicleState(vehicle_id=batch.vehicle_id, tenant_id=envelope.tenant_id)
    if is_duplicate_gps(state, envelope):
        return current, []
    positions = gps_positions(batch)
    # The device moves to the end (most recently written); the first ones beyond the
    # bound are forgotten.
    sequences = [entry for entry in current.device_sequences if entry[0] != batch.device_id]
    sequences.append((batch.device_id, batch.sequence))
    evicted = max(0, len(sequences) - MAX_DEVICES_PER_VEHICLE)
    current = replace(
        current,
        device_sequences=tuple(sequences[evicted:]),
        evicted_devices=current.evicted_devices + evicted,
    )
    # Fold the points' motion as a plain tuple, then build the state once (not once
    # per point): the same result, without a dataclass copy per point.
    before: _Motion = (current.last_position, current.jump_candidate, current.jump_streak)
    motion = before
    for point in sorted(positions, key=_EVENT_TIME):
        motion = _advance(motion, point, noise)
    if motion is not before:
        last, candidate, streak = motion
        current = replace(current, last_position=last, jump_candidate=candidate, jump_streak=streak)
    return current, positions
