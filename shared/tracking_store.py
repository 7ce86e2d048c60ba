"""Where the tracking projection keeps its state in PostgreSQL, and how it reads back.

The projector writes through `save_*`; the query service reads through `load_*`
and `shipment_message`. Both sides share this one module, so the table layout
is known in one place. Every statement takes an open connection: the caller
owns the transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared import statecodec
from shared.db import Connection, as_columns
from shared.domain.tracking import TIMELINE_HEAD, Position, ShipmentState, VehicleState
from shared.envelopes import timestamp
from shared.pb import common_pb2, delivery_pb2, tracking_pb2

ShipmentKey = tuple[str, str]  # (tenant_id, shipment_id)
VehicleKey = tuple[str, str]  # (tenant_id, vehicle_id)

#: Statuses in which a shipment travels with its vehicle (progress and ETA apply).
ACTIVE_STATUSES = (2, 3, 4, 5, 7)  # ASSIGNED, PICKED_UP, IN_TRANSIT, OUT_FOR_DELIVERY, FAILED


async def _load_states(
    connection: Connection, table: str, id_column: str, keys: Iterable[tuple[str, str]]
) -> list[Any]:
    """The decoded `state` jsonb of the rows of `table` keyed (tenant_id, id_column)."""
    wanted = sorted(set(keys))
    if not wanted:
        return []
    rows = await connection.fetch(
        f"SELECT t.state FROM {table} t"
        f" JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, {id_column})"
        f" USING (tenant_id, {id_column})",
        [k[0] for k in wanted],
        [k[1] for k in wanted],
    )
    return [json.loads(r["state"]) for r in rows]


async def load_shipments(
    connection: Connection, keys: Iterable[ShipmentKey]
) -> dict[ShipmentKey, ShipmentState]:
    """The stored states of the given shipments; absent keys have none yet."""
    rows = await _load_states(connection, "shipments", "shipment_id", keys)
    states = (statecodec.decode_as(ShipmentState, row) for row in rows)
    return {(s.tenant_id, s.shipment_id): s for s in states}


@dataclass(frozen=True)
class Assignment:
    """What the read model says about a shipment, for the delivery-confirmations pre-check:
    its status, its assigned vehicle ('' for none) and the confirmation id of its proof
    (None when it holds none)."""

    status: int
    vehicle_id: str
    proof_confirmation_id: str | None


async def load_assignment(
    connection: Connection, tenant_id: str, shipment_id: str
) -> Assignment | None:
    """The shipment's status, vehicle and proof as last projected; None when the read
    model does not know it (not created, or not projected yet). One indexed row read."""
    row = await connection.fetchrow(
        "SELECT status, vehicle_id, state->'proof'->>'confirmation_id' AS proof_confirmation_id"
        " FROM shipments WHERE tenant_id = $1 AND shipment_id = $2",
        tenant_id,
        shipment_id,
    )
    if row is None:
        return None
    return Assignment(row["status"], row["vehicle_id"], row["proof_confirmation_id"])


async def save_shipments(connection: Connection, states: Sequence[ShipmentState]) -> None:
    """Upsert shipment states (one row each), in key order to avoid lock-order deadlocks."""
    if not states:
        return
    ordered = sorted(states, key=lambda s: (s.tenant_id, s.shipment_id))
    rows = [
        (
            s.tenant_id,
            s.shipment_id,
            s.customer_id,
            s.status,
            s.vehicle_id,
            s.tracking_token or None,
            s.created_at,
            s.updated_at or s.created_at or datetime.fromtimestamp(0).astimezone(),
            json.dumps(statecodec.encode(s)),
        )
        for s in ordered
    ]
    await connection.execute(
        "INSERT INTO shipments (tenant_id, shipment_id, customer_id, status, vehicle_id,"
        " tracking_token, created_at, updated_at, state)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::smallint[], $5::text[],"
        " $6::text[], $7::timestamptz[], $8::timestamptz[], $9::jsonb[])"
        " ON CONFLICT (tenant_id, shipment_id) DO UPDATE SET"
        " customer_id = EXCLUDED.customer_id, status = EXCLUDED.status,"
        " vehicle_id = EXCLUDED.vehicle_id, tracking_token = EXCLUDED.tracking_token,"
        " created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,"
        " state = EXCLUDED.state",
        *as_columns(rows, 9),
    )


async def load_vehicles(
    connection: Connection, keys: Iterable[VehicleKey]
) -> dict[VehicleKey, VehicleState]:
    """The stored states of the given vehicles; absent keys have none yet."""
    rows = await _load_states(connection, "vehicles", "vehicle_id", keys)
    states = (statecodec.decode_as(VehicleState, row) for row in rows)
    return {(s.tenant_id, s.vehicle_id): s for s in states}


async def save_vehicles(connection: Connection, states: Sequence[VehicleState]) -> None:
    if not states:
        return
    ordered = sorted(states, key=lambda s: (s.tenant_id, s.vehicle_id))
    rows = [
        (
            s.tenant_id,
            s.vehicle_id,
            s.last_position.lat if s.last_position else None,
            s.last_position.lon if s.last_position else None,
            s.last_position.recorded_at if s.last_position else None,
            json.dumps(statecodec.encode(s)),
        )
        for s in ordered
    ]
    await connection.execute(
        "INSERT INTO vehicles (tenant_id, vehicle_id, latitude, longitude, recorded_at, state)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[],"
        " $5::timestamptz[], $6::jsonb[])"
        " ON CONFLICT (tenant_id, vehicle_id) DO UPDATE SET"
        " latitude = EXCLUDED.latitude, longitude = EXCLUDED.longitude,"
        " recorded_at = EXCLUDED.recorded_at, state = EXCLUDED.state, updated_at = now()",
        *as_columns(rows, 6),
    )


HISTORY_COLUMNS = (
    "tenant_id",
    "vehicle_id",
    "recorded_at",
    "latitude",
    "longitude",
    "speed_mps",
    "heading_deg",
    "accuracy_m",
    "event_id",
)


async def append_history(
    connection: Connection, points: Mapping[VehicleKey, Sequence[tuple[str, Position]]]
) -> int:
    """COPY positions into the history table: per (tenant, vehicle), (event id, position)
    pairs. Returns how many rows it wrote."""
    records = [
        (
            tenant,
            vehicle,
            p.recorded_at,
            p.lat,
            p.lon,
            p.speed_mps,
            p.heading_deg,
            p.accuracy_m,
            event_id,
        )
        for (tenant, vehicle), pairs in points.items()
        for event_id, p in pairs
    ]
    if records:
        await connection.copy_records_to_table(
            "vehicle_positions", columns=HISTORY_COLUMNS, records=records
        )
    return len(records)


async def active_shipments_of(
    connection: Connection, vehicles: Iterable[VehicleKey]
) -> dict[VehicleKey, list[ShipmentState]]:
    """Shipments currently travelling with each vehicle (see ACTIVE_STATUSES)."""
    keys = sorted(set(vehicles))
    if not keys:
        return {}
    rows = await connection.fetch(
        "SELECT s.state FROM shipments s"
        " JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, vehicle_id)"
        " USING (tenant_id, vehicle_id)"
        " WHERE s.status = ANY($3::smallint[])",
        [k[0] for k in keys],
        [k[1] for k in keys],
        list(ACTIVE_STATUSES),
    )
    found: dict[VehicleKey, list[ShipmentState]] = {}
    for row in rows:
        state = statecodec.decode_as(ShipmentState, json.loads(row["state"]))
        found.setdefault((state.tenant_id, state.vehicle_id), []).append(state)
    return found


# --- reading back as messages -------------------------------------------------------


def _latlng(point: tuple[float, float] | None) -> common_pb2.LatLng | None:
    return common_pb2.LatLng(latitude=point[0], longitude=point[1]) if point else None


def position_message(position: Position) -> common_pb2.Position:
    return common_pb2.Position(
        location=common_pb2.LatLng(latitude=position.lat, longitude=position.lon),
        recorded_at=timestamp(position.recorded_at),
        speed_mps=position.speed_mps,
        heading_deg=position.heading_deg,
        accuracy_m=position.accuracy_m,
    )


#: Kind of the entry that stands for the entries the fold dropped at its bound.
ENTRIES_OMITTED = "entries_omitted"


def timeline_messages(state: ShipmentState) -> list[tracking_pb2.TimelineEntry]:
    """The timeline as messages, in log order. When the fold dropped entries at its
    bound (shared.domain.tracking.TIMELINE_HEAD / TIMELINE_TAIL), one entry of kind
    ENTRIES_OMITTED, detail "N entries omitted", stands where they were."""
    entries = []
    for index, entry in enumerate(state.timeline):
        if index == TIMELINE_HEAD and state.timeline_dropped:
            entries.append(
                tracking_pb2.TimelineEntry(
                    kind=ENTRIES_OMITTED,
                    status=state.timeline[index - 1].status_after,
                    detail=f"{state.timeline_dropped} entries omitted",
                )
            )
        message = tracking_pb2.TimelineEntry(
            event_id=entry.event_id,
            kind=entry.kind,
            status=entry.status_after,
            detail=entry.detail,
            anomaly=entry.anomaly,
        )
        if entry.occurred_at:
            message.occurred_at.CopyFrom(timestamp(entry.occurred_at))
        if entry.recorded_at:
            message.recorded_at.CopyFrom(timestamp(entry.recorded_at))
        entries.append(message)
    return entries


def shipment_message(
    state: ShipmentState, tracking: dict[str, Any] | None
) -> tracking_pb2.Shipment:
    """The API view of a shipment: its folded state plus live tracking (position, ETA)."""
    message = tracking_pb2.Shipment(
        shipment_id=state.shipment_id,
        customer_id=state.customer_id,
        status=state.status,
        planned_route=state.planned_route,
        reference=state.reference,
        vehicle_id=state.vehicle_id,
        driver_id=state.driver_id,
        tracking_token=state.tracking_token,
        delivery_attempts=state.delivery_attempts,
    )
    if (origin := _latlng(state.origin)) is not None:
        message.origin.CopyFrom(origin)
    if (destination := _latlng(state.destination)) is not None:
        message.destination.CopyFrom(destination)
    if state.promised_window:
        message.promised_window.start.CopyFrom(timestamp(state.promised_window[0]))
        message.promised_window.end.CopyFrom(timestamp(state.promised_window[1]))
    for name in ("created_at", "updated_at", "delivered_at"):
        moment = getattr(state, name)
        if moment is not None:
            getattr(message, name).CopyFrom(timestamp(moment))
    if state.proof is not None:
        proof = state.proof
        message.proof.CopyFrom(
            delivery_pb2.DeliveryConfirmation(
                confirmation_id=proof.confirmation_id,
                shipment_id=state.shipment_id,
                vehicle_id=proof.vehicle_id,
                recipient_name=proof.recipient_name,
                method=proof.method,
                proof_sha256=proof.proof_sha256,
                note=proof.note,
            )
        )
        if proof.confirmed_at:
            message.proof.confirmed_at.CopyFrom(timestamp(proof.confirmed_at))
        if (where := _latlng(proof.location)) is not None:
            message.proof.location.CopyFrom(where)
    for anomaly in state.anomalies:
        entry = message.anomalies.add(event_id=anomaly.event_id, reason=anomaly.reason)
        if anomaly.occurred_at:
            entry.occurred_at.CopyFrom(timestamp(anomaly.occurred_at))
    if tracking:
        if tracking.get("position"):
            message.last_position.CopyFrom(
                position_message(statecodec.decode_as(Position, tracking["position"]))
            )
        if tracking.get("progress"):
            message.progress.CopyFrom(common_pb2.Progress(**tracking["progress"]))
        if tracking.get("eta"):
            message.eta.CopyFrom(eta_message(tracking["eta"]))
    return message


def eta_message(data: dict[str, Any]) -> common_pb2.Eta:
    """An Eta message from the JSON the projector stores in shipment_tracking.eta."""
    eta = common_pb2.Eta(
        confidence=data.get("confidence", 0.0),
        method=data.get("method", 0),
        remaining_m=data.get("remaining_m", 0.0),
        model_version=data.get("model_version", 0),
    )
    for name in ("estimated_arrival", "earliest", "latest", "computed_at"):
        if data.get(name):
            getattr(eta, name).CopyFrom(timestamp(datetime.fromisoformat(data[name])))
    if "position_age_s" in data:
        eta.position_age.FromNanoseconds(int(float(data["position_age_s"]) * 1e9))
    return eta


# --- position history partitions ------------------------------------------------------


def _partition_name(day: datetime) -> str:
    return f"vehicle_positions_{day:%Y%m%d}"


async def _create_day_partition(
    connection: Connection, name: str, start: datetime, end: datetime
) -> None:
    """Create one day's partition, moving that day's rows out of DEFAULT first.

    PostgreSQL refuses a new partition while DEFAULT holds rows of its range
    (points may land there before the partition exists, e.g. right after a
    fresh start), so the rows move in the same transaction as the attach.
    """
    bounds = f"FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    async with connection.transaction():
        await connection.execute("LOCK TABLE vehicle_positions_default IN SHARE ROW EXCLUSIVE MODE")
        if await connection.fetchval(
            "SELECT to_regclass(current_schema() || '.' || $1) IS NOT NULL", name
        ):
            return
        await connection.execute(
            f"CREATE TABLE {name} (LIKE vehicle_positions INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        await connection.execute(
            f"WITH moved AS (DELETE FROM vehicle_positions_default"
            f" WHERE recorded_at >= $1 AND recorded_at < $2 RETURNING *)"
            f" INSERT INTO {name} SELECT * FROM moved",
            start,
            end,
        )
        await connection.execute(
            f"ALTER TABLE vehicle_positions ATTACH PARTITION {name} FOR VALUES {bounds}"
        )


async def maintain_position_partitions(
    connection: Connection, now: datetime, retention_days: int, days_ahead: int = 2
) -> tuple[list[str], list[str]]:
    """Create the daily history partitions from the retention horizon to days_ahead,
    drop those wholly older than the horizon; return (created, dropped).

    Partitions exist before their day starts, so the DEFAULT partition only ever
    holds points older than the retention horizon (hours-late points still find
    their day), and creating a partition never collides with rows in DEFAULT.
    Idempotent; run at start and periodically.
    """
    from datetime import UTC, timedelta

    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    horizon = today - timedelta(days=retention_days)
    existing = {
        r["relname"]
        for r in await connection.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent"
            " WHERE p.relname = 'vehicle_positions'"
            " AND p.relnamespace = to_regnamespace(current_schema())"
        )
    }
    created = []
    day = horizon
    while day <= today + timedelta(days=days_ahead):
        name = _partition_name(day)
        if name not in existing:
            await _create_day_partition(connection, name, day, day + timedelta(days=1))
            created.append(name)
        day += timedelta(days=1)
    dropped = []
    for name in sorted(existing):
        suffix = name.rsplit("_", 1)[-1]
        if suffix.isdigit() and len(suffix) == 8 and suffix < f"{horizon:%Y%m%d}":
            await connection.execute(f"DROP TABLE IF EXISTS {name}")
            dropped.append(name)
    await connection.execute(
        "DELETE FROM vehicle_positions_default WHERE recorded_at < $1", horizon
    )
    return created, dropped
