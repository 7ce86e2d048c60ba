"""The `vehicle_positions` table: every accepted GPS point, partitioned by day of the fix.

The projector COPYs each batch's points in (`append_history`), live tracking reads
recent tracks back (`recent_fixes`), and `maintain_position_partitions` keeps the
daily partitions from the retention horizon to a few days ahead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from shared.db import Connection
from shared.domain.geo import Fix
from shared.readmodel.rows import VehicleKey

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

#: Rows decoded between two yields to the event loop (a replay's batch can read back
#: 10^5+ fixes).
YIELD_EVERY_ROWS = 16_000


async def append_history(
    connection: Connection, points: Mapping[VehicleKey, Sequence[tuple[str, Fix]]]
) -> int:
    """COPY fixes into the history table: per (tenant, vehicle), (event id, fix) pairs.
    Returns how many rows it wrote. The table stores an unknown speed, heading or
    accuracy as 0 (its columns are NOT NULL DEFAULT 0, as since migration 001, and
    0 is what every reader of it takes for unknown)."""
    records = [
        (
            tenant,
            vehicle,
            p.at,
            p.lat,
            p.lon,
            p.speed_mps or 0.0,
            p.heading_deg or 0.0,
            p.accuracy_m or 0.0,
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


async def recent_fixes(
    connection: Connection, after: Mapping[VehicleKey, datetime]
) -> dict[VehicleKey, tuple[list[Fix], list[str]]]:
    """Per vehicle, its rows recorded strictly after its instant, as fixes with the GPS
    record (event id) of each, in (recorded_at, latitude, longitude) order. Every
    asked vehicle is in the answer (with empty lists when it has no such rows). A
    fix read back equals the one written (0 reads back as None; speed, heading and
    accuracy are float32 on the wire and `real` in the table, so they survive)."""
    keys = sorted(after)
    found: dict[VehicleKey, tuple[list[Fix], list[str]]] = {key: ([], []) for key in keys}
    if not keys:
        return found
    rows = await connection.fetch(
        "SELECT p.tenant_id, p.vehicle_id, p.recorded_at, p.latitude, p.longitude,"
        " p.speed_mps, p.heading_deg, p.accuracy_m, p.event_id FROM vehicle_positions p"
        " JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(tenant_id, vehicle_id,"
        " after) USING (tenant_id, vehicle_id)"
        " WHERE p.recorded_at > k.after"
        " ORDER BY p.tenant_id, p.vehicle_id, p.recorded_at, p.latitude, p.longitude",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [after[k] for k in keys],
    )
    for n, row in enumerate(rows):
        if n and n % YIELD_EVERY_ROWS == 0:
            await asyncio.sleep(0)
        fixes, events = found[(row["tenant_id"], row["vehicle_id"])]
        # Rows are this projection's own COPY of points the fold validated.
        fixes.append(
            Fix.trusted(
                row["recorded_at"],
                row["latitude"],
                row["longitude"],
                row["speed_mps"] or None,
                row["heading_deg"] or None,
                row["accuracy_m"] or None,
            )
        )
        events.append(row["event_id"])
    return found


async def fleet_average_mps(connection: Connection, since: datetime) -> dict[str, float]:
    """Per tenant, the space-mean speed (total distance / total time) of consecutive
    positions of each vehicle since ``since`` (pairs at most 10 min apart, at most
    40 m/s): the projector's fallback before a tenant has any model version."""
    rows = await connection.fetch(
        "SELECT tenant_id, sum(d)::float8 AS d, sum(dt)::float8 AS dt FROM ("
        " SELECT tenant_id,"
        "  2 * 6371008.8 * asin(sqrt(power(sin(radians(latitude - plat) / 2), 2)"
        "   + cos(radians(plat)) * cos(radians(latitude))"
        "   * power(sin(radians(longitude - plon) / 2), 2))) AS d,"
        "  extract(epoch FROM recorded_at - pat)::float8 AS dt"
        " FROM (SELECT tenant_id, latitude, longitude, recorded_at,"
        "  lag(latitude) OVER w AS plat, lag(longitude) OVER w AS plon,"
        "  lag(recorded_at) OVER w AS pat"
        "  FROM vehicle_positions WHERE recorded_at >= $1"
        "  WINDOW w AS (PARTITION BY tenant_id, vehicle_id ORDER BY recorded_at)) p"
        " WHERE pat IS NOT NULL AND recorded_at > pat"
        "  AND recorded_at - pat <= interval '10 minutes') q"
        " WHERE d <= 40 * dt GROUP BY tenant_id",
        since,
    )
    return {r["tenant_id"]: float(r["d"] / r["dt"]) for r in rows if r["dt"] and r["d"]}


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
