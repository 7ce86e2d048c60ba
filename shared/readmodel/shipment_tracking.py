"""The `shipment_tracking` table: each active shipment's live position, progress, ETA,
alert conditions and the alert debouncer's cursor (services/projector/live.py).

Columns and their typed rows (shared.readmodel.rows, stored through statecodec):

| column | type | written by |
|---|---|---|
| `position` | `Fix` (stored as `Position` was) | the projector, every batch the vehicle moved |
| `progress` | `Progress` | the projector; kept when a batch computes none |
| `eta` | `EtaRow` (what the API shows, plus the model's estimate) | as `progress` |
| `conditions` | `AlertConditions` (debounce state) | the projector; the stale scan: `stale_since` |
| `observed_at`, `observed` | `Cursor` (the last observation; see `SAME_AS_MODEL`) | with `eta` |

The cursor has its own columns since migration 016. Before, it lived in the `eta`
jsonb as the keys `observed_at` and `observed`. Expand/contract: this release still
writes those keys too (so the previous release, reading only them, decides the
same after a rollback) and reads whichever of the column and the keys is later (a
previous-release projector may have written the row since). The contract step, a
later release, stops writing the keys once no previous release reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from shared import statecodec
from shared.db import Connection, as_columns
from shared.domain.alerts import AlertConditions
from shared.domain.eta import EtaEstimate
from shared.domain.geo import Fix
from shared.domain.tracking import MOVING, ShipmentState
from shared.readmodel.rows import (
    Cursor,
    EtaRow,
    Progress,
    ShipmentKey,
    StaleCandidate,
    StoredTracking,
    TrackingRow,
    TrackingView,
)

#: The keys of the `eta` jsonb that held the cursor before migration 016.
LEGACY_CURSOR_KEYS = ("observed_at", "observed")
#: The `observed` column's value when the last observation's estimate is the ETA's own
#: (`eta.model`; the usual case: the newest record was observed), so that estimate is
#: stored and decoded once. Any other value is an encoded EtaEstimate (a JSON object).
SAME_AS_MODEL = "model"


def encode_eta(eta: EtaRow, cursor: Cursor | None) -> dict[str, Any]:
    """The stored `eta` jsonb: the row, plus (expand phase) the cursor's legacy keys."""
    data: dict[str, Any] = statecodec.encode(eta)
    if cursor is not None:
        data["observed_at"] = cursor.observed_at.isoformat()
        # Usually the ETA shown is the last observation's: encode it once.
        same = cursor.observed is eta.model
        data["observed"] = data["model"] if same else statecodec.encode(cursor.observed)
    return data


def decode_cursor(
    eta: Mapping[str, Any] | None,
    observed_at: datetime | None,
    observed: Any,
    decoded: EtaRow | None = None,
) -> Cursor | None:
    """The debouncer's cursor of a stored row: the later of the columns (`observed_at`,
    `observed` as decoded jsonb, see SAME_AS_MODEL) and the `eta` jsonb's legacy keys.

    A row with an ETA but neither (written before observations had a cursor, or
    before the shipment's first observation) continues after its ETA: that ETA was
    the last thing the debouncer could have seen, so the past is never re-observed.
    `decoded`: `eta` already decoded, if the caller has it (saves decoding it again).
    """
    legacy_at = None
    if eta and eta.get("observed_at"):
        legacy_at = datetime.fromisoformat(eta["observed_at"])
    found: Cursor | None = None
    # Decode only the estimate that is read (decoding one is most of the cost).
    if observed_at is not None and (legacy_at is None or observed_at >= legacy_at):
        if observed == SAME_AS_MODEL:
            if decoded is None:
                decoded = statecodec.decode_as(EtaRow, eta)
            found = Cursor(observed_at, decoded.model)
        else:
            found = Cursor(observed_at, statecodec.decode_as(EtaEstimate, observed))
    elif legacy_at is not None:
        assert eta is not None
        found = Cursor(legacy_at, statecodec.decode_as(EtaEstimate, eta.get("observed")))
    if found is None and eta and eta.get("computed_at"):
        if decoded is None:
            decoded = statecodec.decode_as(EtaRow, eta)
        assert decoded.computed_at is not None
        found = Cursor(decoded.computed_at, decoded.model)
    return found


def _json(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


async def load_stored(
    connection: Connection, shipments: Sequence[ShipmentState]
) -> dict[ShipmentKey, StoredTracking]:
    """The stored tracking rows of `shipments`, for the projector (absent: none yet)."""
    if not shipments:
        return {}
    rows = await connection.fetch(
        "SELECT t.tenant_id, t.shipment_id, t.conditions, t.eta, t.observed_at, t.observed"
        " FROM shipment_tracking t"
        " JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, shipment_id)"
        " USING (tenant_id, shipment_id)",
        [s.tenant_id for s in shipments],
        [s.shipment_id for s in shipments],
    )
    return {(row["tenant_id"], row["shipment_id"]): stored_of(row) for row in rows}


def stored_of(row: asyncpg.Record | Mapping[str, Any]) -> StoredTracking:
    """A row's `conditions`, `eta`, `observed_at` and `observed` columns (jsonb as text),
    decoded (see `columns_of` for the other direction)."""
    eta = _json(row["eta"])
    shown = statecodec.decode_as(EtaRow, eta) if eta else None
    return StoredTracking(
        statecodec.decode_as(AlertConditions, json.loads(row["conditions"])),
        shown,
        decode_cursor(eta, row["observed_at"], _json(row["observed"]), shown),
    )


def columns_of(row: TrackingRow) -> dict[str, Any]:
    """The row's columns as `save` writes them (jsonb as text): `tenant_id`,
    `shipment_id`, `vehicle_id`, `position`, `progress`, `eta`, `conditions`,
    `observed_at`, `observed`; None for `progress` and `eta` keeps the stored ones."""
    cursor = row.cursor if row.eta is not None else None
    eta = encode_eta(row.eta, cursor) if row.eta is not None else None
    observed: Any = None
    if row.eta is not None and cursor is not None and cursor.observed is not None:
        assert eta is not None
        observed = SAME_AS_MODEL if cursor.observed is row.eta.model else eta["observed"]
    return {
        "tenant_id": row.tenant_id,
        "shipment_id": row.shipment_id,
        "vehicle_id": row.vehicle_id,
        "position": json.dumps(statecodec.encode(row.position)),
        "progress": json.dumps(statecodec.encode(row.progress)) if row.progress else None,
        "eta": json.dumps(eta) if eta is not None else None,
        "conditions": json.dumps(statecodec.encode(row.conditions)),
        "observed_at": cursor.observed_at if cursor else None,
        "observed": json.dumps(observed) if observed is not None else None,
    }


async def save(connection: Connection, rows: Sequence[TrackingRow]) -> None:
    """Upsert the projector's rows (at most one per shipment) in one statement.

    A row without progress or ETA keeps the stored ones; the cursor goes with the
    ETA (kept with it, replaced with it)."""
    if not rows:
        return
    columns = [tuple(columns_of(row).values()) for row in rows]
    await connection.execute(
        "INSERT INTO shipment_tracking (tenant_id, shipment_id, vehicle_id, position,"
        " progress, eta, conditions, observed_at, observed) SELECT * FROM unnest($1::text[],"
        " $2::text[], $3::text[], $4::jsonb[], $5::jsonb[], $6::jsonb[], $7::jsonb[],"
        " $8::timestamptz[], $9::jsonb[])"
        " ON CONFLICT (tenant_id, shipment_id) DO UPDATE SET"
        " vehicle_id = EXCLUDED.vehicle_id, position = EXCLUDED.position,"
        " progress = coalesce(EXCLUDED.progress, shipment_tracking.progress),"
        " eta = coalesce(EXCLUDED.eta, shipment_tracking.eta),"
        " observed_at = CASE WHEN EXCLUDED.eta IS NULL THEN shipment_tracking.observed_at"
        " ELSE EXCLUDED.observed_at END,"
        " observed = CASE WHEN EXCLUDED.eta IS NULL THEN shipment_tracking.observed"
        " ELSE EXCLUDED.observed END,"
        " conditions = EXCLUDED.conditions, updated_at = now()",
        *as_columns(columns, 9),
    )


def view_of(row: asyncpg.Record | Mapping[str, Any]) -> TrackingView | None:
    """The tracking columns (`position`, `progress`, `eta` as jsonb text) of a query row
    as the API sees them; None when the shipment has no tracking yet."""
    position, progress, eta = (_json(row[name]) for name in ("position", "progress", "eta"))
    if position is None and progress is None and eta is None:
        return None
    return TrackingView(
        statecodec.decode_as(Fix, position) if position else None,
        statecodec.decode_as(Progress, progress) if progress else None,
        statecodec.decode_as(EtaRow, eta) if eta else None,
    )


async def stale_candidates(
    connection: Connection, seen_before: datetime, limit: int
) -> list[StaleCandidate]:
    """Up to `limit` moving shipments (shared.domain.tracking.MOVING) whose tracking
    position was recorded at or before `seen_before` and not yet marked stale for
    that position, claimed FOR UPDATE SKIP LOCKED (a row being written now is looked
    at again next scan), in key order."""
    rows = await connection.fetch(
        "SELECT t.tenant_id, t.shipment_id, t.position, t.conditions, s.state"
        " FROM shipment_tracking t JOIN shipments s USING (tenant_id, shipment_id)"
        " WHERE s.status = ANY($1::smallint[])"
        " AND (t.position->>'recorded_at')::timestamptz <= $2"
        # Already raised for this position: skip (observe_silence would too).
        " AND (t.conditions->>'stale_since') IS DISTINCT FROM t.position->>'recorded_at'"
        " ORDER BY t.tenant_id, t.shipment_id"
        " LIMIT $3 FOR UPDATE OF t SKIP LOCKED",
        sorted(MOVING),
        seen_before,
        limit,
    )
    return [
        StaleCandidate(
            row["tenant_id"],
            row["shipment_id"],
            statecodec.decode_as(Fix, json.loads(row["position"])),
            statecodec.decode_as(AlertConditions, json.loads(row["conditions"])),
            statecodec.decode_as(ShipmentState, json.loads(row["state"])),
        )
        for row in rows
    ]


async def mark_stale(connection: Connection, marks: Iterable[tuple[str, str, str]]) -> None:
    """Write only the `stale_since` key of the conditions of (tenant, shipment,
    stale_since): the projection's debounce counters are never overwritten."""
    await connection.executemany(
        "UPDATE shipment_tracking SET"
        " conditions = jsonb_set(conditions, '{stale_since}', to_jsonb($3::text))"
        " WHERE tenant_id = $1 AND shipment_id = $2",
        list(marks),
    )
