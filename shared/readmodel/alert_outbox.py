"""The `alert_outbox` table: alerts decided in a projection transaction, published to
Kafka afterwards by the relay (services/projector/outbox.py), in decision order."""

from __future__ import annotations

from collections.abc import Sequence

from shared.db import Connection
from shared.readmodel.rows import OutboxAlert, UnpublishedAlert


async def insert(connection: Connection, alerts: Sequence[OutboxAlert]) -> list[str]:
    """Insert in the given order, in the caller's transaction; return the ids that were
    new. Idempotent by alert id: an alert decided again inserts nothing."""
    if not alerts:
        return []
    inserted = await connection.fetch(
        "INSERT INTO alert_outbox (alert_id, tenant_id, shipment_id, payload)"
        " SELECT a, t, s, p FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])"
        " WITH ORDINALITY AS u(a, t, s, p, n) ORDER BY n"  # ids in decision order
        " ON CONFLICT (alert_id) DO NOTHING RETURNING alert_id",
        [a.alert_id for a in alerts],
        [a.tenant_id for a in alerts],
        [a.shipment_id for a in alerts],
        [a.payload for a in alerts],
    )
    return [row["alert_id"] for row in inserted]


async def try_lock_relay(connection: Connection) -> bool:
    """Take the schema's relay lock for the caller's transaction; False: another relay
    holds it (one batch is published at a time, so alerts keep their order)."""
    mine: bool = await connection.fetchval(
        "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.alert_outbox'))"
    )
    return mine


async def claim_unpublished(connection: Connection, limit: int) -> list[UnpublishedAlert]:
    """The oldest `limit` unpublished alerts in outbox order, locked FOR UPDATE."""
    rows = await connection.fetch(
        "SELECT id, alert_id, tenant_id, shipment_id, payload, created_at"
        " FROM alert_outbox WHERE published_at IS NULL ORDER BY id"
        " LIMIT $1 FOR UPDATE",
        limit,
    )
    return [
        UnpublishedAlert(
            row["id"],
            row["alert_id"],
            row["tenant_id"],
            row["shipment_id"],
            row["payload"],
            row["created_at"],
        )
        for row in rows
    ]


async def mark_published(connection: Connection, ids: Sequence[int]) -> None:
    await connection.execute(
        "UPDATE alert_outbox SET published_at = now() WHERE id = ANY($1::bigint[])", list(ids)
    )


async def carry_publication(connection: Connection, source: str, target: str) -> None:
    """In schema `target` (a rebuild), mark published every alert that schema `source`
    (the live projection) published or does not hold, in the caller's transaction: a
    rebuild never re-announces the past, and what the live outbox still owes stays owed."""
    await connection.execute(
        f'UPDATE "{target}".alert_outbox n SET published_at ='
        f' coalesce((SELECT o.published_at FROM "{source}".alert_outbox o'
        "   WHERE o.alert_id = n.alert_id), now())"
        " WHERE n.published_at IS NULL AND NOT EXISTS ("
        f'   SELECT 1 FROM "{source}".alert_outbox o'
        "   WHERE o.alert_id = n.alert_id AND o.published_at IS NULL)"
    )
