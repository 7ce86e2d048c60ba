"""PostgreSQL failover: the primary SIGKILLed mid-stream, a lagging standby promoted.

The services reach PostgreSQL through one multi-host URL
(`postgresql://…@primary,standby/…?target_session_attrs=read-write`), as issue 17
asks, so after the promotion they find the new primary by themselves: the projector
exits when its connections break and is restarted (as a pod), then connects to
whichever host accepts writes; a tracking-query process keeps running, its pool
replaces the broken connections, and a client asking it for a shipment throughout
gets only answers or UNAVAILABLE (retry), never another error.

Replication is asynchronous, so a primary can die with committed transactions its
standby never received. This scenario makes that certain rather than lucky: mid-way
it stops the standby's replication (`PostgresStandby.stop_replication`), waits until
the primary has committed more batches, and only then kills the primary. Before the
promotion it reads, on both servers, the projection's stored offsets and which GPS
batches are in the position history, so the report shows how far behind the
promoted standby was. The claim under test: that lost tail is applied again from
Kafka, because the offsets live in the same transaction as the state (the standby's
offsets are exactly as old as its state), and the checker finds nothing lost,
duplicated or diverged.

Reduced size by default (CI); the full size with CARGOTRACK_FAULTS_CLUSTER=1 (the
cluster suite) or CARGOTRACK_FAULTS_FULL=1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from devtools.devstack import PostgresServer, PostgresStandby, multi_host_dsn
from shared.projection import load_offsets
from tests.faults.conftest import CLUSTER_ENV, FULL_ENV
from tests.faults.failover_gaps import GapMeter
from tests.faults.gaps import QUERY_ANSWERS, QueryProbe
from tests.faults.harness import Rig, Servers, start_server
from tests.faults.test_scenarios import assert_clean
from tests.faults.workload import FULL, REDUCED, Size

pytestmark = pytest.mark.timeout(900)

SCHEMA = "cargotrack"
#: What tracking-query may answer while the database fails over, besides the shipment
#: or not yet (QUERY_ANSWERS): "retry".
QUERY_RETRY = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


@pytest.fixture(
    params=[
        pytest.param(REDUCED, id="reduced"),
        pytest.param(
            FULL,
            id="full",
            marks=pytest.mark.skipif(
                os.environ.get(CLUSTER_ENV) != "1" and os.environ.get(FULL_ENV) != "1",
                reason=f"full-size failover: run with {CLUSTER_ENV}=1 or {FULL_ENV}=1",
            ),
        ),
    ]
)
def size(request: pytest.FixtureRequest) -> Size:
    value: Size = request.param
    return value


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What one server holds of the projection: stored offsets and GPS batches applied."""

    offsets: dict[TopicPartition, int]
    gps_batches: frozenset[str]
    history_rows: int

    @property
    def records(self) -> int:
        """Records applied, over every partition (offsets are the last applied)."""
        return sum(offset + 1 for offset in self.offsets.values())


async def snapshot(server: PostgresServer, topics: list[str]) -> Snapshot:
    """Read `server` alone (a standby answers reads too)."""
    connection = await server.connect()
    try:
        await connection.execute(f'SET search_path TO "{SCHEMA}"')
        partitions = [TopicPartition(t, p) for t in topics for p in range(3)]
        offsets = await load_offsets(connection, "tracking", partitions)
        rows = await connection.fetch(
            "SELECT event_id, count(*) AS n FROM vehicle_positions GROUP BY event_id"
        )
    finally:
        await connection.close()
    return Snapshot(offsets, frozenset(r["event_id"] for r in rows), sum(int(r["n"]) for r in rows))


async def wait_primary_ahead(
    primary: PostgresServer, frozen: Snapshot, topics: list[str], timeout_s: float = 60
) -> Snapshot:
    """Until the primary has committed batches the (detached) standby will never see.

    Polls every 0.25 s: a snapshot reads the whole history, in the process that also
    runs the ingest services and the clients."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = await snapshot(primary, topics)
        if now.records > frozen.records and now.gps_batches - frozen.gps_batches:
            return now
        if time.monotonic() >= deadline:
            raise AssertionError(f"the primary committed nothing new in {timeout_s:g}s")
        await asyncio.sleep(0.25)


async def test_postgres_failover_to_a_lagging_standby(
    size: Size, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, state_dir: Path
) -> None:
    """SIGKILL the primary mid-stream while its standby lags, promote the standby: the
    services reconnect through the multi-host URL and the lost tail is re-applied."""
    # Not under tmp_path: PostgreSQL runs as another user when we are root, and any
    # pytest session starting meanwhile makes pytest's root private again.
    primary = PostgresServer(state_dir / "pg-primary", fsync=False)
    standby = PostgresStandby(state_dir / "pg-standby", primary, fsync=False)
    await start_server(primary, keep_data=False)
    await start_server(standby, keep_data=False)
    database_url = multi_host_dsn([primary, standby])
    # Slower clients in the reduced size: the outage and the projector's restarts take
    # seconds, and the clients must still be writing when the primary dies. The full
    # size writes long enough as it is; paced three times slower, a GPS stream would
    # outlive the clients' 30 s stream deadline (DEADLINE_EXCEEDED, then a resend).
    paced = dataclasses.replace(size, duration_s=size.duration_s * 3) if size == REDUCED else size
    servers = Servers(kafka_bootstrap, database_url, topic_prefix, SCHEMA)
    try:
        async with Rig("postgres-failover", paced, tmp_path, servers, seed=71) as rig:
            await rig.start_services()
            query = rig.spawn("tracking-query", "tracking-query")
            await query.wait_serving()
            workload = rig.start_workload()
            shipment = rig.plan.shipments[0].shipment_id
            # The probe asks for one shipment every 0.1 s, as a portal would.
            async with (
                GapMeter(workload.ledger, database_url, SCHEMA) as meter,
                QueryProbe(
                    f"127.0.0.1:{query.port}",
                    [shipment],
                    interval_s=0.1,
                    timeout_s=5,
                    channel_options=(),
                ) as probe,
            ):
                await workload.wait_progress(0.25)
                await rig.wait_commit()
                assert await standby.in_recovery()
                # The standby stops receiving WAL: what it has now is what it will
                # have when it is promoted.
                standby_lsn = await standby.stop_replication()
                frozen = await snapshot(standby, rig.topics)
                ahead = await wait_primary_ahead(primary, frozen, rig.topics)
                await workload.wait_progress(0.5)
                writing = rig.workload_running
                behind_log = await rig.wait_lagging()
                at_kill = await snapshot(primary, rig.topics)
                primary_lsn = await _current_lsn(primary)
                await primary.kill()
                killed_at = time.monotonic()
                rig.faults += 1
                on_standby = await snapshot(standby, rig.topics)
                await standby.promote()
                promoted_at = time.monotonic()
                await rig.recovered()
                # tracking-query answers from the new primary (its pool reconnected).
                async with asyncio.timeout(60):
                    while not probe.answered or probe.answered[-1] < promoted_at:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                query_tail = "" if query.running else query.tail()
                report = await rig.finish()
                final = await snapshot(standby, rig.topics)
            regained = meter.updates.first_after(killed_at)
            missing = at_kill.gps_batches - on_standby.gps_batches
            report.notes.update(
                {
                    **meter.notes(),
                    "kill -> promoted s": round(promoted_at - killed_at, 2),
                    "kill -> new state s": (
                        None if regained is None else round(regained - killed_at, 2)
                    ),
                    "records the standby lacked": at_kill.records - on_standby.records,
                    "GPS batches the standby lacked": len(missing),
                    "history rows primary/standby": (
                        f"{at_kill.history_rows}/{on_standby.history_rows}"
                    ),
                    "WAL bytes the standby lacked": primary_lsn - standby_lsn,
                    "queries by status": dict(probe.codes),
                    "longest query gap s": round(probe.longest_gap(), 2),
                }
            )
            print(f"failover notes: {report.notes}")
    finally:
        await standby.stop()
        await primary.stop()

    # The gap was real: the standby froze, the primary went on, and the promoted
    # standby started behind what the primary had committed.
    assert on_standby == frozen, "the standby changed after its replication stopped"
    assert ahead.records > frozen.records
    assert at_kill.records > on_standby.records, (at_kill.offsets, on_standby.offsets)
    assert missing, "no GPS batch was on the primary only"
    assert primary_lsn > standby_lsn
    assert writing, "the clients were done before the primary died"
    assert behind_log, "the projection was not behind the log when the primary died"
    # ...and it was re-applied from Kafka: every batch the standby lacked is stored
    # once more (the checker: nothing lost, duplicated or diverged, all acknowledged).
    assert missing <= final.gps_batches
    assert all(final.offsets.get(tp, -1) >= o for tp, o in at_kill.offsets.items())
    # The projector exits whenever a transaction finds PostgreSQL gone or not yet
    # writable, and is restarted until the standby is promoted. When the promotion
    # completes before its next transaction it rides through on a fresh connection
    # (seen in CI: 0 restarts), so any number of restarts is allowed; what is proven
    # is the checker's verdict above.
    # The full size's GPS streams can outlive the workload's 30 s stream deadline on a
    # 2-core machine (seen: a 48 s workload): such a stream ends DEADLINE_EXCEEDED, and a
    # write issued just before it UNAVAILABLE (ingest gives the write only what remains
    # of the deadline); the client resends, and the checker above counts every batch.
    # Ingest does not use PostgreSQL, so the failover itself explains no client error.
    stream_deadline = (
        frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE"}) if size != REDUCED else frozenset()
    )
    assert_clean(report, rig, restarts=range(1000), client_errors=stream_deadline)
    # tracking-query was never restarted (the keeper does not keep it) and told its
    # client only answers or "retry", also while no host accepted writes.
    assert not query_tail, f"tracking-query exited:\n{query_tail}"
    assert set(probe.codes) <= QUERY_ANSWERS | QUERY_RETRY, probe.codes
    assert probe.codes["OK"] > 0
    # No state can be new between the kill and the promotion: the meter must see
    # at least that pause (else it measures nothing). Acknowledgements went on.
    assert meter.updates.longest_gap() >= promoted_at - killed_at
    assert meter.acks.moments
    assert meter.acks.moments[-1] > promoted_at


async def _current_lsn(server: PostgresServer) -> int:
    """The primary's WAL position (bytes; asyncpg reads pg_lsn as an integer)."""
    connection = await server.connect()
    try:
        return int(await connection.fetchval("SELECT pg_current_wal_lsn()"))
    finally:
        await connection.close()
