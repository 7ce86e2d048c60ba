"""The `eta_history` table: every ETA the projector computed, keyed by the position time
it was computed at (read back for accuracy by shared.readmodel.eta_scores)."""

from __future__ import annotations

from collections.abc import Sequence

from shared.db import Connection, as_columns
from shared.readmodel.rows import EtaHistoryRow


async def save(connection: Connection, rows: Sequence[EtaHistoryRow]) -> None:
    """Upsert in one statement. A key could only repeat within `rows` if two estimates
    shared a position time: the last one wins, as row-by-row upserts would."""
    if not rows:
        return
    latest = {
        (r.tenant_id, r.shipment_id, r.position_at): (
            r.tenant_id,
            r.shipment_id,
            r.position_at,
            r.computed_at,
            r.estimated_arrival,
            r.remaining_m,
            r.method,
            r.model_version,
        )
        for r in rows
    }
    await connection.execute(
        "INSERT INTO eta_history (tenant_id, shipment_id, position_at, computed_at,"
        " estimated_arrival, remaining_m, method, model_version) SELECT * FROM"
        " unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],"
        " $5::timestamptz[], $6::float8[], $7::smallint[], $8::bigint[])"
        " ON CONFLICT (tenant_id, shipment_id, position_at) DO UPDATE SET"
        " computed_at = EXCLUDED.computed_at,"
        " estimated_arrival = EXCLUDED.estimated_arrival,"
        " remaining_m = EXCLUDED.remaining_m, method = EXCLUDED.method,"
        " model_version = EXCLUDED.model_version",
        *as_columns(list(latest.values()), 8),
    )
