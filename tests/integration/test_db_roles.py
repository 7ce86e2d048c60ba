"""The read-only database role of tracking-query, on the session's real PostgreSQL
(issue 12, finding 8): after `migrate`, it reads every table and writes none."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from shared.config import DatabaseSettings, with_password
from shared.db import READ_ONLY_ROLE, migrate

pytestmark = pytest.mark.timeout(60)

PASSWORD = "read-only-test-password"


def as_role(database_url: str, role: str) -> str:
    parts = urlsplit(database_url)
    host = parts.netloc.rpartition("@")[2]
    return with_password(urlunsplit(parts._replace(netloc=f"{role}@{host}")), PASSWORD)


async def test_query_role_reads_and_cannot_write(database_url: str, pg_schema: str) -> None:
    owner = await asyncpg.connect(database_url)
    try:
        # As CloudNativePG's managed roles would (k8s/base/postgres/cluster.yaml).
        await owner.execute(
            f"""DO $$ BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READ_ONLY_ROLE}') THEN
                    CREATE ROLE {READ_ONLY_ROLE} LOGIN PASSWORD '{PASSWORD}';
                END IF;
            END $$"""
        )
    finally:
        await owner.close()
    await migrate(DatabaseSettings(url=database_url, schema=pg_schema))

    reader = await asyncpg.connect(
        as_role(database_url, READ_ONLY_ROLE), server_settings={"search_path": pg_schema}
    )
    try:
        assert await reader.fetchval("SELECT count(*) FROM shipments") == 0
        assert await reader.fetchval("SELECT count(*) FROM vehicle_positions") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.execute("DELETE FROM shipments")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.execute("UPDATE projection_offsets SET last_offset = 0")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.execute("CREATE TABLE intruder (id int)")
    finally:
        await reader.close()
