"""The `learner_state` table: each tenant's learner state, saved with the learner's offsets."""

from __future__ import annotations

import json
import zlib
from collections.abc import Collection, Mapping

from shared.db import Connection
from shared.domain.learner import LearnerState, state_from_dict, state_to_dict


def encode_state(state: LearnerState) -> bytes:
    """The stored form: :func:`state_to_dict` as compact JSON, zlib-compressed."""
    text = json.dumps(state_to_dict(state), separators=(",", ":"))
    return zlib.compress(text.encode(), 1)


def decode_state(data: bytes) -> LearnerState:
    """Inverse of :func:`encode_state`."""
    return state_from_dict(json.loads(zlib.decompress(data)))


async def load_states(connection: Connection, tenants: Collection[str]) -> dict[str, LearnerState]:
    """The stored states of ``tenants`` (absent: the tenant has none yet)."""
    rows = await connection.fetch(
        "SELECT tenant_id, state FROM learner_state WHERE tenant_id = ANY($1::text[])",
        sorted(tenants),
    )
    return {row["tenant_id"]: decode_state(row["state"]) for row in rows}


async def save_states(connection: Connection, states: Mapping[str, LearnerState]) -> None:
    """Upsert ``states`` in the caller's transaction."""
    if not states:
        return
    tenants = sorted(states)
    await connection.execute(
        "INSERT INTO learner_state (tenant_id, state)"
        " SELECT * FROM unnest($1::text[], $2::bytea[])"
        " ON CONFLICT (tenant_id) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
        tenants,
        [encode_state(states[t]) for t in tenants],
    )


async def copy_to_schema(connection: Connection, source: str, target: str) -> None:
    """Copy every row from schema ``source`` into the same (empty) table of schema
    ``target``, in the caller's transaction (used by ``cargotrack rebuild``)."""
    await connection.execute(
        f'INSERT INTO "{target}".learner_state SELECT * FROM "{source}".learner_state'
        " ON CONFLICT DO NOTHING"
    )
