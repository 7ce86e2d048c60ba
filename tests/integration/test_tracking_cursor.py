"""The debouncer's cursor in its own columns (migration 016), expand/contract-safe.

Against the session's PostgreSQL, with today's migrations:

* today's writer puts the cursor in `observed_at` / `observed` and, for the previous
  release, in the `eta` jsonb keys it reads (`observed_at`, `observed`);
* a row in the previous release's form (keys only, or an upsert that leaves the
  columns behind) reads back with the later cursor;
* a batch without an ETA keeps the stored ETA and its cursor.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg

from shared import statecodec
from shared.config import DatabaseSettings
from shared.db import Connection, migrate
from shared.domain.alerts import AlertConditions
from shared.domain.eta import EtaEstimate, EtaMethod
from shared.domain.geo import Fix
from shared.domain.tracking import ShipmentState
from shared.readmodel import shipment_tracking
from shared.readmodel.rows import Cursor, EtaRow, Progress, TrackingRow

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
SHIPMENT = ShipmentState(shipment_id="s1", tenant_id="acme", vehicle_id="v1")

#: The previous release's upsert (services/projector/live.py before migration 016).
PREVIOUS_RELEASE_UPSERT = (
    "INSERT INTO shipment_tracking (tenant_id, shipment_id, vehicle_id, position,"
    " progress, eta, conditions) SELECT * FROM unnest($1::text[], $2::text[],"
    " $3::text[], $4::jsonb[], $5::jsonb[], $6::jsonb[], $7::jsonb[])"
    " ON CONFLICT (tenant_id, shipment_id) DO UPDATE SET"
    " vehicle_id = EXCLUDED.vehicle_id, position = EXCLUDED.position,"
    " progress = coalesce(EXCLUDED.progress, shipment_tracking.progress),"
    " eta = coalesce(EXCLUDED.eta, shipment_tracking.eta),"
    " conditions = EXCLUDED.conditions, updated_at = now()"
)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def estimate(minutes: float) -> EtaEstimate:
    return EtaEstimate(
        arrival=at(minutes + 60),
        earliest=at(minutes + 50),
        latest=at(minutes + 70),
        confidence=0.8,
        method=EtaMethod.GREAT_CIRCLE,
        remaining_m=30_000.0,
        position_age_s=0.0,
        position_at=at(minutes),
        travel_s=3600.0,
        dwell_s=0.0,
        observed_speed_mps=8.0,
        speed_ratio=1.0,
        off_route=False,
        distance_along_m=None,
        offset_m=None,
    )


def row(minutes: float, cursor: Cursor | None, *, with_eta: bool = True) -> TrackingRow:
    eta = EtaRow(
        model_version=0,
        estimated_arrival=at(minutes + 60),
        earliest=at(minutes + 50),
        latest=at(minutes + 70),
        confidence=0.8,
        method=2,
        remaining_m=30_000.0,
        position_age_s=0.0,
        computed_at=at(minutes),
        model=estimate(minutes),
    )
    return TrackingRow(
        "acme",
        "s1",
        "v1",
        Fix(at(minutes), 52.4, 13.1),
        Progress(remaining_m=30_000.0) if with_eta else None,
        eta if with_eta else None,
        AlertConditions(pending_count=int(minutes)),
        cursor,
    )


async def stored(connection: Connection) -> Cursor | None:
    found = await shipment_tracking.load_stored(connection, [SHIPMENT])
    return found[("acme", "s1")].cursor


async def test_the_cursor_has_its_columns_and_the_previous_releases_keys(
    database_url: str, pg_schema: str, db_pool: asyncpg.Pool
) -> None:
    await migrate(DatabaseSettings(url=database_url, schema=pg_schema))
    async with db_pool.acquire() as connection:
        cursor = Cursor(at(9), estimate(9))
        await shipment_tracking.save(connection, [row(10, cursor)])
        raw = await connection.fetchrow("SELECT eta, observed_at, observed FROM shipment_tracking")
        assert raw is not None
        eta = json.loads(raw["eta"])
        # What the previous release reads (its keys) and what today's reads agree.
        assert datetime.fromisoformat(eta["observed_at"]) == raw["observed_at"] == at(9)
        assert eta["observed"] == json.loads(raw["observed"]) == statecodec.encode(estimate(9))
        assert await stored(connection) == cursor
        loaded = await shipment_tracking.load_stored(connection, [SHIPMENT])
        assert loaded[("acme", "s1")].eta == row(10, cursor).eta

        # A batch without an ETA keeps the stored ETA and its cursor.
        await shipment_tracking.save(connection, [row(11, Cursor(at(11)), with_eta=False)])
        assert await stored(connection) == cursor

        # The previous release writes the row again (a rollout in progress): its keys
        # hold a later cursor, the columns stay behind; the later one is read.
        later = row(12, Cursor(at(12), estimate(12)))
        assert later.eta is not None
        assert later.cursor is not None
        await connection.execute(
            PREVIOUS_RELEASE_UPSERT,
            ["acme"],
            ["s1"],
            ["v1"],
            [json.dumps(statecodec.encode(later.position))],
            [None],
            [json.dumps(shipment_tracking.encode_eta(later.eta, later.cursor))],
            [json.dumps(statecodec.encode(later.conditions))],
        )
        assert await stored(connection) == later.cursor


async def test_a_row_of_the_previous_release_reads_its_cursor_from_the_eta_keys(
    database_url: str, pg_schema: str, db_pool: asyncpg.Pool
) -> None:
    await migrate(DatabaseSettings(url=database_url, schema=pg_schema))
    async with db_pool.acquire() as connection:
        old = row(20, Cursor(at(19), None))
        assert old.eta is not None
        await connection.execute(
            PREVIOUS_RELEASE_UPSERT,
            ["acme"],
            ["s1"],
            ["v1"],
            [json.dumps(statecodec.encode(old.position))],
            [None],
            [json.dumps(shipment_tracking.encode_eta(old.eta, old.cursor))],
            [json.dumps(statecodec.encode(old.conditions))],
        )
        assert await stored(connection) == Cursor(at(19), None)
        # Without the keys (written before observations had a cursor): after its ETA.
        await connection.execute(
            "UPDATE shipment_tracking SET eta = eta - 'observed_at' - 'observed'"
        )
        assert await stored(connection) == Cursor(at(20), estimate(20))
