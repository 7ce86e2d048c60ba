"""Fault scenarios: the real services, a seeded workload, a fault, the checker.

Each scenario drives the ingest services over gRPC with the workload of
tests/faults/workload.py while it injects its fault, waits until the projector
caught up with Kafka's end offsets, and has tests/faults/checker.py compare what
the clients were told with PostgreSQL. Every scenario must end with nothing lost,
nothing duplicated, no state diverging from the fold of the log, and every item
acknowledged in the end (the system recovers).

Scenarios that stop or kill Kafka or PostgreSQL run their own server in a temp
dir; the others use the session's stack with their own topics and schema.
Reduced size by default; the full size with `-m slow` (see conftest.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pytest

from devtools.devstack import KafkaBroker, PostgresServer
from tests.faults.checker import Report
from tests.faults.harness import Rig, Servers, ServiceProcess, start_server
from tests.faults.workload import FULL, REDUCED, Size

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(
    params=[
        pytest.param(REDUCED, id="reduced"),
        pytest.param(FULL, id="full", marks=pytest.mark.slow),
    ]
)
def size(request: pytest.FixtureRequest) -> Size:
    value: Size = request.param
    return value


#: What a client sees while Kafka or an ingest process is down: a retryable failure.
OUTAGE_ERRORS = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL"})


def assert_clean(
    report: Report, rig: Rig, *, restarts: range, client_errors: frozenset[str] = frozenset()
) -> None:
    """Nothing lost, duplicated or diverged; and the fault did what it was meant to
    and nothing else: the keeper restarted processes `restarts` times (a crash loop
    is more; `Rig.recovered` also fails the report on any restart once the faults
    were over), and the clients met only the failures the fault explains (the
    workload retries every retryable failure, so an ingest that answers UNAVAILABLE
    on its own would otherwise pass)."""
    assert report.ok, report.summary()
    assert report.acked > 0
    restarted = rig.keeper.total
    assert restarted in restarts, (
        f"{restarted} restarts ({dict(rig.keeper.restarts)}), expected {restarts}:\n"
        + "\n".join(p.tail(1500) for p in rig.processes if p.name == "projector")
    )
    seen = report.notes["client errors"]
    assert isinstance(seen, dict)
    unexplained = set(seen) - client_errors
    assert not unexplained, f"clients saw {seen}; {unexplained} not explained by the fault"


async def wait_log(process: ServiceProcess, text: str, count: int, timeout_s: float = 60) -> None:
    """Until the process's log holds `text` at least `count` times."""
    async with asyncio.timeout(timeout_s):
        while process.log_count(text) < count:  # noqa: ASYNC110 - polls a log file
            await asyncio.sleep(0.05)


async def test_projector_sigkill_mid_batch_repeatedly(
    size: Size, servers: Servers, tmp_path: Path
) -> None:
    """SIGKILL the projector at a random moment after each of its commits, again and
    again, while the clients keep writing; it is restarted each time (as a pod)."""
    rng = random.Random(11)
    async with Rig("projector-sigkill", size, tmp_path, servers, seed=11) as rig:
        projector = await rig.start_services()
        rig.start_workload()
        mid_stream = 0
        for _ in range(size.faults + 1):
            # Kill each incarnation once it has committed a batch of its own.
            await rig.wait_running(projector)
            await rig.wait_commit()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            mid_stream += await rig.wait_lagging()
            await projector.kill()  # the keeper starts a new one
            rig.faults += 1
        rig.notes["kills mid-stream"] = mid_stream
        await rig.wait_running(projector)
        await rig.recovered()
        report = await rig.finish()
    kills = size.faults + 1
    assert_clean(report, rig, restarts=range(kills, kills + 1))
    assert mid_stream >= 1, "no kill interrupted the stream"


async def test_kafka_broker_restart_mid_stream(
    size: Size, servers: Servers, tmp_path: Path
) -> None:
    """Stop the (dedicated) broker mid-stream, start it again keeping its data: ingest
    answers UNAVAILABLE meanwhile, clients resend, the projector resumes."""
    broker = KafkaBroker(tmp_path / "kafka")
    await start_server(broker, keep_data=False)
    # Slower clients: an orderly broker stop takes seconds, and the clients must still
    # be writing when it is down (else the outage hits nobody).
    paced = dataclasses.replace(size, duration_s=size.duration_s * 3)
    try:
        own_kafka = dataclasses.replace(servers, kafka_bootstrap=broker.bootstrap_servers)
        async with Rig("kafka-restart", paced, tmp_path, own_kafka, seed=23) as rig:
            await rig.start_services()
            workload = rig.start_workload()
            restarts = max(1, size.faults // 2)
            writing_when_down = []
            for k in range(restarts):
                await workload.wait_progress((k + 1) / (restarts + 1))
                await rig.wait_commit()
                in_flight = workload.in_flight()
                await broker.stop()
                writing_when_down.append(rig.workload_running)
                rig.faults += 1
                await asyncio.sleep(1.5)  # the outage itself
                await start_server(broker, keep_data=True)
                rig.notes[f"in flight at stop {k + 1}"] = in_flight
            await rig.recovered()
            report = await rig.finish()
    finally:
        await broker.stop()
    # While the broker is down a projector that exits cannot start again (it cannot
    # reach Kafka): any number of restarts during the outage, none after it.
    assert_clean(report, rig, restarts=range(1000), client_errors=OUTAGE_ERRORS)
    assert all(writing_when_down), (
        f"the clients were done before the broker was down: {writing_when_down}"
    )
    assert report.notes["client errors"], "no client noticed the outage"


async def test_postgres_restart_mid_stream(
    size: Size, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Restart the (dedicated) PostgreSQL mid-stream: alternately a fast shutdown and
    a crash (SIGKILL). The projector exits and is restarted; it resumes at the
    offsets committed with the state."""
    postgres = PostgresServer(tmp_path / "postgres", fsync=False)
    await start_server(postgres, keep_data=False)
    # Slower clients: every stop must come while they still write (the first outage
    # and restart take seconds, the reduced workload only a few).
    paced = dataclasses.replace(size, duration_s=size.duration_s * 3)
    try:
        own_postgres = Servers(kafka_bootstrap, postgres.dsn, topic_prefix, "cargotrack")
        async with Rig("postgres-restart", paced, tmp_path, own_postgres, seed=37) as rig:
            await rig.start_services()
            workload = rig.start_workload()
            behind_at_stop = []
            for k in range(size.faults):
                await workload.wait_progress((k + 1) / (size.faults + 1))
                await rig.wait_commit()
                # Mid-stream: the clients still write and the projection is behind.
                behind_at_stop.append(rig.workload_running and await rig.wait_lagging())
                if k % 2 == 0:
                    await postgres.stop()
                else:
                    await postgres.kill()
                rig.faults += 1
                await asyncio.sleep(1.0)  # the outage itself
                await start_server(postgres, keep_data=True)
            rig.notes["behind at the stops"] = behind_at_stop
            await rig.recovered()
            report = await rig.finish()
    finally:
        await postgres.stop()
    # The projector exits when PostgreSQL goes away (and may fail again while it is
    # still down); ingest does not use PostgreSQL, so its clients see no error.
    assert_clean(report, rig, restarts=range(1, 10 * size.faults))
    assert all(behind_at_stop), f"a stop came when nothing was in flight: {behind_at_stop}"


async def test_client_disconnects_with_unacknowledged_batches_then_resends(
    size: Size, servers: Servers, tmp_path: Path
) -> None:
    """Clients cut their own streams and calls while batches and events are in flight
    (sometimes dropping the channel too), reconnect and resend what is unanswered."""
    rng = random.Random(41)
    async with Rig("client-disconnect", size, tmp_path, servers, seed=41) as rig:
        await rig.start_services()
        workload = rig.start_workload()
        for _ in range(size.faults * 10):
            if not rig.workload_running:
                break
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            rig.faults += await workload.cut_when_in_flight(new_channel=rng.random() < 0.3)
        await rig.recovered()
        report = await rig.finish()
    assert_clean(report, rig, restarts=range(1), client_errors=frozenset({"CLIENT_CUT"}))
    assert workload.ledger.cut_in_flight >= 1
    assert report.resent > 0


async def test_two_projectors_rebalance_mid_stream_and_one_is_killed(
    size: Size, servers: Servers, tmp_path: Path
) -> None:
    """A second projector joins mid-stream (the group rebalances, partitions move while
    batches are in flight), then the first is SIGKILLed for good and the survivor
    takes its partitions over once the dead member's session expired, while the
    clients keep writing. The full size repeats the handover."""
    # Slower clients: a takeover waits for the dead member's session (6 s) to expire,
    # and it should happen while the stream goes on.
    paced = dataclasses.replace(size, duration_s=size.duration_s * 3)
    async with Rig("two-projectors", paced, tmp_path, servers, seed=53) as rig:
        members = [await rig.start_services("projector-1")]
        workload = rig.start_workload()
        await rig.wait_commit()
        handovers = max(1, size.faults // 2)
        streaming_at_kill = []
        for k in range(handovers):
            await workload.wait_progress((3 * k + 1) / (3 * handovers + 1))
            joining = rig.projector(f"projector-{k + 2}")
            # The newcomer got partitions in the rebalance, and a batch was committed.
            await wait_log(joining, "assigned", 1)
            await rig.wait_commit()
            await workload.wait_progress((3 * k + 2) / (3 * handovers + 1))
            leaving = members.pop(0)
            rig.keeper.release(leaving)
            # The clients still write: records keep arriving on the dead member's
            # partitions until the survivor is assigned them.
            streaming_at_kill.append(rig.workload_running)
            await leaving.kill()
            rig.faults += 2  # a rebalance and a kill
            # The survivor is assigned the dead member's partitions too.
            await wait_log(joining, "assigned", 2)
            members.append(joining)
        rig.notes["clients writing at the kills"] = streaming_at_kill
        await rig.recovered()
        report = await rig.finish()
    # The killed members were released first: the keeper restarts none of them.
    assert_clean(report, rig, restarts=range(1))
    assert all(streaming_at_kill), "a kill came after the stream"


async def test_ingest_killed_with_batches_in_flight(
    size: Size, servers: Servers, tmp_path: Path
) -> None:
    """SIGKILL the three ingest processes while GPS batches are in flight, start them
    again on the same ports: acknowledged batches survive, clients resend the rest."""
    async with Rig("ingest-sigkill", size, tmp_path, servers, seed=67) as rig:
        await rig.ingest_as_processes()
        rig.projector()
        workload = rig.start_workload()
        in_flight_at_kill = []
        for k in range(size.faults):
            await workload.wait_progress((k + 1) / (size.faults + 1))
            async with asyncio.timeout(30):
                while workload.in_flight() == 0 and rig.workload_running:  # noqa: ASYNC110 - polls client state
                    await asyncio.sleep(0.005)
            in_flight_at_kill.append(workload.in_flight())
            for process in rig.ingest_processes:
                await process.kill()
            rig.faults += 1
            for process in rig.ingest_processes:
                process.start()
            for process in rig.ingest_processes:
                await process.wait_serving()
        rig.notes["batches in flight at the kills"] = in_flight_at_kill
        await rig.recovered()
        report = await rig.finish()
    assert_clean(report, rig, restarts=range(1), client_errors=OUTAGE_ERRORS)
    assert sum(in_flight_at_kill) > 0, "no kill hit batches in flight"
    assert report.resent > 0
