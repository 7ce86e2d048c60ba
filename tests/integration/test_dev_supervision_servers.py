"""`cargotrack dev`'s supervisor on a real PostgreSQL: a crashed server is reported,
restarted on its port with its data (crash recovery), and usable again."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import asyncpg
import pytest

from devtools.devstack import PostgresServer
from devtools.launcher import StackServer
from devtools.supervisor import Event, Exited, Restarted, RestartPolicy, Supervisor


@pytest.mark.timeout(120)
async def test_a_killed_postgresql_is_reported_and_restarted_with_its_data(
    state_dir: Path,
) -> None:
    server = PostgresServer(state_dir / "postgres", fsync=False)
    events: list[Event] = []
    restarted = asyncio.Event()

    def seen(event: Event) -> None:
        events.append(event)
        if isinstance(event, Restarted):
            restarted.set()

    await server.start()
    try:
        connection = await asyncpg.connect(server.dsn)
        await connection.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        await connection.close()
        first_pid = server.pid
        assert first_pid is not None
        unit = StackServer("postgresql", server)
        async with Supervisor([unit], RestartPolicy(), seen) as supervisor:
            os.kill(first_pid, signal.SIGKILL)
            async with asyncio.timeout(90):
                await restarted.wait()
            exited = events[0]
            assert isinstance(exited, Exited)
            assert exited.name == "postgresql"
            assert exited.how == "signal SIGKILL"
            assert exited.log_path == server.log_path
            assert server.pid not in (None, first_pid)
            assert supervisor.statuses()[0].restarts == 1
            connection = await asyncpg.connect(server.dsn)
            assert await connection.fetchval("SELECT x FROM kept") == 7
            await connection.close()
    finally:
        await server.stop()
    assert not server.running
