"""The projector process killed with SIGKILL mid-batch, again and again.

The final PostgreSQL state must equal the pure fold of the log: nothing lost,
nothing applied twice, no duplicate timeline entries. The live tracking the
projector decides in the same transactions (`alert_outbox`, `shipment_tracking`,
`eta_history`) must equal, row by row and field by field, what a second projector
process, with the same settings but the default batch size, writes into a schema of
its own from the same log without any crash, and both must match what is derived by
hand from the data (one tracking row per shipment at its vehicle's last fix, one ETA
observation per GPS record, the LATE alerts the tight windows must raise).

The stale-tracking scan is the one alert decided by the wall clock, and the
log's fixes lie days in the past: both processes run with
`CARGOTRACK_STALE_AFTER_MIN` far beyond the data's age (the documented setting,
as the benchmark does), so the scan finds nothing in either. The scan is then run
once on each schema with an injected clock (`StaleScanner(clock=...)`), which
makes its decisions comparable too.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition
from google.protobuf import json_format

from devtools.devstack.process import ChildProcess
from services.projector.stale import StaleScanner
from shared import tracking_store as store
from shared.db import Connection, create_pool
from shared.pb import alerts_pb2
from shared.projection import wait_caught_up
from tests.projection_helpers import (
    T0,
    end_offsets,
    fold_log,
    fresh_schema,
    gps_envelope,
    lifecycle,
    prepare,
    producer_for,
    projector_settings,
    send_all,
)

#: GPS starts after every shipment was assigned (the last at T0 + 599 s + 1 min): then
#: every GPS record is observed for each shipment its vehicle carries, in whatever
#: order the topics are consumed (services/projector/live.py). Were a record older than
#: an assignment, the ETA shown at it would depend on which topic was read first.
GPS_START = T0 + timedelta(minutes=20)
RECORDS_PER_VEHICLE = 40
POINTS_PER_RECORD = 10
VEHICLES = 20
SHIPMENTS = 600


def record_time(seq: int) -> datetime:
    """The newest fix of a vehicle's GPS record `seq` (1-based)."""
    return GPS_START + timedelta(seconds=10 * (seq * 10 + POINTS_PER_RECORD - 1))


def window_h(n: int) -> float:
    """Every fourth shipment promises delivery within 30 minutes of its creation; the
    vehicles crawl (about 0.4 m/s) from 20 minutes after it, so its ETA is far past
    that window and it must raise LATE. The others' 12 hours are never at risk."""
    return 0.5 if n % 4 == 0 else 12.0


#: 10^8 minutes (190 years), far beyond the age of the log's fixes (T0 is fixed): the stale
#: scan never finds a silence.
STALE_NEVER_MIN = "100000000"


async def _all_offsets(connection: Connection) -> dict[TopicPartition, int]:
    rows = await connection.fetch(
        "SELECT topic, partition, last_offset FROM projection_offsets WHERE projection = 'tracking'"
    )
    return {TopicPartition(r["topic"], r["partition"]): r["last_offset"] for r in rows}


def _tail(path: Path) -> str:
    return path.read_text()[-3000:]


@pytest.fixture
async def reference_schema(database_url: str) -> AsyncIterator[str]:
    """A second fresh schema, for the projector run without a crash."""
    async with fresh_schema(database_url) as name:
        yield name


Rows = dict[tuple[Any, ...], dict[str, Any]]


def _json(value: str | None) -> Any:
    return json.loads(value) if value is not None else None


async def live_tables(connection: Connection) -> dict[str, Rows]:
    """The live-tracking tables, keyed, every column but the times of processing.

    Left out: `alert_outbox.id` (an identity: a rolled-back batch consumes values),
    `alert_outbox.created_at` and `published_at`, `shipment_tracking.updated_at` (the
    wall clock of the write). Everything else, including every field of the alert
    payload and of the JSON columns, is compared.
    """
    outbox = {
        (r["alert_id"],): {
            "tenant_id": r["tenant_id"],
            "shipment_id": r["shipment_id"],
            "payload": json_format.MessageToDict(alerts_pb2.Alert.FromString(r["payload"])),
        }
        for r in await connection.fetch(
            "SELECT alert_id, tenant_id, shipment_id, payload FROM alert_outbox"
        )
    }
    tracking = {
        (r["tenant_id"], r["shipment_id"]): {
            "vehicle_id": r["vehicle_id"],
            "position": _json(r["position"]),
            "progress": _json(r["progress"]),
            "eta": _json(r["eta"]),
            "conditions": _json(r["conditions"]),
        }
        for r in await connection.fetch(
            "SELECT tenant_id, shipment_id, vehicle_id, position, progress, eta, conditions"
            " FROM shipment_tracking"
        )
    }
    history = {
        (r["tenant_id"], r["shipment_id"], r["position_at"]): {
            "computed_at": r["computed_at"],
            "estimated_arrival": r["estimated_arrival"],
            "remaining_m": r["remaining_m"],
            "method": r["method"],
            "model_version": r["model_version"],
        }
        for r in await connection.fetch("SELECT * FROM eta_history")
    }
    return {"alert_outbox": outbox, "shipment_tracking": tracking, "eta_history": history}


def _flat(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{path}.{key}" if path else str(key)))
        return flat or {path: {}}
    return {path: value}


def differences(table: str, got: Rows, want: Rows) -> list[str]:
    """Every row missing, extra or differing, and in the latter every differing field."""
    found = []
    for key in sorted(want.keys() - got.keys(), key=repr):
        found.append(f"{table} {key}: missing after the crashes")
    for key in sorted(got.keys() - want.keys(), key=repr):
        found.append(f"{table} {key}: extra after the crashes: {got[key]}")
    for key in sorted(got.keys() & want.keys(), key=repr):
        mine, theirs = _flat(got[key]), _flat(want[key])
        for field in sorted(mine.keys() | theirs.keys()):
            if mine.get(field, "<absent>") != theirs.get(field, "<absent>"):
                found.append(
                    f"{table} {key} {field}: {mine.get(field, '<absent>')!r}"
                    f" after the crashes, {theirs.get(field, '<absent>')!r} without"
                )
    return found


def assert_same(got: dict[str, Rows], want: dict[str, Rows]) -> None:
    found = [line for table in want for line in differences(table, got[table], want[table])]
    assert not found, f"{len(found)} difference(s):\n" + "\n".join(found[:30])


def by_hand(tables: dict[str, Rows], run: str) -> None:
    """What the data implies, derived by hand: every shipment tracked at its vehicle's
    last fix, one ETA observation per GPS record (all come after its assignment, 100 s
    apart), LATE once for each tight window (a replay decides the same alert id) and no
    other alert (no stale alert: the scan found no silence)."""
    last_fix = record_time(RECORDS_PER_VEHICLE)
    shipments = {("acme", f"s{n}"): f"v{n % VEHICLES}" for n in range(SHIPMENTS)}
    tracking = tables["shipment_tracking"]
    assert {key: row["vehicle_id"] for key, row in tracking.items()} == shipments, run
    positions = {datetime.fromisoformat(r["position"]["recorded_at"]) for r in tracking.values()}
    assert positions == {last_fix}, run
    observed: dict[tuple[str, str], list[datetime]] = {}
    for tenant, shipment, position_at in tables["eta_history"]:
        observed.setdefault((tenant, shipment), []).append(position_at)
    record_times = [record_time(seq) for seq in range(1, RECORDS_PER_VEHICLE + 1)]
    wrong = {key for key in shipments if sorted(observed.get(key, [])) != record_times}
    assert not wrong, f"{run}: {len(wrong)} shipment(s) without one ETA per GPS record"
    late = {
        (row["tenant_id"], row["shipment_id"])
        for row in tables["alert_outbox"].values()
        if row["payload"]["kind"] == alerts_pb2.AlertKind.Name(alerts_pb2.ALERT_KIND_LATE)
    }
    assert late == {("acme", f"s{n}") for n in range(SHIPMENTS) if window_h(n) < 1}, run
    assert len(tables["alert_outbox"]) == len(late), run


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
    reference_schema: str,
    tmp_path: Path,
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    log_path = tmp_path / "projector.log"
    log = []
    for n in range(SHIPMENTS):
        log += lifecycle(
            "acme", f"s{n}", f"v{n % VEHICLES}", T0 + timedelta(seconds=n), window_h=window_h(n)
        )
    for seq in range(1, RECORDS_PER_VEHICLE + 1):
        for v in range(VEHICLES):
            points = [
                (
                    GPS_START + timedelta(seconds=10 * (seq * 10 + i)),
                    53.40 + 0.0005 * seq,
                    -2.99 + 0.0002 * i,
                )
                for i in range(POINTS_PER_RECORD)
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
        "CARGOTRACK_STALE_AFTER_MIN": STALE_NEVER_MIN,
        # A killed member holds its partitions until its session expires: keep it short.
        "CARGOTRACK_CONSUMER_SESSION_TIMEOUT_MS": "6000",
        # Small transactions, so that a kill lands in the middle of the stream.
        "CARGOTRACK_PROJECTOR_MAX_RECORDS": "20",
    }
    # The reference: the same service on the same log into its own schema, never killed,
    # with the same settings but the batch size: the default one (5000), so the whole
    # log comes in a few large polls. It joins the crashed processes' consumer group, whose offsets
    # in Kafka (committed for monitoring) are not its own: it must still start from the
    # beginning (tests/integration/test_runner.py), and any cut decides the same.
    reference_env = {**env, "CARGOTRACK_DB_SCHEMA": reference_schema}
    del reference_env["CARGOTRACK_PROJECTOR_MAX_RECORDS"]
    reference_settings = projector_settings(
        kafka_bootstrap, database_url, topic_prefix, reference_schema
    )
    await prepare(reference_settings)
    pool = await create_pool(settings.database)
    reference_pool = await create_pool(reference_settings.database)
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

    async def run_until_caught_up(
        env: dict[str, str], pool: asyncpg.Pool, targets: dict[TopicPartition, int]
    ) -> None:
        process = projector_process(env, log_path)
        try:
            try:
                await wait_caught_up(pool, "tracking", targets, timeout_s=90)
            except TimeoutError as behind:
                # What the projector did meanwhile (a stall is diagnosed from its log).
                raise AssertionError(f"{behind}\n{_tail(log_path)}") from behind
            # Its signal handlers exist once it reports ready; then SIGTERM must drain it.
            while "ready" not in _tail(log_path).split("starting projector")[-1]:  # noqa: ASYNC110 - polls a log file
                await asyncio.sleep(0.05)
        finally:
            await process.terminate(signal.SIGTERM, 15)
        assert process.returncode == 0, _tail(log_path)

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
        await run_until_caught_up(env, pool, targets)
        await run_until_caught_up(reference_env, reference_pool, targets)
        async with pool.acquire() as connection:
            expected_shipments, expected_vehicles = fold_log(log)
            stored_shipments = await store.load_shipments(connection, expected_shipments)
            stored_vehicles = await store.load_vehicles(connection, expected_vehicles)
            history = await connection.fetchval("SELECT count(*) FROM vehicle_positions")
            duplicates = await connection.fetchval(
                "SELECT count(*) FROM (SELECT tenant_id, vehicle_id, recorded_at, event_id"
                " FROM vehicle_positions GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d"
            )
            crashed = await live_tables(connection)
        async with reference_pool.acquire() as connection:
            reference = await live_tables(connection)
        # The stale scan, once per schema, at a clock of our choosing: every shipment in
        # transit has been silent for 11 minutes past its vehicle's last fix.
        silent_at = record_time(RECORDS_PER_VEHICLE) + timedelta(minutes=11)
        stale_settings = replace(settings.alerts, stale_after_min=10.0)
        stale_raised = await StaleScanner(pool, stale_settings, clock=lambda: silent_at).scan_once()
        reference_raised = await StaleScanner(
            reference_pool, stale_settings, clock=lambda: silent_at
        ).scan_once()
        async with pool.acquire() as connection:
            crashed_after_scan = await live_tables(connection)
        async with reference_pool.acquire() as connection:
            reference_after_scan = await live_tables(connection)
    finally:
        writer.cancel()
        await pool.close()
        await reference_pool.close()
    assert kills_mid_stream >= 2, "the kills did not interrupt the stream"
    assert stored_shipments == expected_shipments
    assert stored_vehicles == expected_vehicles
    for state in stored_shipments.values():
        event_ids = [entry.event_id for entry in state.timeline]
        assert len(event_ids) == len(set(event_ids))
    assert history == RECORDS_PER_VEHICLE * VEHICLES * POINTS_PER_RECORD
    assert duplicates == 0

    # Live tracking, by hand, in both runs (which says which one a difference is in).
    by_hand(crashed, "after the crashes")
    by_hand(reference, "without a crash")
    # And all of it, field by field, as the process that never crashed wrote it.
    assert_same(crashed, reference)

    # The stale scan on what the crashes left decides what it decides without them.
    assert stale_raised == reference_raised == SHIPMENTS
    assert_same(crashed_after_scan, reference_after_scan)
