"""The projector's live-tracking decisions, pure: stored row + track → new row + alerts.

`decide` takes one active shipment, what its tracking row held (StoredTracking),
its vehicle's newest position and recent track (track_cache.VehicleTrack), the
tenant's speed model and the `Policy`, and returns the shipment's new tracking row,
the ETAs to keep in eta_history, the alerts it raised and whether it arrived. No
I/O: services/projector/live.py loads the inputs, calls this, and writes the result
in the projection's transaction. The rules it follows are in live.py's docstring;
tests/unit/test_live_decide.py checks them, among them that the alerts do not
depend on how the GPS records were cut into batches.

Imports no Kafka, asyncpg or grpc (tests/unit/test_live_decide.py checks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from shared.domain import alerts
from shared.domain.alerts import AlertConditions, AlertDecision
from shared.domain.eta import (
    DelayMargins,
    EtaEstimate,
    EtaMethod,
    EtaModel,
    classify_delay,
    late_probability,
)
from shared.domain.eta_accuracy import geofence_arrival
from shared.domain.geo import Fix, Route, TrackMemo, haversine_m, route_from_polyline
from shared.domain.tracking import ACTIVE, ShipmentState
from shared.envelopes import timestamp
from shared.pb import alerts_pb2, common_pb2
from shared.readmodel.messages import eta_message
from shared.readmodel.rows import (
    Cursor,
    EtaHistoryRow,
    EtaRow,
    Progress,
    StoredTracking,
    TrackingRow,
)

#: EtaEstimate.method as the common_pb2.EtaMethod value stored and shown.
ETA_METHODS = {EtaMethod.ROUTE: 1, EtaMethod.GREAT_CIRCLE: 2}

#: At most one debouncer observation per shipment per this much event time.
OBSERVE_EVERY_S = 30.0

#: Look for a geofence arrival only while the vehicle is this close to the destination
#: (the geofence's exit radius: an arrival confirmed in this batch ends inside it).
ARRIVAL_NEAR_M = 200.0

#: For a shipment whose activation time is unknown: observe every record.
_LONG_AGO = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Policy:
    """The settings every decision of a batch shares."""

    margins: DelayMargins
    #: At most one observation per this much event time.
    observe_every: timedelta
    #: How far back from an instant the ETA looks at fixes (the default model's window).
    window_s: float


class Track(Protocol):
    """What `decide` reads of a vehicle's recent track (track_cache.VehicleTrack)."""

    @property
    def records(self) -> Sequence[datetime]:
        """Event time of each GPS record: its newest fix. Sorted, distinct."""

    @property
    def fixes(self) -> Sequence[Fix]:
        """The fixes, in time order."""

    def up_to(self, moment: datetime, window_s: float) -> list[Fix]:
        """The fixes in (moment - window_s, moment]."""

    def at(self, moment: datetime) -> tuple[float, float] | None:
        """Where the newest fix at or before `moment` was."""

    @property
    def memo(self) -> TrackMemo:
        """What the ETA model worked out about these fix objects, kept between calls."""


@dataclass(frozen=True)
class PendingAlert:
    """An alert decided in this transaction, with what to publish alongside it."""

    shipment: ShipmentState
    decision: AlertDecision
    #: The ETA the decision rests on, if any.
    eta: EtaRow | None = None
    #: Where the vehicle was, (lat, lon); None: look up the vehicle's last position.
    location: tuple[float, float] | None = None
    #: Event time of the input that revealed the change; None: the shipment's update time.
    detected_at: datetime | None = None


@dataclass(frozen=True)
class Decision:
    """What `decide` concluded for one shipment."""

    row: TrackingRow
    #: ETAs for eta_history, in the order they were computed.
    history: tuple[EtaHistoryRow, ...]
    alerts: tuple[PendingAlert, ...]
    #: When the vehicle arrived at the destination (geofence), if this batch shows it.
    arrived_at: datetime | None
    #: The earliest instant the shipment's next batch needs its vehicle's track from.
    horizon: datetime


def eta_row(estimate: EtaEstimate, now: datetime) -> EtaRow:
    """The stored ETA of an estimate computed at event time `now`: what the API shows
    (shared.readmodel.messages.eta_message) plus the model's full estimate, with the
    version of the speed model that produced it (0: no learned version)."""
    return EtaRow(
        model_version=estimate.model_version,
        estimated_arrival=estimate.arrival,
        earliest=estimate.earliest,
        latest=estimate.latest,
        confidence=estimate.confidence,
        method=ETA_METHODS[estimate.method],
        remaining_m=estimate.remaining_m,
        position_age_s=estimate.position_age_s,
        computed_at=now,
        model=estimate,
    )


def history_row(shipment: ShipmentState, estimate: EtaEstimate, now: datetime) -> EtaHistoryRow:
    return EtaHistoryRow(
        shipment.tenant_id,
        shipment.shipment_id,
        estimate.position_at,
        now,
        estimate.arrival,
        estimate.remaining_m,
        ETA_METHODS[estimate.method],
        estimate.model_version,
    )


def route_of(shipment: ShipmentState) -> Route | None:
    """The shipment's planned route; None without one (or with one that does not parse:
    validated at ingest, so only an old or foreign record, which falls back to the
    great circle)."""
    if not shipment.planned_route:
        return None
    try:
        return route_from_polyline(shipment.planned_route)
    except ValueError:
        return None


def active_since(shipment: ShipmentState) -> datetime:
    """Event time at which the shipment first entered an active status.

    Records before it are never observed for the shipment: live, they were
    projected while it had no vehicle. Falls back to the creation time, then to
    "always" for a foreign record without times.
    """
    for entry in shipment.timeline:
        if entry.status_after in ACTIVE and not entry.anomaly:
            moment = entry.occurred_at or entry.recorded_at
            if moment is not None:
                return moment
    return shipment.created_at or _LONG_AGO


def due(
    records: Sequence[datetime],
    observed_at: datetime | None,
    start: datetime,
    observe_every: timedelta,
) -> list[datetime]:
    """The record instants to observe, in time order: at or after `start`, after the
    last observation (`observed_at`), at most one per `observe_every`."""
    chosen = []
    last = observed_at
    for moment in records:
        if moment < start:
            continue
        if last is not None and (moment <= last or moment < last + observe_every):
            continue
        chosen.append(moment)
        last = moment
    return chosen


def needed_from(
    shipment: ShipmentState, stored: StoredTracking | None, newest: datetime
) -> datetime:
    """The earliest instant of its vehicle's track the shipment's decision reads: its
    next observation, or the newest position (for the ETA shown)."""
    first = stored.cursor.observed_at if stored and stored.cursor else None
    return min(first or active_since(shipment), newest)


def observe(
    shipment: ShipmentState,
    conditions: AlertConditions,
    estimate: EtaEstimate,
    margins: DelayMargins,
) -> tuple[AlertConditions, list[AlertDecision]]:
    """Feed one observation to the debouncer: the delay against the promised window
    (if any) and, with a planned route, whether the vehicle is off it."""
    fired: list[AlertDecision] = []
    tenant_id, shipment_id = shipment.tenant_id, shipment.shipment_id
    if shipment.promised_window is not None:
        end = shipment.promised_window[1]
        condition = classify_delay(estimate, end, margins)
        late_by = (estimate.arrival - end).total_seconds() / 60
        chance = late_probability(estimate, end, margins.interval_coverage)
        detail = (
            f"ETA {estimate.arrival:%H:%M} UTC, {late_by:+.0f} min vs window end,"
            f" {chance:.0%} chance of arriving after it"
        )
        conditions, decided = alerts.observe_delay(
            conditions, condition, tenant_id=tenant_id, shipment_id=shipment_id, detail=detail
        )
        fired.extend(decided)
    if shipment.planned_route:
        conditions, decided = alerts.observe_route(
            conditions,
            estimate.off_route,
            tenant_id=tenant_id,
            shipment_id=shipment_id,
            offset_m=estimate.offset_m or 0.0,
        )
        fired.extend(decided)
    return conditions, fired


def failed_deliveries(shipment: ShipmentState) -> Iterator[PendingAlert]:
    """A DELIVERY_FAILED alert per failed attempt in the timeline (ids per attempt, so
    deciding them again on every change of the shipment adds nothing)."""
    attempt = 0
    for entry in shipment.timeline:
        if entry.kind == "delivery_failed" and not entry.anomaly:
            attempt += 1
            decision = alerts.delivery_failed(
                shipment.tenant_id, shipment.shipment_id, attempt, entry.detail
            )
            yield PendingAlert(shipment, decision, detected_at=entry.occurred_at)


def arrival(shipment: ShipmentState, track: Track, position: Fix) -> datetime | None:
    """When the vehicle, now near the destination, entered its geofence and stayed
    (eta_accuracy.geofence_arrival), counting fixes since the shipment became active."""
    destination = shipment.destination
    assert destination is not None
    if haversine_m(position.lat, position.lon, *destination) > ARRIVAL_NEAR_M:
        return None  # not there now: nothing to look for (the usual case, and cheap)
    start = active_since(shipment)
    return geofence_arrival(destination, (f for f in track.fixes if f.at >= start))


def decide(
    shipment: ShipmentState,
    stored: StoredTracking | None,
    position: Fix,
    track: Track | None,
    model: EtaModel,
    policy: Policy,
) -> Decision:
    """One active shipment's new tracking row, ETA history and alerts.

    `position` is its vehicle's newest position; `track` the vehicle's fixes from
    `needed_from(...)` minus the window on (None: none). Observations (what the
    debouncer sees) are the due records after the stored cursor; the ETA shown is
    the one at `position`, never fed to the debouncer.
    """
    destination = shipment.destination
    assert destination is not None
    conditions = stored.conditions if stored else AlertConditions()
    cursor = stored.cursor if stored else None
    observed_at = cursor.observed_at if cursor else None
    chain = cursor.observed if cursor else None
    route = route_of(shipment)
    window_s = policy.window_s
    history: list[EtaHistoryRow] = []
    pending: list[PendingAlert] = []

    def estimate_at(
        moment: datetime, previous: EtaEstimate | None, fixes: list[Fix]
    ) -> EtaEstimate | None:
        assert track is not None
        return model.estimate(
            now=moment,
            destination=destination,
            positions=fixes,
            route=route,
            previous=previous,
            memo=track.memo,
        )

    # Observations: what the debouncer sees, independent of batching.
    if track is not None:
        for moment in due(track.records, observed_at, active_since(shipment), policy.observe_every):
            estimate = estimate_at(moment, chain, track.up_to(moment, window_s))
            observed_at = moment
            if estimate is None:
                continue
            chain = estimate
            history.append(history_row(shipment, estimate, moment))
            conditions, fired = observe(shipment, conditions, estimate, policy.margins)
            if fired:
                basis = eta_row(estimate, moment)
                pending.extend(
                    PendingAlert(shipment, d, basis, track.at(moment), moment) for d in fired
                )

    # The ETA shown: at the vehicle's newest position.
    now = position.at
    shown: EtaEstimate | None = None
    if chain is not None and observed_at == now:
        shown = chain
    elif track is not None:
        previous = chain or (stored.eta.model if stored and stored.eta else None)
        fixes = track.up_to(now, window_s)
        shown = estimate_at(now, previous, fixes) if fixes else None
        if shown is not None:
            history.append(history_row(shipment, shown, now))
    eta = eta_row(shown, now) if shown is not None else None
    progress = None
    if shown is not None:
        progress = Progress(
            route_length_m=route.length_m if route else 0.0,
            travelled_m=shown.distance_along_m or 0.0,
            remaining_m=shown.remaining_m,
            on_route=route is not None and not shown.off_route,
            off_route_m=shown.offset_m or 0.0,
        )
    row = TrackingRow(
        shipment.tenant_id,
        shipment.shipment_id,
        shipment.vehicle_id,
        position,
        progress,
        eta,
        conditions,
        Cursor(observed_at, chain) if eta is not None and observed_at is not None else None,
    )
    return Decision(
        row,
        tuple(history),
        tuple(pending),
        arrival(shipment, track, position) if track is not None else None,
        min(observed_at or now, now),
    )


def alert_message(pending: PendingAlert) -> alerts_pb2.Alert:
    """The Alert published for a decision (location filled in by write_alerts if unknown)."""
    shipment, decision, eta = pending.shipment, pending.decision, pending.eta
    alert = alerts_pb2.Alert(
        alert_id=decision.alert_id,
        shipment_id=shipment.shipment_id,
        vehicle_id=shipment.vehicle_id,
        kind=int(decision.kind),  # type: ignore[arg-type]
        severity=int(decision.severity),  # type: ignore[arg-type]
        message=decision.message,
        customer_id=shipment.customer_id,
    )
    if shipment.promised_window:
        alert.promised_window.start.CopyFrom(timestamp(shipment.promised_window[0]))
        alert.promised_window.end.CopyFrom(timestamp(shipment.promised_window[1]))
        if eta is not None and eta.estimated_arrival is not None:
            delay = max(eta.estimated_arrival - shipment.promised_window[1], timedelta(0))
            alert.expected_delay.FromTimedelta(delay)
    if eta is not None:
        alert.eta.CopyFrom(eta_message(eta))
    detected_at = pending.detected_at
    if detected_at is None and eta is not None:
        detected_at = eta.computed_at
    if detected_at is None:
        detected_at = shipment.updated_at
    if detected_at is not None:
        alert.detected_at.CopyFrom(timestamp(detected_at))
    if pending.location is not None:
        alert.last_location.CopyFrom(
            common_pb2.LatLng(latitude=pending.location[0], longitude=pending.location[1])
        )
    return alert
