"""The tracking projection against real Kafka and PostgreSQL.

Each test writes a known log to its own topics, runs the projection until it
has caught up with the log's end offsets (never sleeping), and compares the
stored state with the pure fold of the same log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import grpc
from aiokafka import AIOKafkaConsumer

from services.projector.app import ProjectorServer
from shared import tracking_store as store
from shared.config import Settings
from shared.domain.tracking import IN_TRANSIT
from shared.envelopes import utc_now
from shared.kafka import HEADER_DLQ_REASON
from shared.pb import alerts_pb2
from shared.projection import ProjectionRunner, wait_caught_up
from tests.ingest_helpers import consume_envelopes, wait_health
from tests.projection_helpers import (
    T0,
    end_offsets,
    fold_log,
    gps_envelope,
    in_process_server_settings,
    lifecycle,
    prepare,
    producer_for,
    projector_settings,
    send_all,
)


@contextlib.asynccontextmanager
async def running_projection(settings: Settings) -> AsyncIterator[ProjectionRunner]:
    """The projector as production wires it (ProjectorServer), yielding its runner."""
    async with ProjectorServer(settings, group_id=f"{settings.topics.prefix}projector") as running:
        yield running.runner


async def caught_up(runner: ProjectionRunner, settings: Settings) -> None:
    offsets = await end_offsets(settings, runner.projection.topics)
    await wait_caught_up(runner.pool, runner.projection.name, offsets, timeout_s=60)


async def test_state_equals_the_pure_fold_of_the_log(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    log = []
    for n in range(6):
        log += lifecycle("acme", f"s{n}", f"v{n % 2}", T0 + timedelta(minutes=n))
    log += lifecycle("other-tenant", "s0", "v0", T0)  # same ids, another tenant
    for seq in range(1, 6):
        points = [
            (T0 + timedelta(seconds=30 * (seq * 10 + i)), 53.40 + 0.001 * seq, -2.99 + 0.001 * i)
            for i in range(10)
        ]
        log.append(gps_envelope("acme", "v0", "phone-1", seq, points))
    log.append(log[3])  # a duplicate shipment event
    log.append(log[-2])  # a resent GPS batch
    async with producer_for(settings) as producer:
        await send_all(producer, settings, log)
    async with running_projection(settings) as runner:
        await caught_up(runner, settings)
        async with runner.pool.acquire() as connection:
            expected_shipments, expected_vehicles = fold_log(log)
            stored = await store.load_shipments(connection, expected_shipments)
            vehicles = await store.load_vehicles(connection, expected_vehicles)
            history = await connection.fetchval("SELECT count(*) FROM vehicle_positions")
            tracked = await connection.fetch("SELECT shipment_id, eta FROM shipment_tracking")
    assert stored == expected_shipments
    assert vehicles == expected_vehicles
    assert all(s.status == IN_TRANSIT for s in stored.values())
    # 5 batches of 10 points; the resend added nothing.
    assert history == 50
    # Shipments travelling with v0 (s0, s2, s4 of acme) got live tracking with an ETA.
    assert {row["shipment_id"] for row in tracked} == {"s0", "s2", "s4"}
    assert all(row["eta"] is not None for row in tracked)


async def test_poison_records_go_to_dead_letters_and_the_projection_continues(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    good = lifecycle("acme", "s1", "v1", T0)
    async with producer_for(settings) as producer:
        await send_all(producer, settings, good[:2])
        await producer.send_and_wait(settings.topics.shipment_events, b"\xff\x00garbage", key=b"s1")
        await send_all(producer, settings, good[2:])
    async with running_projection(settings) as runner:
        await caught_up(runner, settings)
        async with runner.pool.acquire() as connection:
            stored = await store.load_shipments(connection, [("acme", "s1")])
    assert stored[("acme", "s1")].status == IN_TRANSIT
    consumer = AIOKafkaConsumer(
        settings.topics.dead_letters,
        **settings.kafka.client_options(),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()
    headers = dict(record.headers)
    assert record.value == b"\xff\x00garbage"
    assert b"undecodable" in headers[HEADER_DLQ_REASON]


async def test_a_second_runner_resumes_after_the_stored_offsets(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """Offsets live in PostgreSQL: a new consumer (any group) resumes where state is."""
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    first, second = lifecycle("acme", "s1", "v1", T0), lifecycle("acme", "s2", "v1", T0)
    async with producer_for(settings) as producer:
        await send_all(producer, settings, first)
        async with running_projection(settings) as runner:
            await caught_up(runner, settings)
        await send_all(producer, settings, second)
    async with running_projection(settings) as runner:
        await caught_up(runner, settings)
        async with runner.pool.acquire() as connection:
            stored = await store.load_shipments(connection, [("acme", "s1"), ("acme", "s2")])
            timeline_lengths = [len(s.timeline) for s in stored.values()]
    expected, _ = fold_log(first + second)
    assert stored == expected
    assert timeline_lengths == [4, 4]


async def test_fencing_refuses_a_stale_offset_writer(database_url: str, pg_schema: str) -> None:
    """A zombie instance that believes an older offset cannot commit its batch."""
    from aiokafka import TopicPartition

    from shared.config import DatabaseSettings
    from shared.db import migrate
    from shared.projection import OffsetConflict, save_offsets

    db = DatabaseSettings(url=database_url, schema=pg_schema)
    await migrate(db)
    tp = TopicPartition("t", 0)
    connection = await asyncpg.connect(database_url, server_settings={"search_path": pg_schema})
    try:
        await save_offsets(connection, "p", {tp: 10}, {})
        await save_offsets(connection, "p", {tp: 20}, {tp: 10})
        try:
            await save_offsets(connection, "p", {tp: 15}, {tp: 10})
        except OffsetConflict:
            pass
        else:
            raise AssertionError("a stale writer was not fenced")
        try:
            # Re-applying records up to the stored offset must not pass either.
            await save_offsets(connection, "p", {tp: 20}, {tp: 20})
        except OffsetConflict:
            pass
        else:
            raise AssertionError("a batch that does not advance the offset was accepted")
        assert await connection.fetchval("SELECT last_offset FROM projection_offsets") == 20
    finally:
        await connection.close()


async def test_a_day_partition_is_created_even_when_default_holds_its_rows(
    database_url: str, pg_schema: str
) -> None:
    """Points that landed in DEFAULT before their day's partition existed move into it."""
    from datetime import UTC, datetime

    from shared.config import DatabaseSettings
    from shared.db import migrate
    from shared.domain.geo import Fix

    db = DatabaseSettings(url=database_url, schema=pg_schema)
    await migrate(db)
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    connection = await asyncpg.connect(database_url, server_settings={"search_path": pg_schema})
    try:
        point = Fix(now, 53.4, -2.99)
        await store.append_history(connection, {("acme", "v1"): [("e1", point)]})
        created, _ = await store.maintain_position_partitions(connection, now, 2)
        in_default = await connection.fetchval("SELECT count(*) FROM vehicle_positions_default")
        in_day = await connection.fetchval("SELECT count(*) FROM vehicle_positions_20261125")
        again, _ = await store.maintain_position_partitions(connection, now, 2)
    finally:
        await connection.close()
    assert "vehicle_positions_20261125" in created
    assert (in_default, in_day) == (0, 1)
    assert again == []


async def test_retention_drops_exactly_the_days_before_the_horizon(
    database_url: str, pg_schema: str
) -> None:
    """Retention 2 days at 2026-11-22 12:00: the horizon is 2026-11-20 00:00. The day
    partitions of the 18th and 19th go, with their points; the point at the horizon's
    first second and everything after stay; an older point parked in DEFAULT goes.
    Expectations written out by hand, not computed like the code computes them."""
    from datetime import UTC, datetime

    from shared.config import DatabaseSettings
    from shared.db import migrate
    from shared.domain.geo import Fix

    await migrate(DatabaseSettings(url=database_url, schema=pg_schema))
    connection = await asyncpg.connect(database_url, server_settings={"search_path": pg_schema})
    try:
        # Day partitions from the 15th to the 22nd exist.
        await store.maintain_position_partitions(
            connection, datetime(2026, 11, 20, 12, 0, tzinfo=UTC), 5
        )
        times = [
            datetime(2026, 11, 10, 9, 0, tzinfo=UTC),  # no partition: DEFAULT
            datetime(2026, 11, 18, 10, 0, tzinfo=UTC),
            datetime(2026, 11, 19, 23, 59, 59, tzinfo=UTC),
            datetime(2026, 11, 20, 0, 0, 0, tzinfo=UTC),
            datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
            datetime(2026, 11, 22, 11, 0, tzinfo=UTC),
        ]
        await store.append_history(
            connection,
            {("acme", "v1"): [(f"e{i}", Fix(at, 53.4, -2.99)) for i, at in enumerate(times)]},
        )
        assert await connection.fetchval("SELECT count(*) FROM vehicle_positions_default") == 1
        _, dropped = await store.maintain_position_partitions(
            connection, datetime(2026, 11, 22, 12, 0, tzinfo=UTC), 2
        )
        kept = await connection.fetch("SELECT recorded_at FROM vehicle_positions ORDER BY 1")
        _, dropped_again = await store.maintain_position_partitions(
            connection, datetime(2026, 11, 22, 12, 0, tzinfo=UTC), 2
        )
    finally:
        await connection.close()
    assert sorted(dropped) == [f"vehicle_positions_202611{day}" for day in range(15, 20)]
    assert [row["recorded_at"] for row in kept] == [
        datetime(2026, 11, 20, 0, 0, 0, tzinfo=UTC),
        datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
        datetime(2026, 11, 22, 11, 0, tzinfo=UTC),
    ]
    assert dropped_again == []


async def _history_partitions(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'vehicle_positions'"
        " AND p.relnamespace = to_regnamespace(current_schema()) AND c.relname ~ '[0-9]{8}$'"
        " ORDER BY c.relname"
    )
    return [row["relname"] for row in rows]


async def test_a_projector_server_runs_relay_stale_scan_maintenance_and_readiness(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """The production wiring in-process (services/projector/app.py ProjectorServer):
    health turns SERVING, the history's partitions are made at start and kept by the
    periodic maintenance, a silent moving shipment is found by the stale scan and its
    alert reaches the alerts topic through the outbox relay."""
    settings = in_process_server_settings(
        kafka_bootstrap, database_url, topic_prefix, pg_schema, CARGOTRACK_STALE_AFTER_MIN="10"
    )
    now = utc_now()
    start = now - timedelta(minutes=40)
    silent_since = now - timedelta(minutes=15)
    points = [
        (start + timedelta(minutes=5, seconds=30 * i), 53.40, -2.99 + 0.001 * i)
        for i in range(20)
        if start + timedelta(minutes=5, seconds=30 * i) <= silent_since
    ]
    async with ProjectorServer(
        settings,
        readiness_interval_s=0.2,
        stale_scan_interval_s=0.2,
        maintenance_interval_s=0.2,
        outbox_idle_s=0.05,
    ) as projector:
        # Readiness: the health server answers SERVING once Kafka and PostgreSQL do.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{projector.port}") as channel:
            await wait_health(channel)
        # Maintenance: partitions made at start; one dropped comes back.
        made = await _history_partitions(projector.pool)
        assert len(made) == settings.position_retention_days + 3, made
        await projector.pool.execute(f'DROP TABLE "{made[-1]}"')
        async with asyncio.timeout(30):
            while await _history_partitions(projector.pool) != made:  # noqa: ASYNC110 - polls the database
                await asyncio.sleep(0.05)
        # Stale scan and outbox relay: a moving shipment silent for 15 minutes.
        async with producer_for(settings) as producer:
            await send_all(producer, settings, lifecycle("acme", "s1", "v1", start))
            await send_all(producer, settings, [gps_envelope("acme", "v1", "phone", 1, points)])
        stale = alerts_pb2.ALERT_KIND_STALE_TRACKING
        published = await consume_envelopes(
            kafka_bootstrap,
            settings.topics.shipment_alerts,
            until=lambda found: any(e.envelope.alert.kind == stale for e in found),
            timeout_s=60,
        )
        assert projector.scanner.raised >= 1
        envelope = next(e.envelope for e in published if e.envelope.alert.kind == stale)
        assert (envelope.tenant_id, envelope.alert.shipment_id) == ("acme", "s1")
        # Only the relay writes the alerts topic; it marks what it published.
        marked = "SELECT published_at IS NOT NULL FROM alert_outbox WHERE alert_id = $1"
        async with asyncio.timeout(30):
            while not await projector.pool.fetchval(marked, envelope.event_id):  # noqa: ASYNC110 - polls the database
                await asyncio.sleep(0.05)
        # Leaving the block drains it; nothing it ran is left behind.
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("projector:")] == []
