"""The `shipments` table: each shipment's folded state (shared.domain.tracking.ShipmentState).

The projector writes through `save_shipments`; everyone else reads through the
functions here. Every statement takes an open connection: the caller owns the
transaction. The query service's reads join `shipment_tracking` (the shipment's
live tracking, decoded by shared.readmodel.shipment_tracking.view_of).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from shared import statecodec
from shared.db import Connection, as_columns
from shared.domain.tracking import ACTIVE, ShipmentState
from shared.readmodel.rows import Assignment, ShipmentKey, VehicleKey


async def load_shipments(
    connection: Connection, keys: Iterable[ShipmentKey]
) -> dict[ShipmentKey, ShipmentState]:
    """The stored states of the given shipments; absent keys have none yet."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    rows = await connection.fetch(
        "SELECT t.state FROM shipments t"
        " JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, shipment_id)"
        " USING (tenant_id, shipment_id)",
        [k[0] for k in wanted],
        [k[1] for k in wanted],
    )
    states = (statecodec.decode_as(ShipmentState, json.loads(r["state"])) for r in rows)
    return {(s.tenant_id, s.shipment_id): s for s in states}


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


async def active_shipments_of(
    connection: Connection, vehicles: Iterable[VehicleKey]
) -> dict[VehicleKey, list[ShipmentState]]:
    """Shipments currently travelling with each vehicle (shared.domain.tracking.ACTIVE)."""
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
        sorted(ACTIVE),
    )
    found: dict[VehicleKey, list[ShipmentState]] = {}
    for row in rows:
        state = statecodec.decode_as(ShipmentState, json.loads(row["state"]))
        found.setdefault((state.tenant_id, state.vehicle_id), []).append(state)
    return found


async def status_counts(connection: Connection, tenant_id: str) -> dict[int, int]:
    """How many of the tenant's shipments are in each status (statuses with none absent)."""
    rows = await connection.fetch(
        "SELECT status, count(*) AS n FROM shipments WHERE tenant_id = $1 GROUP BY status",
        tenant_id,
    )
    return {row["status"]: row["n"] for row in rows}


# --- the query service's reads: a shipment with its live tracking -------------------

#: Columns of every query read: `state`, `updated_at` and the tracking columns that
#: shared.readmodel.shipment_tracking.view_of decodes.
SELECT_WITH_TRACKING = (
    "SELECT s.state, s.updated_at, t.position, t.progress, t.eta"
    " FROM shipments s LEFT JOIN shipment_tracking t USING (tenant_id, shipment_id)"
)


async def fetch_with_tracking(
    connection: Connection, tenant_id: str, shipment_id: str, customer_id: str | None = None
) -> asyncpg.Record | None:
    """The row of one shipment and its tracking; with `customer_id`, only if it is that
    customer's."""
    if customer_id is None:
        return await connection.fetchrow(
            SELECT_WITH_TRACKING + " WHERE s.tenant_id = $1 AND s.shipment_id = $2",
            tenant_id,
            shipment_id,
        )
    return await connection.fetchrow(
        SELECT_WITH_TRACKING
        + " WHERE s.tenant_id = $1 AND s.shipment_id = $2 AND s.customer_id = $3",
        tenant_id,
        shipment_id,
        customer_id,
    )


async def fetch_by_tracking_token(connection: Connection, token: str) -> asyncpg.Record | None:
    """The row of the shipment whose public tracking token is `token`, in any tenant."""
    return await connection.fetchrow(SELECT_WITH_TRACKING + " WHERE s.tracking_token = $1", token)


async def fetch_page(
    connection: Connection,
    tenant_id: str,
    *,
    customer_ids: Sequence[str] = (),
    statuses: Sequence[int] = (),
    updated_since: datetime | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int,
) -> list[asyncpg.Record]:
    """Up to `limit` rows of the tenant, newest change first (updated_at DESC,
    shipment_id DESC), strictly after `after` (updated_at, shipment_id); each of
    `customer_ids` must match (a scope's and a filter's), `statuses` empty: any.

    Served by the index shipments_by_update (tenant_id, updated_at DESC,
    shipment_id DESC): the cursor is a row comparison on its columns, so a page
    costs the same however deep it is. The only text assembled at run time is the
    choice among these fixed conditions.
    """
    args: list[Any] = [tenant_id]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    conditions = ["s.tenant_id = $1"]
    for customer_id in customer_ids:
        conditions.append(f"s.customer_id = {arg(customer_id)}")
    if statuses:
        conditions.append(f"s.status = ANY({arg(list(statuses))}::smallint[])")
    if updated_since is not None:
        conditions.append(f"s.updated_at >= {arg(updated_since)}")
    if after is not None:
        conditions.append(f"(s.updated_at, s.shipment_id) < ({arg(after[0])}, {arg(after[1])})")
    sql = (
        f"{SELECT_WITH_TRACKING} WHERE {' AND '.join(conditions)}"
        f" ORDER BY s.updated_at DESC, s.shipment_id DESC LIMIT {arg(limit)}"
    )
    return list(await connection.fetch(sql, *args))
