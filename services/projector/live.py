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
  cursor (shipment_tracking.observed_at); the chain of estimates (which carries
  the off-route hysteresis) is kept with it (`observed`).
* An alert carries the ETA, time and location of the observation that revealed
  it, not of whatever the vehicle's newest position was when the batch ended.

The ETA shown to clients is separate: it is recomputed at the vehicle's newest
position on every batch (so it is as fresh as the data), and never fed to the
debouncer.

Three parts:

* services/projector/decide.py: the decisions, pure (`decide`: stored row + track
  → new row, ETA history, alerts);
* services/projector/track_cache.py: each vehicle's recent track kept in memory
  between batches (`TrackCache`), so a batch reads from PostgreSQL only the tracks
  it has not seen. Its changes are staged per batch and applied only when the
  runner reports the commit (`committed`); any failure or change of partition
  ownership empties it (`forget`);
* this module: the tracker, which loads the rows and tracks (shared/readmodel),
  decides, and writes the result in the caller's transaction.

Known limit: a GPS record that arrives after a newer record of the same vehicle
was already observed (a late upload from a second device) is skipped live but
observed in a replay that reads both in one batch. In-order data, the normal
case, decides identically.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from services.projector.decide import (
    ARRIVAL_NEAR_M,
    ETA_METHODS,
    OBSERVE_EVERY_S,
    PendingAlert,
    Policy,
    active_since,
    alert_message,
    decide,
    eta_row,
    failed_deliveries,
    needed_from,
)
from services.projector.models import LoadedModel, ModelSet, ModelStore
from services.projector.track_cache import CachedTrack, TrackCache, VehicleTrack
from shared.config import AlertSettings
from shared.db import Connection
from shared.domain.eta import DelayMargins, EtaModel
from shared.domain.geo import Fix
from shared.domain.tracking import (
    ACTIVE,
    DELIVERED,
    DELIVERY_FAILED,
    ShipmentState,
    VehicleState,
)
from shared.metrics import ETA_ERROR
from shared.pb import common_pb2
from shared.readmodel import (
    alert_outbox,
    eta_history,
    eta_scores,
    shipment_tracking,
    shipments,
    vehicle_positions,
    vehicles,
)
from shared.readmodel.rows import (
    EtaHistoryRow,
    OutboxAlert,
    ShipmentKey,
    TrackingRow,
    VehicleKey,
)

__all__ = [
    "ARRIVAL_NEAR_M",
    "ETA_METHODS",
    "OBSERVE_EVERY_S",
    "CachedTrack",
    "LiveTracker",
    "PendingAlert",
    "TrackCache",
    "active_since",
    "alert_message",
    "eta_row",
    "write_alerts",
]

log = logging.getLogger(__name__)

#: Shipments tracked between two yields to the event loop (see _track).
YIELD_EVERY = 16


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
        self.policy = Policy(self.margins, self.observe_every, self.model.params.window_s)
        self.tracks = TrackCache(settings.track_cache_fixes)
        #: The tracks of the batch in flight, applied to the cache on commit.
        self._staged: dict[VehicleKey, CachedTrack | None] = {}
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
        vehicles_moved: dict[VehicleKey, VehicleState],
        shipments_changed: dict[ShipmentKey, ShipmentState],
        new_points: Mapping[VehicleKey, Sequence[tuple[str, Fix]]] | None = None,
    ) -> None:
        """Track the shipments of the moved vehicles inside the caller's transaction.

        `new_points` are the history rows (event id, fix) this transaction added per
        vehicle, the fix objects the fold decoded (the cache keeps them, so the ETA's
        memo works on them from their first batch on); without them the cache is not
        used for this batch.
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
            failed = list(failed_deliveries(shipment))
            if shipment.status == DELIVERY_FAILED and not failed:
                log.debug("shipment %s failed without a timeline entry", shipment.shipment_id)
            pending.extend(failed)
        newly_active = {
            (s.tenant_id, s.vehicle_id)
            for s in shipments_changed.values()
            if s.vehicle_id and s.status in ACTIVE
        }
        moved = dict(vehicles_moved)
        missing = newly_active - moved.keys()
        if missing:
            moved.update(await vehicles.load_vehicles(connection, missing))
        moved = {k: v for k, v in moved.items() if v.last_position is not None}
        needed: dict[VehicleKey, datetime] = {}
        if moved:
            pending.extend(await self._track(connection, moved, needed))
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

    async def _track(
        self,
        connection: Connection,
        moved: dict[VehicleKey, VehicleState],
        needed: dict[VehicleKey, datetime],
    ) -> list[PendingAlert]:
        """Track the active shipments of the `moved` vehicles: load → decide → write.
        Fills `needed` with each tracked vehicle's next-observation horizon (for
        trimming its cached track)."""
        active = await shipments.active_shipments_of(connection, moved)
        if not active:
            return []
        tracked = [s for group in active.values() for s in group if s.destination]
        stored = await shipment_tracking.load_stored(connection, tracked)
        # Per vehicle, the earliest instant any of its shipments needs.
        since: dict[VehicleKey, datetime] = {}
        for shipment in tracked:
            key = (shipment.tenant_id, shipment.vehicle_id)
            newest = moved[key].last_position
            assert newest is not None
            first = needed_from(
                shipment, stored.get((shipment.tenant_id, shipment.shipment_id)), newest.at
            )
            since[key] = min(since.get(key, first), first)
        tracks = await self._load_tracks(connection, since)
        rows: list[TrackingRow] = []
        history: list[EtaHistoryRow] = []
        pending: list[PendingAlert] = []
        ordered = sorted(tracked, key=lambda s: (s.tenant_id, s.shipment_id))
        for n, shipment in enumerate(ordered):
            if n and n % YIELD_EVERY == 0:
                # A batch can move thousands of vehicles, each an ETA estimate of several
                # ms: let the consumer's heartbeats and the outbox relay run meanwhile.
                await asyncio.sleep(0)
            vehicle_key = (shipment.tenant_id, shipment.vehicle_id)
            position = moved[vehicle_key].last_position
            assert position is not None
            decision = decide(
                shipment,
                stored.get((shipment.tenant_id, shipment.shipment_id)),
                position,
                tracks.get(vehicle_key),
                self.batch_models.of(shipment.tenant_id).model,
                self.policy,
            )
            rows.append(decision.row)
            history.extend(decision.history)
            pending.extend(decision.alerts)
            if decision.arrived_at is not None:
                self._arrivals.append(
                    eta_scores.Arrival(
                        shipment.tenant_id, shipment.shipment_id, decision.arrived_at, "geofence"
                    )
                )
            needed[vehicle_key] = min(needed.get(vehicle_key, decision.horizon), decision.horizon)
        # One statement each (see db.as_columns).
        await shipment_tracking.save(connection, rows)
        await eta_history.save(connection, history)
        return pending

    async def _load_tracks(
        self, connection: Connection, since: dict[VehicleKey, datetime]
    ) -> dict[VehicleKey, VehicleTrack]:
        """Each vehicle's fixes from `since` - window on, and its GPS records' instants.

        From the cache where it covers that far back, else from PostgreSQL (and
        staged for the cache). A record's instant is its newest fix, so it is found
        however many of its points lie before `since`.
        """
        window = timedelta(seconds=self.model.params.window_s)
        tracks: dict[VehicleKey, VehicleTrack] = {}
        missing: dict[VehicleKey, datetime] = {}
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
        loaded_rows = await vehicle_positions.recent_fixes(connection, missing)
        for key in sorted(missing):
            fixes, events = loaded_rows[key]
            loaded = CachedTrack(missing[key], tuple(fixes), tuple(events))
            self._staged[key] = loaded
            if loaded.fixes:
                tracks[key] = loaded.view(missing[key])
        return tracks


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
            where = await vehicles.last_location(
                connection, item.shipment.tenant_id, item.shipment.vehicle_id
            )
            if where is not None:
                alert.last_location.CopyFrom(
                    common_pb2.LatLng(latitude=where[0], longitude=where[1])
                )
        rows.append(
            OutboxAlert(
                item.decision.alert_id,
                item.shipment.tenant_id,
                item.shipment.shipment_id,
                alert.SerializeToString(),
            )
        )
    return len(await alert_outbox.insert(connection, rows))
