"""Rebuild: replay the log into fresh tables and switch while queries keep answering."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from services.projector.rebuild import rebuild
from shared import tracking_store as store
from shared.db import create_pool
from tests.integration.test_projector import caught_up, running_projection
from tests.projection_helpers import (
    T0,
    fold_log,
    gps_envelope,
    lifecycle,
    prepare,
    producer_for,
    projector_settings,
    send_all,
)


async def test_rebuild_while_queries_run_equals_the_live_state(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    log = []
    for n in range(20):
        log += lifecycle("acme", f"s{n}", f"v{n % 3}", T0 + timedelta(minutes=n))
    for seq in range(1, 11):
        for v in range(3):
            points = [
                (
                    T0 + timedelta(seconds=20 * (seq * 5 + i)),
                    53.40 + 0.001 * seq,
                    -2.99 + 0.0005 * i,
                )
                for i in range(5)
            ]
            log.append(gps_envelope("acme", f"v{v}", "phone", seq, points))
    keys = [("acme", f"s{n}") for n in range(20)]
    answered = 0
    errors: list[BaseException] = []

    async def query_forever() -> None:
        nonlocal answered
        pool = await create_pool(settings.database, min_size=2, max_size=2)
        try:
            while True:
                try:
                    async with pool.acquire() as connection:
                        found = await store.load_shipments(connection, keys)
                    assert len(found) == 20
                    answered += 1
                except AssertionError as error:
                    errors.append(error)
                await asyncio.sleep(0.01)
        finally:
            await pool.close()

    async with producer_for(settings) as producer:
        await send_all(producer, settings, log)
        async with running_projection(settings) as runner:
            await caught_up(runner, settings)
            queries = asyncio.create_task(query_forever())
            try:
                report = await rebuild(settings, switch_lag=0, progress=lambda _line: None)
                more = lifecycle("acme", "late-arrival", "v1", T0 + timedelta(hours=1))
                await send_all(producer, settings, more)
                log += more
                # The live projector moves on the rebuilt tables after the switch.
                await caught_up(runner, settings)
                answered_at_end = answered
            finally:
                queries.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await queries
            pool = await create_pool(settings.database)
            try:
                async with pool.acquire() as connection:
                    expected_shipments, expected_vehicles = fold_log(log)
                    stored = await store.load_shipments(connection, expected_shipments)
                    vehicles = await store.load_vehicles(connection, expected_vehicles)
                    history = await connection.fetchval("SELECT count(*) FROM vehicle_positions")
                    schemas = await connection.fetchval(
                        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1",
                        f"{pg_schema}_%",
                    )
            finally:
                await pool.close()
    assert report.records >= len(log) - 4
    assert stored == expected_shipments
    assert vehicles == expected_vehicles
    assert history == 10 * 3 * 5
    assert schemas == 0  # the old schema was dropped
    assert errors == []
    assert answered_at_end > 0
