"""The `vehicles` table: each vehicle's folded state and its latest position by event time."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from shared import statecodec
from shared.db import Connection, as_columns
from shared.domain.tracking import VehicleState
from shared.readmodel.rows import VehicleKey


async def load_vehicles(
    connection: Connection, keys: Iterable[VehicleKey]
) -> dict[VehicleKey, VehicleState]:
    """The stored states of the given vehicles; absent keys have none yet."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    rows = await connection.fetch(
        "SELECT t.state FROM vehicles t"
        " JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, vehicle_id)"
        " USING (tenant_id, vehicle_id)",
        [k[0] for k in wanted],
        [k[1] for k in wanted],
    )
    states = (statecodec.decode_as(VehicleState, json.loads(r["state"])) for r in rows)
    return {(s.tenant_id, s.vehicle_id): s for s in states}


async def save_vehicles(connection: Connection, states: Sequence[VehicleState]) -> None:
    """Upsert vehicle states (one row each), in key order to avoid lock-order deadlocks."""
    if not states:
        return
    ordered = sorted(states, key=lambda s: (s.tenant_id, s.vehicle_id))
    rows = [
        (
            s.tenant_id,
            s.vehicle_id,
            s.last_position.lat if s.last_position else None,
            s.last_position.lon if s.last_position else None,
            s.last_position.at if s.last_position else None,
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


async def last_location(
    connection: Connection, tenant_id: str, vehicle_id: str
) -> tuple[float, float] | None:
    """Where the vehicle last was, (lat, lon); None when it never reported."""
    row = await connection.fetchrow(
        "SELECT latitude, longitude FROM vehicles WHERE tenant_id = $1 AND vehicle_id = $2",
        tenant_id,
        vehicle_id,
    )
    if row is None or row["latitude"] is None:
        return None
    return row["latitude"], row["longitude"]
