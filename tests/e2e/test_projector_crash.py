"""The projector process killed with SIGKILL mid-batch, again and again.

The final PostgreSQL state must equal the pure fold of the log: nothing lost,
nothing applied twice, no duplicate timeline entries.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from devtools.devstack.process import ChildProcess
from shared import tracking_store as store
from shared.db import Connection, create_pool
from shared.projection import wait_caught_up
from tests.projection_helpers import (
    T0,
    end_offsets,
    fold_log,
    gps_envelope,
    lifecycle,
    prepare,
    producer_for,
    projector_settings,
    send_all,
)


async def _all_offsets(connection: Connection) -> dict[TopicPartition, int]:
    rows = await connection.fetch(
        "SELECT topic, partition, last_offset FROM projection_offsets WHERE projection = 'tracking'"
    )
    return {TopicPartition(r["topic"], r["partition"]): r["last_offset"] for r in rows}


def _tail(path: Path) -> str:
    return path.read_text()[-3000:]


def projector_process(env: dict[str, str], log_path: Path) -> ChildProcess:
    return ChildProcess.spawn(
        [sys.executable, "-c", "from services.cli import main; main()", "serve", "projector"],
        name="projector",
        log_path=log_path,
        append_log=True,
        env=env,
    )


@pytest.mark.timeout(300)
async def test_sigkill_mid_batch_loses_nothing_and_applies_nothing_twice(
    kafka_bootstrap: str,
    database_url: str,
    topic_prefix: str,
    pg_schema: str,
    tmp_path: Path,
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    log_path = tmp_path / "projector.log"
    log = []
    for n in range(600):
        log += lifecycle("acme", f"s{n}", f"v{n % 20}", T0 + timedelta(seconds=n))
    for seq in range(1, 41):
        for v in range(20):
            points = [
                (
                    T0 + timedelta(seconds=10 * (seq * 10 + i)),
                    53.40 + 0.0005 * seq,
                    -2.99 + 0.0002 * i,
                )
                for i in range(10)
            ]
            log.append(gps_envelope("acme", f"v{v}", "phone", seq, points))
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "DATABASE_URL": database_url,
        "CARGOTRACK_DB_SCHEMA": pg_schema,
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_TOPIC_PREFIX": topic_prefix,
        "CARGOTRACK_TOPIC_PARTITIONS": "3",
        "CARGOTRACK_GRPC_PORT": "0",
        "CARGOTRACK_LOG_FORMAT": "console",
        # A killed member holds its partitions until its session expires: keep it short.
        "CARGOTRACK_CONSUMER_SESSION_TIMEOUT_MS": "6000",
        # Small transactions, so that a kill lands in the middle of the stream.
        "CARGOTRACK_PROJECTOR_MAX_RECORDS": "20",
    }
    pool = await create_pool(settings.database)
    rng = random.Random(7)
    topics = [
        settings.topics.shipment_events,
        settings.topics.delivery_confirmations,
        settings.topics.gps_points,
    ]

    async def write_log_slowly() -> None:
        async with producer_for(settings) as producer:
            for start in range(0, len(log), 50):
                await send_all(producer, settings, log[start : start + 50])
                await asyncio.sleep(0.01)

    async def _caught_up(stored: dict[TopicPartition, int]) -> bool:
        targets = await end_offsets(settings, topics)
        return stored == {tp: end - 1 for tp, end in targets.items() if end > 0}

    writer = asyncio.create_task(write_log_slowly())
    kills_mid_stream = 0
    try:
        for _ in range(4):
            async with pool.acquire() as connection:
                before = await _all_offsets(connection)
            process = projector_process(env, log_path)
            # Kill it once it has committed a batch of its own (or has nothing left to
            # do), at a random moment after.
            while process.running:
                async with pool.acquire() as connection:
                    stored = await _all_offsets(connection)
                if stored != before or (writer.done() and await _caught_up(stored)):
                    break
                await asyncio.sleep(0.02)
            assert process.running, _tail(log_path)
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            async with pool.acquire() as connection:
                lagging = not await _caught_up(await _all_offsets(connection))
            process.send_signal(signal.SIGKILL)
            await process.kill()
            kills_mid_stream += lagging
        await writer
        targets = await end_offsets(settings, topics)
        process = projector_process(env, log_path)
        try:
            await wait_caught_up(pool, "tracking", targets, timeout_s=90)
            # Its signal handlers exist once it reports ready; then SIGTERM must drain it.
            while "ready" not in _tail(log_path).split("starting projector")[-1]:  # noqa: ASYNC110 - polls a log file
                await asyncio.sleep(0.05)
        finally:
            await process.terminate(signal.SIGTERM, 15)
        assert process.returncode == 0, _tail(log_path)
        async with pool.acquire() as connection:
            expected_shipments, expected_vehicles = fold_log(log)
            stored_shipments = await store.load_shipments(connection, expected_shipments)
            stored_vehicles = await store.load_vehicles(connection, expected_vehicles)
            history = await connection.fetchval("SELECT count(*) FROM vehicle_positions")
            duplicates = await connection.fetchval(
                "SELECT count(*) FROM (SELECT tenant_id, vehicle_id, recorded_at, event_id"
                " FROM vehicle_positions GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d"
            )
    finally:
        writer.cancel()
        await pool.close()
    assert kills_mid_stream >= 2, "the kills did not interrupt the stream"
    assert stored_shipments == expected_shipments
    assert stored_vehicles == expected_vehicles
    for state in stored_shipments.values():
        event_ids = [entry.event_id for entry in state.timeline]
        assert len(event_ids) == len(set(event_ids))
    assert history == 40 * 20 * 10
    assert duplicates == 0
