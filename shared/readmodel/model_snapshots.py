"""The `eta_models` table: versioned speed models, written by the learner, read by the
projector. A version is inserted whole in one statement, so a reader never sees half
a model; a version, once stored, never changes (a replay inserts nothing new)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from shared.db import Connection
from shared.domain.learner import ModelSnapshot, encode_speeds

# The projector's fallback model reads it from here; its SQL is vehicle_positions'.
from shared.readmodel.vehicle_positions import fleet_average_mps as fleet_average_mps


@dataclass(frozen=True)
class StoredModel:
    """One row: a tenant's model version and what it learned from."""

    tenant_id: str
    version: int
    created_at: datetime
    trained_from: datetime | None
    trained_until: datetime
    points: int
    size_bytes: int
    payload: bytes


def _at(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


async def insert_snapshot(
    connection: Connection, tenant_id: str, snapshot: ModelSnapshot, keep: int
) -> bool:
    """Store ``snapshot`` and delete the tenant's versions older than the newest
    ``keep``, in the caller's transaction. Returns False when the version was already
    stored (a replay): the stored one is kept, unchanged."""
    payload = encode_speeds(snapshot.speeds)
    inserted = await connection.fetchval(
        "INSERT INTO eta_models (tenant_id, version, trained_from, trained_until, points,"
        " size_bytes, payload) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (tenant_id, version) DO NOTHING RETURNING 1",
        tenant_id,
        snapshot.version,
        _at(snapshot.trained_from),
        _at(snapshot.trained_until),
        snapshot.points,
        len(payload),
        payload,
    )
    await connection.execute(
        "DELETE FROM eta_models WHERE tenant_id = $1 AND version < ALL ("
        " SELECT version FROM eta_models WHERE tenant_id = $1 ORDER BY version DESC LIMIT $2)",
        tenant_id,
        keep,
    )
    return inserted is not None


async def latest_versions(connection: Connection) -> dict[str, int]:
    """Each tenant's newest stored version."""
    rows = await connection.fetch(
        "SELECT tenant_id, max(version) AS version FROM eta_models GROUP BY tenant_id"
    )
    return {row["tenant_id"]: row["version"] for row in rows}


async def load_model(connection: Connection, tenant_id: str, version: int) -> StoredModel | None:
    """One stored version (None: not stored, or deleted meanwhile)."""
    row = await connection.fetchrow(
        "SELECT tenant_id, version, created_at, trained_from, trained_until, points,"
        " size_bytes, payload FROM eta_models WHERE tenant_id = $1 AND version = $2",
        tenant_id,
        version,
    )
    return None if row is None else StoredModel(**dict(row))


async def versions_of(connection: Connection, tenant_id: str) -> list[StoredModel]:
    """A tenant's stored versions, newest first."""
    rows = await connection.fetch(
        "SELECT tenant_id, version, created_at, trained_from, trained_until, points,"
        " size_bytes, payload FROM eta_models WHERE tenant_id = $1 ORDER BY version DESC",
        tenant_id,
    )
    return [StoredModel(**dict(row)) for row in rows]


async def copy_to_schema(connection: Connection, source: str, target: str) -> None:
    """Copy every row from schema ``source`` into the same (empty) table of schema
    ``target``, in the caller's transaction (used by ``cargotrack rebuild``)."""
    await connection.execute(
        f'INSERT INTO "{target}".eta_models SELECT * FROM "{source}".eta_models'
        " ON CONFLICT DO NOTHING"
    )
