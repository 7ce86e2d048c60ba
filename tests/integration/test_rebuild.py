"""Rebuild: replay the log into fresh tables and switch while queries keep answering."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from services.projector.rebuild import rebuild
from shared import tracking_store as store
from shared.db import create_pool
from shared.projection import load_offsets
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


@contextlib.asynccontextmanager
async def everything_notified(database_url: str, channel: str) -> AsyncIterator[asyncio.Event]:
    """An event set when `channel` carries the payload "*" (every shipment changed)."""
    seen = asyncio.Event()
    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(
            channel, lambda _c, _pid, _channel, payload: seen.set() if payload == "*" else None
        )
        yield seen
    finally:
        await listener.close()


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
                answered_before = answered
                # A batch in flight across the switch: the live projector fetches a GPS
                # record but cannot commit it (its batch lock is held here) until the
                # rebuild has applied that record too and switched. The live projector's
                # offsets are then behind the rebuilt ones: its commit must be fenced
                # (roll back, re-seek). The folds are idempotent (a GPS record applied
                # again adds no points), so the data cannot show a second application:
                # the refused commit itself is asserted.
                in_flight = gps_envelope(
                    "acme",
                    "v2",
                    "phone",
                    11,
                    [
                        (T0 + timedelta(minutes=30, seconds=20 * i), 53.412, -2.99 + 0.0005 * i)
                        for i in range(5)
                    ],
                )
                async with runner.batch_lock:
                    expected_before = dict(runner.expected)
                    await send_all(producer, settings, [in_flight])
                    log.append(in_flight)
                    channel = f"{pg_schema}.shipment_changed"
                    async with everything_notified(database_url, channel) as switched:
                        report = await rebuild(settings, switch_lag=0, progress=lambda _line: None)
                        # tracking-query is told that every shipment may have changed.
                        await asyncio.wait_for(switched.wait(), 30)
                    async with runner.pool.acquire() as connection:
                        rebuilt_offsets = await load_offsets(
                            connection, "tracking", list(expected_before)
                        )
                # Only the in-flight record's partition moved past the live projector.
                moved = {
                    tp for tp, offset in rebuilt_offsets.items() if offset != expected_before[tp]
                }
                assert [tp.topic for tp in moved] == [settings.topics.gps_points]
                # The rebuilt tables hold the record already: wait for the live projector
                # to have dealt with its batch, then see how.
                async with asyncio.timeout(30):
                    while runner.expected != rebuilt_offsets:  # noqa: ASYNC110 - polls the runner
                        await asyncio.sleep(0.01)
                # Its commit was refused once, and it resumed from the rebuilt offsets.
                assert runner.stats.conflicts == 1, "the live projector was not fenced"
                answered_at_switch = answered
                more = lifecycle("acme", "late-arrival", "v1", T0 + timedelta(hours=1))
                # GPS after the switch: v1 drives the new shipment (in transit since +3 min).
                last_fix = (T0 + timedelta(hours=1, minutes=10, seconds=80), 53.405, -2.98)
                more.append(
                    gps_envelope(
                        "acme",
                        "v1",
                        "phone",
                        11,
                        [
                            (
                                last_fix[0] - timedelta(seconds=20 * (4 - i)),
                                53.405,
                                -2.982 + 0.0005 * i,
                            )
                            for i in range(5)
                        ],
                    )
                )
                await send_all(producer, settings, more)
                log += more
                # The live projector moves on the rebuilt tables after the switch.
                await caught_up(runner, settings)
                # Queries answer after the switch too (not only before it).
                async with asyncio.timeout(30):
                    while answered <= answered_at_switch:  # noqa: ASYNC110 - polls a counter
                        await asyncio.sleep(0.01)
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
                    tracked = await connection.fetchrow(
                        "SELECT vehicle_id, position FROM shipment_tracking"
                        " WHERE shipment_id = 'late-arrival'"
                    )
                    schemas = await connection.fetchval(
                        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1",
                        f"{pg_schema}_%",
                    )
            finally:
                await pool.close()
    assert report.records >= len(log) - len(more)  # more: written after the rebuild
    assert stored == expected_shipments
    assert vehicles == expected_vehicles
    # Every point once, the in-flight record's too.
    assert history == 10 * 3 * 5 + 5 + 5
    assert schemas == 0  # the old schema was dropped
    assert errors == []
    # Queries ran while the rebuild ran (before the switch) and after it.
    assert answered_at_switch > answered_before
    assert answered_at_end > answered_at_switch
    # The post-switch GPS is tracked on the rebuilt tables: written out by hand.
    assert tracked is not None, "no live tracking for the shipment created after the switch"
    assert tracked["vehicle_id"] == "v1"
    position = json.loads(tracked["position"])
    assert (position["lat"], position["lon"]) == pytest.approx((53.405, -2.98), abs=1e-9)
