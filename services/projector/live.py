"""Live tracking of active shipments: progress, ETA and debounced alerts.

Runs inside the projection's transaction, after the folds. For every vehicle
that moved in the batch (and every shipment that just got a vehicle or a failed
delivery), it recomputes the progress and ETA of the shipments travelling with
the vehicle, keeps the ETA history, and writes the alerts it decides into the
alert outbox.

Alert decisions never depend on how the log was cut into poll batches, so a
replay (a restart, a rebuild, a fresh projector) decides exactly the same alerts
with the same ids:

* Clocks are event times (GPS fix times), never the wall clock.
* The debouncer is fed *observations*: the ETA at the newest fix of each GPS
  record (one Kafka record = one uploaded batch) of the vehicle, taken in event
  time order, at most one per `observe_every_s` of event time, and only for
  records at or after the shipment became active (its first assignment). Which
  records qualify is read from the position history, so a projector that gets
  twenty records in one poll observes the same twenty instants as one that gets
  them one per poll. The event time of the last observation is the shipment's
  cursor (kept with its ETA); the chain of estimates (which carries the off-route
  hysteresis) is kept with it.
* An alert carries the ETA, time and location of the observation that revealed
  it, not of whatever the vehicle's newest position was when the batch ended.

The ETA shown to clients is separate: it is recomputed at the vehicle's newest
position on every batch (so it is as fresh as the data), and never fed to the
debouncer.

Each vehicle's recent track is kept in memory between batches (`TrackCache`), so
a batch reads from PostgreSQL only the tracks it has not seen: the cache holds
exactly what `vehicle_positions` holds for the vehicle after a known instant, as
of the last committed transaction. Its changes are staged per batch and applied
only when the runner reports the commit (`committed`); any failure or change of
partition ownership empties it (`forget`), because another projector may have
written the vehicle's history meanwhile.

Known limit: a GPS record that arrives after a newer record of the same vehicle
was already observed (a late upload from a second device) is skipped live but
observed in a replay that reads both in one batch. In-order data, the normal
case, decides identically.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from services.projector.models import LoadedModel, ModelSet, ModelStore
from shared import metrics, statecodec
from shared import tracking_store as store
from shared.config import AlertSettings
from shared.db import Connection, as_columns
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
from shared.domain.geo import Fix, Route, haversine_m, route_from_polyline
from shared.domain.tracking import (
    DELIVERED,
    DELIVERY_FAILED,
    Position,
    ShipmentState,
    VehicleState,
)
from shared.envelopes import timestamp
from shared.metrics import ETA_ERROR
from shared.pb import alerts_pb2, common_pb2
from shared.readmodel import eta_scores

log = logging.getLogger(__name__)

ETA_METHODS = {EtaMethod.ROUTE: 1, EtaMethod.GREAT_CIRCLE: 2}

#: Shipments tracked between two yields to the event loop (see _track).
YIELD_EVERY = 16

#: At most one debouncer observation per shipment per this much event time.
OBSERVE_EVERY_S = 30.0

#: Look for a geofence arrival only while the vehicle is this close to the destination
#: (the geofence's exit radius: an arrival confirmed in this batch ends inside it).
ARRIVAL_NEAR_M = 200.0


@dataclass(frozen=True)
class Tracked:
    """One shipment's live tracking row, as stored."""

    shipment: ShipmentState
    conditions: AlertConditions
    #: The last estimate shown (the display chain).
    previous: EtaEstimate | None
    #: Event time of the last observation fed to the debouncer, and its estimate.
    observed_at: datetime | None = None
    observed: EtaEstimate | None = None


@dataclass(frozen=True)
class PendingAlert:
    """An alert decided in this transaction, with what to publish alongside it."""

    shipment: ShipmentState
    decision: AlertDecision
    #: The ETA (as eta_json) the decision rests on, if any.
    eta: dict[str, Any] | None = None
    #: Where the vehicle was, (lat, lon); None: look up the vehicle's last position.
    location: tuple[float, float] | None = None
    #: Event time of the input that revealed the change; None: the shipment's update time.
    detected_at: datetime | None = None


def eta_json(estimate: EtaEstimate, now: datetime) -> dict[str, Any]:
    """The API-facing ETA (see tracking_store.eta_message) plus the model's full estimate,
    with the version of the speed model that produced it (0: no learned version)."""
    return {
        "model_version": estimate.model_version,
        "estimated_arrival": estimate.arrival.isoformat(),
        "earliest": estimate.earliest.isoformat(),
        "latest": estimate.latest.isoformat(),
        "confidence": estimate.confidence,
        "method": ETA_METHODS[estimate.method],
        "remaining_m": estimate.remaining_m,
        "position_age_s": estimate.position_age_s,
        "computed_at": now.isoformat(),
        "model": statecodec.encode(estimate),
    }


def _route_of(shipment: ShipmentState) -> Route | None:
    if not shipment.planned_route:
        return None
    try:
        return route_from_polyline(shipment.planned_route)
    except ValueError:
        return None  # validated at ingest; an old or foreign record falls back to great circle


#: For a shipment whose activation time is unknown: observe every record.
_LONG_AGO = datetime(1970, 1, 1, tzinfo=UTC)


def active_since(shipment: ShipmentState) -> datetime:
    """Event time at which the shipment first entered an active status.

    Records before it are never observed for the shipment: live, they were
    projected while it had no vehicle. Falls back to the creation time, then to
    "always" for a foreign record without times.
    """
    for entry in shipment.timeline:
        if entry.status_after in store.ACTIVE_STATUSES and not entry.anomaly:
            moment = entry.occurred_at or entry.recorded_at
            if moment is not None:
                return moment
    return shipment.created_at or _LONG_AGO


@dataclass
class _VehicleTrack:
    """A vehicle's fixes (time order) and its GPS records' instants, for one batch."""

    fixes: list[Fix]
    times: list[datetime]
    #: Event time of each GPS record: its newest fix. Sorted, distinct.
    records: list[datetime]

    def up_to(self, moment: datetime, window_s: float) -> list[Fix]:
        """The fixes in (moment - window_s, moment]."""
        lo = bisect.bisect_right(self.times, moment - timedelta(seconds=window_s))
        hi = bisect.bisect_right(self.times, moment)
        return self.fixes[lo:hi]

    def at(self, moment: datetime) -> tuple[float, float] | None:
        """Where the newest fix at or before `moment` was."""
        i = bisect.bisect_right(self.times, moment)
        return (self.fixes[i - 1].lat, self.fixes[i - 1].lon) if i else None


def _fix_order(fix: Fix) -> tuple[datetime, float, float]:
    # The order the history query returns rows in (recorded_at, latitude, longitude).
    return fix.at, fix.lat, fix.lon


@dataclass(frozen=True)
class CachedTrack:
    """A vehicle's history rows after `covered_from` (exclusive), in history order.

    Immutable: a batch derives new tracks from the committed ones, so a rollback
    leaves the cache as it was.
    """

    covered_from: datetime
    fixes: tuple[Fix, ...]
    #: The GPS record (event id) of each fix.
    events: tuple[str, ...]

    def covers(self, since: datetime) -> bool:
        return self.covered_from <= since

    def with_points(self, points: Sequence[tuple[str, Position]]) -> CachedTrack:
        """This track plus a batch's new history rows."""
        added = [(_fix_of(point), event_id) for event_id, point in points]
        merged = list(zip(self.fixes, self.events, strict=True))
        in_order = not merged or _fix_order(merged[-1][0]) <= _fix_order(added[0][0])
        merged.extend(added)
        if not in_order or any(_fix_order(a[0]) > _fix_order(b[0]) for a, b in pairwise(added)):
            merged.sort(key=lambda pair: _fix_order(pair[0]))
        return CachedTrack(
            self.covered_from, tuple(f for f, _ in merged), tuple(e for _, e in merged)
        )

    def after(self, moment: datetime) -> CachedTrack:
        """The same track without the rows at or before `moment` (never widens it)."""
        if moment <= self.covered_from:
            return self
        lo = bisect.bisect_right(self.fixes, moment, key=lambda f: f.at)
        return CachedTrack(moment, self.fixes[lo:], self.events[lo:])

    def view(self, after: datetime) -> _VehicleTrack:
        """What the history query returns for rows after `after` (must be covered)."""
        lo = bisect.bisect_right(self.fixes, after, key=lambda f: f.at)
        fixes = list(self.fixes[lo:])
        newest: dict[str, datetime] = {}
        for fix, event_id in zip(fixes, self.events[lo:], strict=True):
            newest[event_id] = fix.at  # time order: the last one of a record is its newest
        return _VehicleTrack(fixes, [f.at for f in fixes], sorted(set(newest.values())))


def _fix_of(point: Position) -> Fix:
    # Exactly what reading the row back gives: speeds are float32 on the wire and
    # `real` in the table, so the value survives the round trip unchanged.
    # The fold validated the point (tracking.gps_positions): no need to check it again.
    return Fix.trusted(point.recorded_at, point.lat, point.lon, point.speed_mps or None)


class TrackCache:
    """Recent tracks of the vehicles this projector tracks, bounded by fixes held.

    Live tracking visits the moving vehicles over and over in much the same
    order, and plain LRU eviction fails on such a cycle once the budget is below
    the working set (every vehicle is evicted just before it is needed again).
    So a vehicle already held always keeps its place; a new one is admitted into
    free room, or into room made by evicting vehicles idle for `idle_s`, and is
    otherwise read from PostgreSQL each time: the hit rate then degrades to
    budget / working set instead of to zero. The budget is a hard bound: growth
    of held tracks evicts the least recently used.
    """

    def __init__(
        self,
        max_fixes: int,
        *,
        idle_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_fixes = max_fixes
        self.idle_s = idle_s
        self._clock = clock
        #: Least recently used first; with the time of each vehicle's last use.
        self._tracks: OrderedDict[store.VehicleKey, tuple[CachedTrack, float]] = OrderedDict()
        self._fixes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._tracks)

    @property
    def fixes(self) -> int:
        return self._fixes

    def get(self, key: store.VehicleKey) -> CachedTrack | None:
        held = self._tracks.get(key)
        return held[0] if held is not None else None

    def lookup(
        self, key: store.VehicleKey, since: datetime, staged: CachedTrack | None = None
    ) -> CachedTrack | None:
        """`staged` (this batch's version of the track), else the held track of `key`,
        if it covers `since`; counted as a hit or a miss."""
        track = staged if staged is not None else self.get(key)
        if track is not None and track.covers(since):
            self.hits += 1
            metrics.PROJECTOR_TRACK_CACHE.labels("memory").inc()
            return track
        self.misses += 1
        metrics.PROJECTOR_TRACK_CACHE.labels("database").inc()
        return None

    def apply(self, changes: Mapping[store.VehicleKey, CachedTrack | None]) -> None:
        """Store a committed batch's tracks (None: forget that vehicle)."""
        now = self._clock()
        newcomers = []
        for key, track in changes.items():
            if key not in self._tracks:
                if track is not None:
                    newcomers.append((key, track))
                continue
            old, _ = self._tracks.pop(key)
            self._fixes -= len(old.fixes)
            if track is not None:
                self._tracks[key] = (track, now)
                self._fixes += len(track.fixes)
        while self._fixes > self.max_fixes and self._tracks:
            self._evict_oldest()
        for key, track in newcomers:
            size = len(track.fixes)
            while self._fixes + size > self.max_fixes and self._tracks:
                _, (_, used) = next(iter(self._tracks.items()))
                if now - used < self.idle_s:
                    break
                self._evict_oldest()
            if self._fixes + size <= self.max_fixes:
                self._tracks[key] = (track, now)
                self._fixes += size
        metrics.PROJECTOR_TRACK_CACHE_FIXES.set(self._fixes)

    def _evict_oldest(self) -> None:
        _, (evicted, _) = self._tracks.popitem(last=False)
        self._fixes -= len(evicted.fixes)

    def clear(self) -> None:
        self._tracks.clear()
        self._fixes = 0
        metrics.PROJECTOR_TRACK_CACHE_FIXES.set(0)


class LiveTracker:
    """Recomputes progress, ETA and alerts for shipments whose vehicle moved.

    Call `committed()` after the transaction of each `update` commits and
    `forget()` when it did not (or when partitions changed hands).
    """

    def __init__(
        self,
        settings: AlertSettings,
        model: EtaModel | None = None,
        *,
        observe_every_s: float = OBSERVE_EVERY_S,
        models: ModelStore | None = None,
    ) -> None:
        if observe_every_s < 0:
            raise ValueError("observe_every_s must be >= 0")
        self.settings = settings
        self.model = model or EtaModel()
        #: Where learned models come from (None: always `model`, version 0).
        self.models = models
        #: The models of the batch in flight: taken once per batch (see `update`).
        self.batch_models = ModelSet(LoadedModel(0, self.model))
        self.observe_every = timedelta(seconds=observe_every_s)
        self.margins = DelayMargins(
            late_after_s=settings.late_margin_min * 60,
            at_risk_within_s=settings.at_risk_margin_min * 60,
            late_probability=settings.late_probability,
            at_risk_probability=settings.at_risk_probability,
        )
        self.tracks = TrackCache(settings.track_cache_fixes)
        #: The tracks of the batch in flight, applied to the cache on commit.
        self._staged: dict[store.VehicleKey, CachedTrack | None] = {}
        #: Arrivals seen in the batch in flight, and those it scored (metrics on commit).
        self._arrivals: list[eta_scores.Arrival] = []
        self._scored: list[eta_scores.ScoredArrival] = []

    def committed(self) -> None:
        """The last update's transaction committed: keep what it read and wrote."""
        self.tracks.apply(self._staged)
        self._staged = {}
        for scored in self._scored:
            for score in scored.scores:
                ETA_ERROR.labels(scored.arrival.tenant_id, score.horizon).observe(
                    abs(score.error_s)
                )
        self._scored = []

    def forget(self) -> None:
        """The last update did not commit, or partitions changed hands: drop the cache."""
        self.tracks.clear()
        self._staged = {}
        self._scored = []

    async def update(
        self,
        connection: Connection,
        vehicles_moved: dict[store.VehicleKey, VehicleState],
        shipments_changed: dict[store.ShipmentKey, ShipmentState],
        new_points: Mapping[store.VehicleKey, Sequence[tuple[str, Position]]] | None = None,
    ) -> None:
        """Track the shipments of the moved vehicles inside the caller's transaction.

        `new_points` are the history rows (event id, position) this transaction
        added per vehicle; without them the cache is not used for this batch.
        """
        self._staged = {}
        self._arrivals = []
        self._scored = []
        # One model set per batch: a version loaded meanwhile applies from the next
        # batch on, so no batch (and no estimate) mixes two versions of a tenant's model.
        if self.models is not None:
            self.batch_models = self.models.current
        if new_points is None:
            # Unknown additions: nothing cached can be trusted past this batch.
            self.forget()
        else:
            for key, points in new_points.items():
                cached = self.tracks.get(key)
                if cached is not None and points:
                    self._staged[key] = cached.with_points(points)
        pending: list[PendingAlert] = []
        for shipment in shipments_changed.values():
            pending.extend(self._failed_deliveries(shipment))
        newly_active = {
            (s.tenant_id, s.vehicle_id)
            for s in shipments_changed.values()
            if s.vehicle_id and s.status in store.ACTIVE_STATUSES
        }
        vehicles = dict(vehicles_moved)
        missing = newly_active - vehicles.keys()
        if missing:
            vehicles.update(await store.load_vehicles(connection, missing))
        vehicles = {k: v for k, v in vehicles.items() if v.last_position is not None}
        needed: dict[store.VehicleKey, datetime] = {}
        if vehicles:
            pending.extend(await self._track(connection, vehicles, needed))
        # Keep a vehicle's track only while it carries shipments, and only as far
        # back as its next batch is likely to need.
        for key in list(self._staged):
            if key not in needed:
                self._staged[key] = None
        window = timedelta(seconds=self.model.params.window_s)
        for key, after in needed.items():
            track = self._staged.get(key)
            if track is not None:
                self._staged[key] = track.after(after - window)
        for shipment in shipments_changed.values():
            if shipment.status == DELIVERED and shipment.delivered_at is not None:
                self._arrivals.append(
                    eta_scores.Arrival(
                        shipment.tenant_id, shipment.shipment_id, shipment.delivered_at, "delivered"
                    )
                )
        # Scored in the transaction that records the arrival: exactly once.
        self._scored = await eta_scores.record_arrivals(connection, self._arrivals)
        await write_alerts(connection, pending)

    def _failed_deliveries(self, shipment: ShipmentState) -> Iterable[PendingAlert]:
        attempt = 0
        for entry in shipment.timeline:
            if entry.kind == "delivery_failed" and not entry.anomaly:
                attempt += 1
                decision = alerts.delivery_failed(
                    shipment.tenant_id, shipment.shipment_id, attempt, entry.detail
                )
                yield PendingAlert(shipment, decision, detected_at=entry.occurred_at)
        if shipment.status == DELIVERY_FAILED and attempt == 0:
            log.debug("shipment %s failed without a timeline entry", shipment.shipment_id)

    def _due(
        self, records: Sequence[datetime], observed_at: datetime | None, start: datetime
    ) -> list[datetime]:
        """The record instants to observe, in time order: at or after `start`, after the
        last observation, at most one per observe_every."""
        due = []
        last = observed_at
        for moment in records:
            if moment < start:
                continue
            if last is not None and (moment <= last or moment < last + self.observe_every):
                continue
            due.append(moment)
            last = moment
        return due

    async def _track(
        self,
        connection: Connection,
        vehicles: dict[store.VehicleKey, VehicleState],
        needed: dict[store.VehicleKey, datetime],
    ) -> list[PendingAlert]:
        """Track the active shipments of `vehicles`; fill `needed` with each tracked
        vehicle's next-observation horizon (for trimming its cached track)."""
        active = await store.active_shipments_of(connection, vehicles)
        if not active:
            return []
        shipments = [s for group in active.values() for s in group if s.destination]
        tracked = await self._load_tracked(connection, shipments)
        # Per vehicle, the earliest instant any of its shipments needs: its next
        # observation, or the newest position (for the ETA shown).
        since: dict[store.VehicleKey, datetime] = {}
        for shipment in shipments:
            key = (shipment.tenant_id, shipment.vehicle_id)
            newest = vehicles[key].last_position
            assert newest is not None
            current = tracked.get((shipment.tenant_id, shipment.shipment_id))
            first = current.observed_at if current and current.observed_at else None
            first = min(first or active_since(shipment), newest.recorded_at)
            since[key] = min(since.get(key, first), first)
        tracks = await self._load_tracks(connection, since)
        window_s = self.model.params.window_s
        rows = []
        history = []
        pending: list[PendingAlert] = []
        ordered = sorted(shipments, key=lambda s: (s.tenant_id, s.shipment_id))
        for n, shipment in enumerate(ordered):
            if n and n % YIELD_EVERY == 0:
                # A batch can move thousands of vehicles, each an ETA estimate of several
                # ms: let the consumer's heartbeats and the outbox relay run meanwhile.
                await asyncio.sleep(0)
            vehicle_key = (shipment.tenant_id, shipment.vehicle_id)
            vehicle = vehicles[vehicle_key]
            track = tracks.get(vehicle_key)
            position = vehicle.last_position
            assert position is not None
            assert shipment.destination is not None
            current = tracked.get((shipment.tenant_id, shipment.shipment_id))
            conditions = current.conditions if current else AlertConditions()
            observed_at = current.observed_at if current else None
            chain = current.observed if current else None
            route = _route_of(shipment)
            loaded = self.batch_models.of(shipment.tenant_id)

            def estimate_at(
                moment: datetime,
                previous: EtaEstimate | None,
                fixes: list[Fix],
                shipment: ShipmentState = shipment,
                route: Route | None = route,
                model: EtaModel = loaded.model,
            ) -> EtaEstimate | None:
                assert shipment.destination is not None
                return model.estimate(
                    now=moment,
                    destination=shipment.destination,
                    positions=fixes,
                    route=route,
                    previous=previous,
                )

            # Observations: what the debouncer sees, independent of batching.
            due = (
                self._due(track.records, observed_at, active_since(shipment))
                if track is not None
                else []
            )
            for moment in due:
                assert track is not None
                estimate = estimate_at(moment, chain, track.up_to(moment, window_s))
                observed_at = moment
                if estimate is None:
                    continue
                chain = estimate
                history.append(self._history_row(shipment, estimate, moment))
                conditions, fired = self._observe(shipment, conditions, estimate)
                if fired:
                    basis = eta_json(estimate, moment)
                    pending.extend(
                        PendingAlert(shipment, d, basis, track.at(moment), moment) for d in fired
                    )

            # The ETA shown: at the vehicle's newest position.
            now = position.recorded_at
            shown: EtaEstimate | None = None
            if chain is not None and observed_at == now:
                shown = chain
            elif track is not None:
                previous = chain or (current.previous if current else None)
                fixes = track.up_to(now, window_s)
                shown = estimate_at(now, previous, fixes) if fixes else None
                if shown is not None:
                    history.append(self._history_row(shipment, shown, now))
            eta: dict[str, Any] | None = None
            progress = None
            if shown is not None:
                eta = eta_json(shown, now)
                progress = {
                    "route_length_m": route.length_m if route else 0.0,
                    "travelled_m": shown.distance_along_m or 0.0,
                    "remaining_m": shown.remaining_m,
                    "on_route": route is not None and not shown.off_route,
                    "off_route_m": shown.offset_m or 0.0,
                }
            if track is not None:
                self._note_arrival(shipment, track, position)
            horizon = min(observed_at or position.recorded_at, position.recorded_at)
            needed[vehicle_key] = min(needed.get(vehicle_key, horizon), horizon)
            if eta is not None and observed_at is not None:
                eta["observed_at"] = observed_at.isoformat()
                eta["observed"] = statecodec.encode(chain) if chain is not None else None
            rows.append(
                (
                    shipment.tenant_id,
                    shipment.shipment_id,
                    shipment.vehicle_id,
                    json.dumps(statecodec.encode(position)),
                    json.dumps(progress) if progress else None,
                    json.dumps(eta) if eta else None,
                    json.dumps(statecodec.encode(conditions)),
                )
            )
        # One statement each (see db.as_columns). A shipment has one row per batch; an
        # ETA history key could only repeat if two estimates shared a position time:
        # keep the last, as row-by-row upserts would.
        await connection.execute(
            "INSERT INTO shipment_tracking (tenant_id, shipment_id, vehicle_id, position,"
            " progress, eta, conditions) SELECT * FROM unnest($1::text[], $2::text[],"
            " $3::text[], $4::jsonb[], $5::jsonb[], $6::jsonb[], $7::jsonb[])"
            " ON CONFLICT (tenant_id, shipment_id) DO UPDATE SET"
            " vehicle_id = EXCLUDED.vehicle_id, position = EXCLUDED.position,"
            " progress = coalesce(EXCLUDED.progress, shipment_tracking.progress),"
            " eta = coalesce(EXCLUDED.eta, shipment_tracking.eta),"
            " conditions = EXCLUDED.conditions, updated_at = now()",
            *as_columns(rows, 7),
        )
        if history:
            latest = {row[:3]: row for row in history}
            await connection.execute(
                "INSERT INTO eta_history (tenant_id, shipment_id, position_at, computed_at,"
                " estimated_arrival, remaining_m, method, model_version) SELECT * FROM"
                " unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],"
                " $5::timestamptz[], $6::float8[], $7::smallint[], $8::bigint[])"
                " ON CONFLICT (tenant_id, shipment_id, position_at) DO UPDATE SET"
                " computed_at = EXCLUDED.computed_at,"
                " estimated_arrival = EXCLUDED.estimated_arrival,"
                " remaining_m = EXCLUDED.remaining_m, method = EXCLUDED.method,"
                " model_version = EXCLUDED.model_version",
                *as_columns(list(latest.values()), 8),
            )
        return pending

    def _note_arrival(
        self, shipment: ShipmentState, track: _VehicleTrack, position: Position
    ) -> None:
        """Note the shipment's arrival if the vehicle, now near its destination, entered
        the destination geofence and stayed (eta_accuracy.geofence_arrival)."""
        destination = shipment.destination
        assert destination is not None
        if haversine_m(position.lat, position.lon, *destination) > ARRIVAL_NEAR_M:
            return  # not there now: nothing to look for (the usual case, and cheap)
        start = active_since(shipment)
        arrived = geofence_arrival(destination, (f for f in track.fixes if f.at >= start))
        if arrived is not None:
            self._arrivals.append(
                eta_scores.Arrival(shipment.tenant_id, shipment.shipment_id, arrived, "geofence")
            )

    @staticmethod
    def _history_row(
        shipment: ShipmentState, estimate: EtaEstimate, now: datetime
    ) -> tuple[str, str, datetime, datetime, datetime, float, int, int]:
        return (
            shipment.tenant_id,
            shipment.shipment_id,
            estimate.position_at,
            now,
            estimate.arrival,
            estimate.remaining_m,
            ETA_METHODS[estimate.method],
            estimate.model_version,
        )

    def _observe(
        self, shipment: ShipmentState, conditions: AlertConditions, estimate: EtaEstimate
    ) -> tuple[AlertConditions, list[AlertDecision]]:
        fired: list[AlertDecision] = []
        tenant_id, shipment_id = shipment.tenant_id, shipment.shipment_id
        if shipment.promised_window is not None:
            end = shipment.promised_window[1]
            condition = classify_delay(estimate, end, self.margins)
            late_by = (estimate.arrival - end).total_seconds() / 60
            chance = late_probability(estimate, end, self.margins.interval_coverage)
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

    async def _load_tracked(
        self, connection: Connection, shipments: list[ShipmentState]
    ) -> dict[store.ShipmentKey, Tracked]:
        if not shipments:
            return {}
        rows = await connection.fetch(
            "SELECT t.tenant_id, t.shipment_id, t.conditions, t.eta FROM shipment_tracking t"
            " JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, shipment_id)"
            " USING (tenant_id, shipment_id)",
            [s.tenant_id for s in shipments],
            [s.shipment_id for s in shipments],
        )
        by_key = {(s.tenant_id, s.shipment_id): s for s in shipments}
        found = {}
        for row in rows:
            key = (row["tenant_id"], row["shipment_id"])
            eta = json.loads(row["eta"]) if row["eta"] else None
            previous = statecodec.decode_as(EtaEstimate, eta["model"]) if eta else None
            observed_at = None
            observed = None
            if eta and eta.get("observed_at"):
                observed_at = datetime.fromisoformat(eta["observed_at"])
                if eta.get("observed"):
                    observed = statecodec.decode_as(EtaEstimate, eta["observed"])
            elif eta:
                # A row written before observations had a cursor: its ETA was the last
                # thing the debouncer saw, so continue after it (never re-observe the past).
                observed_at = datetime.fromisoformat(eta["computed_at"])
                observed = previous
            found[key] = Tracked(
                by_key[key],
                statecodec.decode_as(AlertConditions, json.loads(row["conditions"])),
                previous,
                observed_at,
                observed,
            )
        return found

    async def _load_tracks(
        self, connection: Connection, since: dict[store.VehicleKey, datetime]
    ) -> dict[store.VehicleKey, _VehicleTrack]:
        """Each vehicle's fixes from `since` - window on, and its GPS records' instants.

        From the cache where it covers that far back, else from PostgreSQL (and
        staged for the cache). A record's instant is its newest fix, so it is found
        however many of its points lie before `since`.
        """
        window = timedelta(seconds=self.model.params.window_s)
        tracks: dict[store.VehicleKey, _VehicleTrack] = {}
        missing: dict[store.VehicleKey, datetime] = {}
        for key, moment in since.items():
            after = moment - window
            cached = self.tracks.lookup(key, after, self._staged.get(key))
            if cached is not None:
                self._staged[key] = cached
                view = cached.view(after)
                if view.fixes:
                    tracks[key] = view
            else:
                missing[key] = after
        if not missing:
            return tracks
        keys = sorted(missing)
        rows = await connection.fetch(
            "SELECT p.tenant_id, p.vehicle_id, p.recorded_at, p.latitude, p.longitude,"
            " p.speed_mps, p.event_id FROM vehicle_positions p"
            " JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(tenant_id, vehicle_id,"
            " after) USING (tenant_id, vehicle_id)"
            " WHERE p.recorded_at > k.after"
            " ORDER BY p.tenant_id, p.vehicle_id, p.recorded_at, p.latitude, p.longitude",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [missing[k] for k in keys],
        )
        fixes: dict[store.VehicleKey, list[Fix]] = {key: [] for key in keys}
        events: dict[store.VehicleKey, list[str]] = {key: [] for key in keys}
        for n, row in enumerate(rows):
            if n and n % (YIELD_EVERY * 1000) == 0:
                await asyncio.sleep(0)  # a replay's batch can read back 10^5+ fixes
            key = (row["tenant_id"], row["vehicle_id"])
            # Rows are this projection's own COPY of points the fold validated.
            fixes[key].append(
                Fix.trusted(
                    row["recorded_at"], row["latitude"], row["longitude"], row["speed_mps"] or None
                )
            )
            events[key].append(row["event_id"])
        for key in keys:
            loaded = CachedTrack(missing[key], tuple(fixes[key]), tuple(events[key]))
            self._staged[key] = loaded
            if loaded.fixes:
                tracks[key] = loaded.view(missing[key])
        return tracks


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
        if eta:
            arrival = datetime.fromisoformat(eta["estimated_arrival"])
            delay = max(arrival - shipment.promised_window[1], timedelta(0))
            alert.expected_delay.FromTimedelta(delay)
    if eta:
        alert.eta.CopyFrom(store.eta_message(eta))
    detected_at = pending.detected_at
    if detected_at is None and eta:
        detected_at = datetime.fromisoformat(eta["computed_at"])
    if detected_at is None:
        detected_at = shipment.updated_at
    if detected_at is not None:
        alert.detected_at.CopyFrom(timestamp(detected_at))
    if pending.location is not None:
        alert.last_location.CopyFrom(
            common_pb2.LatLng(latitude=pending.location[0], longitude=pending.location[1])
        )
    return alert


async def write_alerts(connection: Connection, pending: Sequence[PendingAlert]) -> int:
    """Insert alerts into the outbox in the caller's transaction; return how many are new.

    Idempotent by alert id: a decision made again (a replay, a retried batch, a
    repeated stale scan) inserts nothing.
    """
    if not pending:
        return 0
    rows = []
    for item in pending:
        alert = alert_message(item)
        if item.location is None:
            vehicle_position = await connection.fetchrow(
                "SELECT latitude, longitude FROM vehicles WHERE tenant_id = $1 AND vehicle_id = $2",
                item.shipment.tenant_id,
                item.shipment.vehicle_id,
            )
            if vehicle_position and vehicle_position["latitude"] is not None:
                alert.last_location.CopyFrom(
                    common_pb2.LatLng(
                        latitude=vehicle_position["latitude"],
                        longitude=vehicle_position["longitude"],
                    )
                )
        rows.append(
            (
                item.decision.alert_id,
                item.shipment.tenant_id,
                item.shipment.shipment_id,
                alert.SerializeToString(),
            )
        )
    inserted = await connection.fetch(
        "INSERT INTO alert_outbox (alert_id, tenant_id, shipment_id, payload)"
        " SELECT a, t, s, p FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])"
        " WITH ORDINALITY AS u(a, t, s, p, n) ORDER BY n"  # ids in decision order
        " ON CONFLICT (alert_id) DO NOTHING RETURNING alert_id",
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
    )
    return len(inserted)
