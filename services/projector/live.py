"""Live tracking of active shipments: progress, ETA and debounced alerts.

Runs inside the projection's transaction, after the folds. For every vehicle
that moved in the batch (and every shipment that just got a vehicle or a failed
delivery), it recomputes the progress and ETA of the shipments travelling with
the vehicle, keeps the ETA history, and writes the alerts it decides into the
alert outbox. Clocks are event times (the newest fix), never the wall clock, so
a replay decides exactly the same alerts with the same ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from shared import statecodec
from shared import tracking_store as store
from shared.config import AlertSettings
from shared.db import Connection
from shared.domain import alerts
from shared.domain.alerts import AlertConditions, AlertDecision
from shared.domain.eta import DelayMargins, EtaEstimate, EtaMethod, EtaModel, classify_delay
from shared.domain.geo import Fix, Route, route_from_polyline
from shared.domain.tracking import DELIVERY_FAILED, ShipmentState, VehicleState
from shared.envelopes import timestamp
from shared.pb import alerts_pb2, common_pb2

log = logging.getLogger(__name__)

ETA_METHODS = {EtaMethod.ROUTE: 1, EtaMethod.GREAT_CIRCLE: 2}


@dataclass(frozen=True)
class Tracked:
    """One shipment's live tracking row, as stored."""

    shipment: ShipmentState
    conditions: AlertConditions
    previous: EtaEstimate | None


def eta_json(estimate: EtaEstimate, now: datetime) -> dict[str, Any]:
    """The API-facing ETA (see tracking_store.eta_message) plus the model's full estimate."""
    return {
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


class LiveTracker:
    """Recomputes progress, ETA and alerts for shipments whose vehicle moved."""

    def __init__(self, settings: AlertSettings, model: EtaModel | None = None) -> None:
        self.settings = settings
        self.model = model or EtaModel()
        self.margins = DelayMargins(
            late_after_s=settings.late_margin_min * 60,
            at_risk_within_s=settings.at_risk_margin_min * 60,
        )

    async def update(
        self,
        connection: Connection,
        vehicles_moved: dict[store.VehicleKey, VehicleState],
        shipments_changed: dict[store.ShipmentKey, ShipmentState],
    ) -> None:
        decisions: list[tuple[ShipmentState, AlertDecision, dict[str, Any] | None]] = []
        for shipment in shipments_changed.values():
            decisions.extend((shipment, d, None) for d in self._failed_deliveries(shipment))
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
        if vehicles:
            decisions.extend(await self._track(connection, vehicles))
        await self._write_alerts(connection, decisions)

    def _failed_deliveries(self, shipment: ShipmentState) -> Iterable[AlertDecision]:
        attempt = 0
        for entry in shipment.timeline:
            if entry.kind == "delivery_failed" and not entry.anomaly:
                attempt += 1
                yield alerts.delivery_failed(
                    shipment.tenant_id, shipment.shipment_id, attempt, entry.detail
                )
        if shipment.status == DELIVERY_FAILED and attempt == 0:
            log.debug("shipment %s failed without a timeline entry", shipment.shipment_id)

    async def _track(
        self, connection: Connection, vehicles: dict[store.VehicleKey, VehicleState]
    ) -> list[tuple[ShipmentState, AlertDecision, dict[str, Any] | None]]:
        active = await store.active_shipments_of(connection, vehicles)
        if not active:
            return []
        shipments = [s for group in active.values() for s in group if s.destination]
        tracked = await self._load_tracked(connection, shipments)
        fixes = await self._recent_fixes(connection, vehicles)
        rows = []
        history = []
        decisions: list[tuple[ShipmentState, AlertDecision, dict[str, Any] | None]] = []
        for shipment in sorted(shipments, key=lambda s: (s.tenant_id, s.shipment_id)):
            vehicle = vehicles[(shipment.tenant_id, shipment.vehicle_id)]
            position = vehicle.last_position
            assert position is not None
            assert shipment.destination is not None
            now = position.recorded_at
            current = tracked.get((shipment.tenant_id, shipment.shipment_id))
            conditions = current.conditions if current else AlertConditions()
            route = _route_of(shipment)
            estimate = self.model.estimate(
                now=now,
                destination=shipment.destination,
                positions=fixes.get((shipment.tenant_id, shipment.vehicle_id), []),
                route=route,
                previous=current.previous if current else None,
            )
            eta = eta_json(estimate, now) if estimate else None
            progress = None
            if estimate is not None:
                progress = {
                    "route_length_m": route.length_m if route else 0.0,
                    "travelled_m": estimate.distance_along_m or 0.0,
                    "remaining_m": estimate.remaining_m,
                    "on_route": route is not None and not estimate.off_route,
                    "off_route_m": estimate.offset_m or 0.0,
                }
                history.append(
                    (
                        shipment.tenant_id,
                        shipment.shipment_id,
                        estimate.position_at,
                        now,
                        estimate.arrival,
                        estimate.remaining_m,
                        ETA_METHODS[estimate.method],
                    )
                )
                conditions, fired = self._observe(shipment, conditions, estimate)
                decisions.extend((shipment, d, eta) for d in fired)
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
        await connection.executemany(
            "INSERT INTO shipment_tracking (tenant_id, shipment_id, vehicle_id, position,"
            " progress, eta, conditions) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6::jsonb,"
            " $7::jsonb) ON CONFLICT (tenant_id, shipment_id) DO UPDATE SET"
            " vehicle_id = EXCLUDED.vehicle_id, position = EXCLUDED.position,"
            " progress = EXCLUDED.progress, eta = EXCLUDED.eta,"
            " conditions = EXCLUDED.conditions, updated_at = now()",
            rows,
        )
        await connection.executemany(
            "INSERT INTO eta_history (tenant_id, shipment_id, position_at, computed_at,"
            " estimated_arrival, remaining_m, method) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (tenant_id, shipment_id, position_at) DO UPDATE SET"
            " computed_at = EXCLUDED.computed_at, estimated_arrival = EXCLUDED.estimated_arrival,"
            " remaining_m = EXCLUDED.remaining_m, method = EXCLUDED.method",
            history,
        )
        return decisions

    def _observe(
        self, shipment: ShipmentState, conditions: AlertConditions, estimate: EtaEstimate
    ) -> tuple[AlertConditions, list[AlertDecision]]:
        fired: list[AlertDecision] = []
        tenant_id, shipment_id = shipment.tenant_id, shipment.shipment_id
        if shipment.promised_window is not None:
            condition = classify_delay(estimate, shipment.promised_window[1], self.margins)
            late_by = (estimate.arrival - shipment.promised_window[1]).total_seconds() / 60
            detail = f"ETA {estimate.arrival:%H:%M} UTC, {late_by:+.0f} min vs window end"
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
            found[key] = Tracked(
                by_key[key],
                statecodec.decode_as(AlertConditions, json.loads(row["conditions"])),
                previous,
            )
        return found

    async def _recent_fixes(
        self, connection: Connection, vehicles: dict[store.VehicleKey, VehicleState]
    ) -> dict[store.VehicleKey, list[Fix]]:
        window = timedelta(seconds=self.model.params.window_s)
        keys = sorted(vehicles)
        rows = await connection.fetch(
            "SELECT p.tenant_id, p.vehicle_id, p.recorded_at, p.latitude, p.longitude,"
            " p.speed_mps FROM vehicle_positions p"
            " JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(tenant_id, vehicle_id,"
            " newest) USING (tenant_id, vehicle_id)"
            " WHERE p.recorded_at > k.newest - $4::interval AND p.recorded_at <= k.newest"
            " ORDER BY p.recorded_at",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [vehicles[k].last_position.recorded_at for k in keys],  # type: ignore[union-attr]
            window,
        )
        fixes: dict[store.VehicleKey, list[Fix]] = {}
        for row in rows:
            speed = row["speed_mps"]
            fixes.setdefault((row["tenant_id"], row["vehicle_id"]), []).append(
                Fix(row["recorded_at"], row["latitude"], row["longitude"], speed or None)
            )
        return fixes

    async def _write_alerts(
        self,
        connection: Connection,
        decisions: list[tuple[ShipmentState, AlertDecision, dict[str, Any] | None]],
    ) -> None:
        if not decisions:
            return
        rows = []
        for shipment, decision, eta in decisions:
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
                alert.detected_at.CopyFrom(timestamp(datetime.fromisoformat(eta["computed_at"])))
            elif shipment.updated_at:
                alert.detected_at.CopyFrom(timestamp(shipment.updated_at))
            vehicle_position = await connection.fetchrow(
                "SELECT latitude, longitude FROM vehicles WHERE tenant_id = $1 AND vehicle_id = $2",
                shipment.tenant_id,
                shipment.vehicle_id,
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
                    decision.alert_id,
                    shipment.tenant_id,
                    shipment.shipment_id,
                    alert.SerializeToString(),
                )
            )
        await connection.executemany(
            "INSERT INTO alert_outbox (alert_id, tenant_id, shipment_id, payload)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (alert_id) DO NOTHING",
            rows,
        )
