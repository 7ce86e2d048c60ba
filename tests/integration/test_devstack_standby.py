"""The local PostgreSQL standby: streams, stops streaming when told, takes over when
promoted, and one multi-host URL finds whichever server is the primary."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from devtools.devstack import (
    DevStackError,
    LocalStack,
    PostgresServer,
    PostgresStandby,
    multi_host_dsn,
)
from devtools.devstack.ports import DEFAULT_POSTGRES_PORT
from shared.db import CONNECTION_ERRORS


async def values(server: PostgresServer) -> list[int]:
    connection = await server.connect()
    try:
        return [r["x"] for r in await connection.fetch("SELECT x FROM t ORDER BY x")]
    finally:
        await connection.close()


async def execute(dsn: str, sql: str) -> int:
    """Run `sql` through `dsn`; the port of the server that ran it."""
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.execute(sql)
        return int(await connection.fetchval("SELECT inet_server_port()"))
    finally:
        await connection.close()


async def test_a_standby_streams_then_is_promoted_and_the_url_follows(state_dir: Path) -> None:
    primary = PostgresServer(state_dir / "primary", fsync=False)
    standby = PostgresStandby(state_dir / "standby", primary, fsync=False)
    try:
        with pytest.raises(DevStackError, match="primary PostgreSQL must be running"):
            await standby.start()
        await primary.start()
        await execute(primary.dsn, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        await standby.start()
        assert await standby.in_recovery()
        assert not await primary.in_recovery()
        url = multi_host_dsn([primary, standby])
        assert url.endswith("/postgres?target_session_attrs=read-write")

        # Streaming: a commit after the base backup reaches the standby.
        assert await execute(url, "INSERT INTO t VALUES (2)") == primary.port
        async with asyncio.timeout(30):
            while await values(standby) != [1, 2]:  # noqa: ASYNC110 - polls the standby
                await asyncio.sleep(0.05)
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await execute(standby.dsn, "INSERT INTO t VALUES (99)")

        # Replication stopped: the primary's next commit never reaches the standby.
        await standby.stop_replication()
        await execute(url, "INSERT INTO t VALUES (3)")
        await asyncio.sleep(0.5)
        assert await values(standby) == [1, 2]

        await primary.kill()
        # No host accepts writes: the primary refuses, the standby is read-only.
        with pytest.raises(CONNECTION_ERRORS):
            await execute(url, "SELECT 1")
        await standby.promote()
        assert not await standby.in_recovery()
        # The same URL now writes on the promoted standby, which lacks what it never
        # received (asynchronous replication).
        assert await execute(url, "INSERT INTO t VALUES (4)") == standby.port
        assert await values(standby) == [1, 2, 4]
        with pytest.raises(DevStackError, match="not a standby"):
            await standby.promote()
        # Promoted for good: it starts again as a primary.
        await standby.stop()
        await standby.start()
        assert not await standby.in_recovery()
    finally:
        await standby.stop()
        await primary.stop()


def test_the_dev_stack_adds_a_standby_on_the_next_port_when_asked(tmp_path: Path) -> None:
    plain = LocalStack.for_dev(tmp_path, {})
    assert plain.postgres_standby is None
    stack = LocalStack.for_dev(tmp_path, {"CARGOTRACK_POSTGRES_STANDBY": "1"})
    assert stack.postgres is not None
    assert stack.postgres_standby is not None
    assert stack.postgres_standby.primary is stack.postgres
    assert stack.postgres_standby.port == DEFAULT_POSTGRES_PORT + 1
    assert stack.database_url == (
        f"postgresql://postgres@127.0.0.1:{DEFAULT_POSTGRES_PORT},"
        f"127.0.0.1:{DEFAULT_POSTGRES_PORT + 1}/postgres?target_session_attrs=read-write"
    )
