"""Webhooks in PostgreSQL: the ``webhook_endpoints`` and ``webhook_deliveries`` tables.

services/webhooks is the only writer: its API registers and deletes endpoints; its
consumer inserts the deliveries of each alert in the transaction that stores its
offsets (shared.projection, exactly once per alert and endpoint); its sender claims
due deliveries with a lease, attempts them and records the outcome, fenced by the
lease token. ``cargotrack rebuild`` copies both tables into the rebuilt schema
(`copy_to_schema`). This module is the only one that names the two tables; the rules
(order, backoff) are pure: shared/domain/webhooks.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.db import Connection, as_columns
from shared.domain.webhooks import Pending

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
CANCELLED = "cancelled"
STATUSES = (PENDING, DELIVERED, DEAD, CANCELLED)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A registered endpoint (its secret only where the sender needs it)."""

    webhook_id: str
    tenant_id: str
    url: str
    min_severity: int
    kinds: tuple[int, ...]
    description: str
    created_by: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewDelivery:
    webhook_id: str
    tenant_id: str
    alert_id: str
    shipment_id: str
    kind: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery a sender holds (lease) and attempts now."""

    delivery_id: int
    lease_token: uuid.UUID
    webhook_id: str
    alert_id: str
    shipment_id: str
    attempts: int
    body: bytes
    url: str
    secret: str


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    delivery_id: int
    webhook_id: str
    alert_id: str
    shipment_id: str
    kind: int
    status: str
    attempts: int
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime
    last_status_code: int
    last_error: str


_ENDPOINT_COLUMNS = (
    "webhook_id, tenant_id, url, min_severity, kinds, description, created_by, created_at"
)


def _endpoint(r: Any) -> Endpoint:
    """An Endpoint from an asyncpg record of _ENDPOINT_COLUMNS."""
    return Endpoint(
        webhook_id=r["webhook_id"],
        tenant_id=r["tenant_id"],
        url=r["url"],
        min_severity=r["min_severity"],
        kinds=tuple(r["kinds"]),
        description=r["description"],
        created_by=r["created_by"],
        created_at=r["created_at"],
    )


# --- endpoints --------------------------------------------------------------------------


async def count_endpoints(connection: Connection, tenant_id: str) -> int:
    value = await connection.fetchval(
        "SELECT count(*) FROM webhook_endpoints WHERE tenant_id = $1 AND deleted_at IS NULL",
        tenant_id,
    )
    return int(value or 0)


async def create_endpoint(
    connection: Connection,
    *,
    webhook_id: str,
    tenant_id: str,
    url: str,
    secret: str,
    min_severity: int,
    kinds: Sequence[int],
    description: str,
    created_by: str,
) -> Endpoint:
    row = await connection.fetchrow(
        "INSERT INTO webhook_endpoints"
        " (webhook_id, tenant_id, url, secret, min_severity, kinds, description, created_by)"
        " VALUES ($1, $2, $3, $4, $5, $6::integer[], $7, $8)"
        f" RETURNING {_ENDPOINT_COLUMNS}",
        webhook_id,
        tenant_id,
        url,
        secret,
        min_severity,
        sorted(set(kinds)),
        description,
        created_by,
    )
    return _endpoint(row)


async def list_endpoints(
    connection: Connection, tenant_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[Endpoint]:
    """The tenant's live endpoints, oldest first, after the keyset position `after`."""
    if after is None:
        rows = await connection.fetch(
            f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints"
            " WHERE tenant_id = $1 AND deleted_at IS NULL"
            " ORDER BY created_at, webhook_id LIMIT $2",
            tenant_id,
            limit,
        )
    else:
        rows = await connection.fetch(
            f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints"
            " WHERE tenant_id = $1 AND deleted_at IS NULL AND (created_at, webhook_id) > ($2, $3)"
            " ORDER BY created_at, webhook_id LIMIT $4",
            tenant_id,
            after[0],
            after[1],
            limit,
        )
    return [_endpoint(row) for row in rows]


async def endpoint_exists(connection: Connection, tenant_id: str, webhook_id: str) -> bool:
    """Whether the tenant has (or had: deleted ones keep their log) this endpoint."""
    return bool(
        await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM webhook_endpoints"
            " WHERE tenant_id = $1 AND webhook_id = $2)",
            tenant_id,
            webhook_id,
        )
    )


async def delete_endpoint(connection: Connection, tenant_id: str, webhook_id: str) -> bool:
    """Mark the endpoint deleted and cancel its pending deliveries (the caller's
    transaction); False when the tenant has no such live endpoint."""
    # The secret is never needed again: blank it rather than keep it until pruned.
    deleted = await connection.fetchval(
        "UPDATE webhook_endpoints SET deleted_at = now(), secret = ''"
        " WHERE tenant_id = $1 AND webhook_id = $2 AND deleted_at IS NULL RETURNING 1",
        tenant_id,
        webhook_id,
    )
    if deleted is None:
        return False
    await connection.execute(
        "UPDATE webhook_deliveries SET status = $2, finished_at = now(),"
        " leased_until = NULL, lease_token = NULL"
        " WHERE webhook_id = $1 AND status = $3",
        webhook_id,
        CANCELLED,
        PENDING,
    )
    return True


async def live_endpoints(connection: Connection, tenants: Sequence[str]) -> list[Endpoint]:
    """Every live endpoint of these tenants (the consumer matches alerts against them)."""
    rows = await connection.fetch(
        f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints"
        " WHERE tenant_id = ANY($1::text[]) AND deleted_at IS NULL",
        sorted(set(tenants)),
    )
    return [_endpoint(row) for row in rows]


# --- deliveries -------------------------------------------------------------------------


async def insert_deliveries(connection: Connection, deliveries: Sequence[NewDelivery]) -> int:
    """Record deliveries in the caller's transaction, in the given order (their ids
    increase in it); one already recorded for its (endpoint, alert) is skipped.
    Returns how many were new."""
    if not deliveries:
        return 0
    rows = [
        (d.webhook_id, d.tenant_id, d.alert_id, d.shipment_id, d.kind, d.body) for d in deliveries
    ]
    inserted = await connection.fetch(
        "INSERT INTO webhook_deliveries"
        " (webhook_id, tenant_id, alert_id, shipment_id, kind, body)"
        " SELECT w, t, a, s, k, b FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
        " $5::integer[], $6::bytea[]) WITH ORDINALITY AS r(w, t, a, s, k, b, n)"
        " ORDER BY n"  # ids follow the topic order of the alerts
        " ON CONFLICT (webhook_id, alert_id) DO NOTHING RETURNING 1",
        *as_columns(rows, 6),
    )
    return len(inserted)


async def pending_heads(connection: Connection, limit: int) -> tuple[datetime, list[Pending]]:
    """The database's clock, and up to `limit` due, unleased pending deliveries that
    are the oldest pending one of their (endpoint, shipment), earliest due first: the
    candidates `shared.domain.webhooks.deliverable` picks from (it applies the same
    rule; the query only spares sending it what it would leave)."""
    now = await connection.fetchval("SELECT now()")
    rows = await connection.fetch(
        "SELECT * FROM ("
        " SELECT DISTINCT ON (webhook_id, shipment_id)"
        " delivery_id, webhook_id, shipment_id, next_attempt_at, leased_until"
        " FROM webhook_deliveries WHERE status = $1"
        " ORDER BY webhook_id, shipment_id, delivery_id) AS heads"
        " WHERE next_attempt_at <= $2 AND (leased_until IS NULL OR leased_until <= $2)"
        " ORDER BY next_attempt_at, delivery_id LIMIT $3",
        PENDING,
        now,
        limit,
    )
    return now, [
        Pending(
            delivery_id=r["delivery_id"],
            webhook_id=r["webhook_id"],
            shipment_id=r["shipment_id"],
            next_attempt_at=r["next_attempt_at"],
            leased_until=r["leased_until"],
        )
        for r in rows
    ]


async def claim(
    connection: Connection, delivery_ids: Sequence[int], lease_s: float
) -> list[Claimed]:
    """Lease these deliveries to the caller for lease_s, those still pending and free
    (another sender may have taken some meanwhile); returns what it got."""
    if not delivery_ids:
        return []
    token = uuid.uuid4()
    rows = await connection.fetch(
        "UPDATE webhook_deliveries d"
        " SET leased_until = now() + make_interval(secs => $2), lease_token = $3"
        " FROM webhook_endpoints e"
        " WHERE d.delivery_id = ANY($1::bigint[]) AND d.status = $4"
        " AND (d.leased_until IS NULL OR d.leased_until <= now())"
        " AND e.webhook_id = d.webhook_id AND e.deleted_at IS NULL"
        " RETURNING d.delivery_id, d.webhook_id, d.alert_id, d.shipment_id, d.attempts,"
        " d.body, e.url, e.secret",
        list(delivery_ids),
        lease_s,
        token,
        PENDING,
    )
    claimed = {
        r["delivery_id"]: Claimed(
            delivery_id=r["delivery_id"],
            lease_token=token,
            webhook_id=r["webhook_id"],
            alert_id=r["alert_id"],
            shipment_id=r["shipment_id"],
            attempts=r["attempts"],
            body=bytes(r["body"]),
            url=r["url"],
            secret=r["secret"],
        )
        for r in rows
    }
    return [claimed[i] for i in delivery_ids if i in claimed]


async def record_attempt(
    connection: Connection,
    claimed: Claimed,
    *,
    status: str,
    status_code: int,
    error: str,
    retry_in_s: float,
) -> bool:
    """The outcome of one attempt: `status` DELIVERED or DEAD ends the delivery,
    PENDING schedules the next attempt in retry_in_s. Fenced by the lease: False (and
    nothing written) when the delivery is no longer this sender's (cancelled, or its
    lease ran out and another sender took it)."""
    done = await connection.fetchval(
        "UPDATE webhook_deliveries SET status = $3, attempts = attempts + 1,"
        " last_attempt_at = now(), last_status_code = $4, last_error = $5,"
        " next_attempt_at = now() + make_interval(secs => $6),"
        " finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END,"
        " leased_until = NULL, lease_token = NULL"
        " WHERE delivery_id = $1 AND lease_token = $2 AND status = 'pending' RETURNING 1",
        claimed.delivery_id,
        claimed.lease_token,
        status,
        status_code,
        error[:1000],
        retry_in_s,
    )
    return done is not None


async def release(connection: Connection, claimed: Sequence[Claimed]) -> None:
    """Give up leases without an outcome (a sender stopping mid-attempt): the
    deliveries are due again at once, for any sender (the attempt may have reached the
    endpoint: at least once)."""
    if not claimed:
        return
    await connection.execute(
        "UPDATE webhook_deliveries SET leased_until = NULL, lease_token = NULL"
        " WHERE delivery_id = ANY($1::bigint[]) AND lease_token = ANY($2::uuid[])",
        [c.delivery_id for c in claimed],
        sorted({c.lease_token for c in claimed}),
    )


async def list_deliveries(
    connection: Connection,
    tenant_id: str,
    webhook_id: str,
    statuses: Sequence[str],
    before_id: int | None,
    limit: int,
) -> list[DeliveryRow]:
    """An endpoint's deliveries, newest first, with ids below `before_id` if given."""
    rows = await connection.fetch(
        "SELECT delivery_id, webhook_id, alert_id, shipment_id, kind, status, attempts,"
        " created_at, last_attempt_at, next_attempt_at, last_status_code, last_error"
        " FROM webhook_deliveries"
        " WHERE webhook_id = $1 AND tenant_id = $2"
        " AND (cardinality($3::text[]) = 0 OR status = ANY($3::text[]))"
        " AND ($4::bigint IS NULL OR delivery_id < $4)"
        " ORDER BY delivery_id DESC LIMIT $5",
        webhook_id,
        tenant_id,
        list(statuses),
        before_id,
        limit,
    )
    return [
        DeliveryRow(
            delivery_id=r["delivery_id"],
            webhook_id=r["webhook_id"],
            alert_id=r["alert_id"],
            shipment_id=r["shipment_id"],
            kind=r["kind"],
            status=r["status"],
            attempts=r["attempts"],
            created_at=r["created_at"],
            last_attempt_at=r["last_attempt_at"],
            next_attempt_at=r["next_attempt_at"],
            last_status_code=r["last_status_code"],
            last_error=r["last_error"],
        )
        for r in rows
    ]


async def prune(connection: Connection, retention_days: int) -> tuple[int, int]:
    """Delete deliveries finished more than retention_days ago, then deleted endpoints
    with no delivery left; return how many of each."""
    deliveries = await connection.fetch(
        "DELETE FROM webhook_deliveries WHERE status <> $1"
        " AND finished_at < now() - make_interval(days => $2) RETURNING 1",
        PENDING,
        retention_days,
    )
    endpoints = await connection.fetch(
        "DELETE FROM webhook_endpoints e WHERE deleted_at < now() - make_interval(days => $1)"
        " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.webhook_id = e.webhook_id)"
        " RETURNING 1",
        retention_days,
    )
    return len(deliveries), len(endpoints)


async def copy_to_schema(connection: Connection, source: str, target: str) -> None:
    """Copy both tables from schema ``source`` into the same (empty) tables of schema
    ``target``, in the caller's transaction (``cargotrack rebuild``): webhooks are not
    rebuilt from the log. An outcome the sender records in the old schema after the
    copy is lost, and that delivery is attempted again (at least once)."""
    for table in ("webhook_endpoints", "webhook_deliveries"):
        await connection.execute(
            f'INSERT INTO "{target}".{table} SELECT * FROM "{source}".{table}'
            " ON CONFLICT DO NOTHING"
        )
    await connection.execute(
        "SELECT setval(pg_get_serial_sequence($1, 'delivery_id'),"
        f' coalesce((SELECT max(delivery_id) FROM "{target}".webhook_deliveries), 0) + 1, false)',
        f'"{target}".webhook_deliveries',
    )
