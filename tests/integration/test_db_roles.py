"""The read-only database role of tracking-query, on the session's real PostgreSQL
(issue 12, finding 8): after `migrate`, it reads every table and writes none."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from shared.config import DatabaseSettings, with_password
from shared.db import READ_ONLY_ROLE, SchemaBehind, migrate, migrate_or_check

pytestmark = pytest.mark.timeout(60)

PASSWORD = "read-only-test-password"


def as_role(database_url: str, role: str) -> str:
    parts = urlsplit(database_url)
    host = parts.netloc.rpartition("@")[2]
    return with_password(urlunsplit(parts._replace(netloc=f"{role}@{host}")), PASSWORD)


@pytest.fixture
async def query_role(database_url: str) -> str:
    """The read-only role, created as CloudNativePG's managed roles would create it
    (k8s/base/postgres/cluster.yaml); roles are cluster-wide, so it may exist."""
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(
            f"""DO $$ BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READ_ONLY_ROLE}') THEN
                    CREATE ROLE {READ_ONLY_ROLE} LOGIN PASSWORD '{PASSWORD}';
                END IF;
            END $$"""
        )
    finally:
        await owner.close()
    return READ_ONLY_ROLE


async def test_query_role_reads_and_cannot_write(
    database_url: str, pg_schema: str, query_role: str
) -> None:
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

    # tracking-query starts as this role: it only checks the schema is up to date.
    as_query = DatabaseSettings(url=as_role(database_url, READ_ONLY_ROLE), schema=pg_schema)
    assert await migrate_or_check(as_query) == []


async def test_query_role_refuses_a_schema_behind(
    database_url: str, pg_schema: str, query_role: str
) -> None:
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute(f'GRANT USAGE ON SCHEMA "{pg_schema}" TO {READ_ONLY_ROLE}')
    finally:
        await owner.close()
    as_query = DatabaseSettings(url=as_role(database_url, READ_ONLY_ROLE), schema=pg_schema)
    with pytest.raises(SchemaBehind, match="run `cargotrack migrate` first"):
        await migrate_or_check(as_query)
