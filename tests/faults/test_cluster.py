"""Fault scenarios on a replicated Kafka: three nodes, replication factor 3,
min.insync.replicas 2 (issue #17, the Kafka half).

The same rig and checker as tests/faults/test_scenarios.py (what the clients were
told, against the Kafka log, against PostgreSQL: 0 lost, 0 duplicated, 0 diverged,
everything acknowledged in the end), on a 3-node KRaft cluster
(devtools/devstack/kafka.py, KafkaCluster), while the faults hit single nodes:

- the leader of a `gps-points` partition is SIGKILLed during ingest, then restarted;
- every node is restarted in turn under load (a rolling restart, waiting for full
  replication between nodes, as an operator or Strimzi does);
- a node is frozen with SIGSTOP for longer than the broker and consumer session
  timeouts, then thawed;
- two projectors and two tracking-query replicas run, and one of each is SIGKILLed.

Each also measures what users feel (tests/faults/gaps.py): the longest gap in
acknowledgements, in committed state updates and (the last one) in query answers.

Sizes: the leader kill runs by default at a tiny size (CI); every scenario runs at
full size with CARGOTRACK_FAULTS_CLUSTER=1 (then the tiny one is skipped). The
cluster is the session stack's when that is one (CARGOTRACK_KAFKA_BROKERS=3), else
one of this module's own; either way every test starts with all three nodes up and
every partition fully replicated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from devtools.devstack import DevStackError, KafkaCluster, LocalStack
from tests.conftest import server_state_dir
from tests.faults.conftest import CLUSTER_ENV
from tests.faults.gaps import QueryProbe, UpdateProbe, measure
from tests.faults.harness import SPAWN_CRASH, Rig
from tests.faults.test_scenarios import OUTAGE_ERRORS, assert_clean, wait_log
from tests.faults.workload import FULL, Size
from tests.projection_helpers import end_offsets

pytestmark = pytest.mark.timeout(900)

CLUSTER_FULL = os.environ.get(CLUSTER_ENV) == "1"

#: The CI size: one leader kill, about 70 s with the cluster's start.
TINY = Size(
    "tiny",
    shipments=12,
    vehicles=3,
    batches=40,
    points=5,
    faults=1,
    duration_s=20.0,
    deadline_s=90.0,
)

#: A frozen node must stay frozen past both timeouts that notice it: the brokers'
#: session with the controller (3 s, kafka.py) and the consumers' (6 s, the rig's).
PAUSE_S = 10.0


@pytest.fixture(
    params=[
        pytest.param(TINY, id="tiny"),
        pytest.param(FULL, id="full"),
    ]
)
def size(request: pytest.FixtureRequest) -> Size:
    value: Size = request.param
    if value is TINY and CLUSTER_FULL:
        pytest.skip(f"{CLUSTER_ENV}=1 runs the full size instead")
    if value is FULL and not CLUSTER_FULL:
        pytest.skip(f"full-size cluster scenario: run with {CLUSTER_ENV}=1")
    return value


def paced(size: Size, factor: float) -> Size:
    """The size with clients `factor` times slower, so that they are still writing
    when the later faults come: a node restart takes 10-60 s (two busy cores), far
    longer than a scenario's faults on one broker. The clients' deadline grows along."""
    duration = size.duration_s * factor
    return dataclasses.replace(
        size, duration_s=duration, deadline_s=max(size.deadline_s, 2 * duration + 60)
    )


def full_only(size: Size) -> None:
    """The scenarios CI does not run: only the leader kill has a tiny size."""
    if size.name != "full":
        pytest.skip(f"runs at full size only ({CLUSTER_ENV}=1)")


async def start_cluster(cluster: KafkaCluster, *, keep_data: bool, attempts: int = 3) -> None:
    """cluster.start(), again if a node crashed before it could exec (see SPAWN_CRASH)."""
    for attempt in range(attempts):
        try:
            await cluster.start(keep_data=keep_data)
            return
        except DevStackError as error:
            if f"exit code {SPAWN_CRASH}" not in str(error) or attempt == attempts - 1:
                raise
            keep_data = True


@pytest.fixture(scope="module")
async def _cluster(stack: LocalStack) -> AsyncIterator[KafkaCluster]:
    if isinstance(stack.kafka, KafkaCluster):  # CARGOTRACK_KAFKA_BROKERS=3
        yield stack.kafka
        return
    with server_state_dir("kafka-cluster") as state:
        cluster = KafkaCluster(state / "kafka", 3)
        problem: DevStackError | None = None
        try:
            await start_cluster(cluster, keep_data=False)
        except DevStackError as error:
            problem = error
        if problem is not None:
            pytest.fail(f"the Kafka cluster did not start: {problem}", pytrace=False)
        try:
            yield cluster
        finally:
            await cluster.kill()


@pytest.fixture
async def cluster(_cluster: KafkaCluster) -> KafkaCluster:
    """The 3-node cluster, every node up and every partition fully replicated."""
    for broker in _cluster.brokers:
        broker.resume()
    if not _cluster.running:
        await start_cluster(_cluster, keep_data=True)
    await _cluster.wait_fully_replicated()
    return _cluster


def cluster_rig(
    scenario: str,
    size: Size,
    tmp_path: Path,
    cluster: KafkaCluster,
    *,
    database_url: str,
    topic_prefix: str,
    schema: str,
    seed: int,
) -> Rig:
    return Rig(
        scenario,
        size,
        tmp_path,
        kafka_bootstrap=cluster.bootstrap_servers,
        database_url=database_url,
        topic_prefix=topic_prefix,
        schema=schema,
        seed=seed,
        extra_env=cluster.topic_env(),
    )


def kafka_fault_restarts(rig: Rig) -> range:
    """Projector restarts a fault on one Kafka node may cause: at most two per fault.

    The projector exits, by design, when a write to Kafka is not acknowledged within
    CARGOTRACK_KAFKA_TIMEOUT_S (3 s in the rig): its alert relay (services/projector/
    outbox.py) ends on Kafka errors and the orchestrator restarts the process. A
    partition whose leader died has none until the controller fences the dead node
    (broker session 3 s, up to ~8 s measured on two busy cores), so an alert write
    in that window fails. No restart is allowed once the faults are over
    (`Rig.recovered`: a crash loop fails the report)."""
    return range(2 * rig.faults + 1)


async def assert_topics_replicated(rig: Rig, cluster: KafkaCluster) -> None:
    """The scenario's topics have 3 replicas, and min.insync.replicas 2 is what ingest
    writes against (read back from the brokers, not from our settings)."""
    states = await cluster.partitions(rig.topics)
    assert len(states) == 3 * len(rig.topics), states
    assert {len(s.replicas) for s in states.values()} == {3}, states
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap_servers)
    await admin.start()
    try:
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, rig.settings.topics.gps_points)]
        )
    finally:
        await admin.close()
    [(_, _, _, _, entries, *_)] = response.resources
    configs = {entry[0]: entry[1] for entry in entries}
    assert configs["min.insync.replicas"] == "2", configs


async def busiest_gps_partition(rig: Rig) -> int:
    """The gps-points partition holding the most records so far (being written to)."""
    ends = await end_offsets(rig.settings, [rig.settings.topics.gps_points])
    busiest: int = max(ends, key=lambda tp: ends[tp]).partition
    return busiest


async def test_partition_leader_sigkill_during_ingest(
    size: Size,
    cluster: KafkaCluster,
    database_url: str,
    topic_prefix: str,
    pg_schema: str,
    tmp_path: Path,
) -> None:
    """SIGKILL the node leading the busiest gps-points partition while drivers stream;
    a follower in sync takes over, ingest resends to it; the dead node restarts
    (keeping its log) and catches up. Acknowledged batches survive their leader."""
    kills = max(1, size.faults // 2)
    async with cluster_rig(
        "leader-sigkill",
        paced(size, 1 if size is TINY else 4),
        tmp_path,
        cluster,
        database_url=database_url,
        topic_prefix=topic_prefix,
        schema=pg_schema,
        seed=71,
    ) as rig:
        await assert_topics_replicated(rig, cluster)
        await rig.ingest_in_process()
        rig.projector()
        updates = UpdateProbe(rig.settings, rig.topics)
        updates.start()
        workload = rig.start_workload()
        started = time.monotonic()
        killed = []
        writing_at_kill = []
        for k in range(kills):
            await workload.wait_progress((k + 1) / (kills + 2))
            await rig.wait_commit()
            partition = await busiest_gps_partition(rig)
            leader = await cluster.leader_of(rig.settings.topics.gps_points, partition)
            writing_at_kill.append(rig.workload_running)
            await leader.kill()
            rig.faults += 1
            # A follower that was in sync leads now (not the dead node).
            successor = await cluster.leader_of(rig.settings.topics.gps_points, partition)
            assert successor.node_id != leader.node_id
            killed.append(f"node {leader.node_id} (gps-points[{partition}] -> {successor.node_id})")
            await asyncio.sleep(2.0)  # ingest goes on with 2 replicas in sync
            await leader.start(keep_data=True)
            await cluster.wait_fully_replicated()
        rig.notes["killed"] = killed
        await rig.recovered()
        report = await rig.finish()
        await updates.stop()
    row = measure(report, workload, updates, started=started, restarts=rig.keeper.total)
    print(f"gaps: {row}")
    assert_clean(report, rig, restarts=kafka_fault_restarts(rig), client_errors=OUTAGE_ERRORS)
    assert all(writing_at_kill), f"a kill came after the stream: {writing_at_kill}"


async def test_rolling_restart_under_load(
    size: Size,
    cluster: KafkaCluster,
    database_url: str,
    topic_prefix: str,
    pg_schema: str,
    tmp_path: Path,
) -> None:
    """Restart every node in turn (orderly stop, start keeping its log), waiting for
    full replication before the next, while the clients write."""
    full_only(size)
    async with cluster_rig(
        "rolling-restart",
        paced(size, 5),
        tmp_path,
        cluster,
        database_url=database_url,
        topic_prefix=topic_prefix,
        schema=pg_schema,
        seed=73,
    ) as rig:
        await rig.ingest_in_process()
        rig.projector()
        updates = UpdateProbe(rig.settings, rig.topics)
        updates.start()
        workload = rig.start_workload()
        started = time.monotonic()
        writing = []
        await workload.wait_progress(0.15)
        for broker in cluster.brokers:
            writing.append(rig.workload_running)
            await broker.restart()
            rig.faults += 1
            await cluster.wait_fully_replicated()
        rig.notes["clients writing at each restart"] = writing
        await rig.recovered()
        report = await rig.finish()
        await updates.stop()
    row = measure(report, workload, updates, started=started, restarts=rig.keeper.total)
    print(f"gaps: {row}")
    assert_clean(report, rig, restarts=kafka_fault_restarts(rig), client_errors=OUTAGE_ERRORS)
    assert all(writing), f"a restart came after the stream: {writing}"


async def test_node_paused_past_the_session_timeouts(
    size: Size,
    cluster: KafkaCluster,
    database_url: str,
    topic_prefix: str,
    pg_schema: str,
    tmp_path: Path,
) -> None:
    """SIGSTOP the node leading the busiest gps-points partition for PAUSE_S (past the
    brokers' 3 s and the consumers' 6 s session timeouts), then SIGCONT: the
    controller fences it and moves its leaderships; thawed, it must not serve as a
    stale leader (nothing acknowledged by it alone), and it rejoins."""
    full_only(size)
    pauses = max(1, size.faults // 3)
    async with cluster_rig(
        "node-sigstop",
        paced(size, 2),
        tmp_path,
        cluster,
        database_url=database_url,
        topic_prefix=topic_prefix,
        schema=pg_schema,
        seed=79,
    ) as rig:
        await rig.ingest_in_process()
        rig.projector()
        updates = UpdateProbe(rig.settings, rig.topics)
        updates.start()
        workload = rig.start_workload()
        started = time.monotonic()
        paused = []
        for k in range(pauses):
            await workload.wait_progress((k + 1) / (pauses + 2))
            await rig.wait_commit()
            partition = await busiest_gps_partition(rig)
            leader = await cluster.leader_of(rig.settings.topics.gps_points, partition)
            leader.pause()
            rig.faults += 1
            await asyncio.sleep(PAUSE_S)
            successor = await cluster.leader_of(rig.settings.topics.gps_points, partition)
            leader.resume()
            paused.append(
                f"node {leader.node_id} (gps-points[{partition}] -> {successor.node_id}, "
                f"writing: {rig.workload_running})"
            )
            assert successor.node_id != leader.node_id, "the frozen node kept its leadership"
            await cluster.wait_fully_replicated()
        rig.notes["paused"] = paused
        await rig.recovered()
        report = await rig.finish()
        await updates.stop()
    row = measure(report, workload, updates, started=started, restarts=rig.keeper.total)
    print(f"gaps: {row}")
    assert_clean(report, rig, restarts=kafka_fault_restarts(rig), client_errors=OUTAGE_ERRORS)
    assert all("writing: True" in p for p in paused), paused


async def test_two_projectors_and_two_query_replicas_one_of_each_killed(
    size: Size,
    cluster: KafkaCluster,
    database_url: str,
    topic_prefix: str,
    pg_schema: str,
    tmp_path: Path,
) -> None:
    """Two projectors share the partitions and two tracking-query replicas answer
    GetShipment (round robin, as behind a Service); one of each is SIGKILLed for good
    while the clients write and query. The survivor projector takes the partitions
    over; queries go on being answered by the other replica."""
    full_only(size)
    async with cluster_rig(
        "projector-and-query-kill",
        paced(size, 2),
        tmp_path,
        cluster,
        database_url=database_url,
        topic_prefix=topic_prefix,
        schema=pg_schema,
        seed=83,
    ) as rig:
        await rig.ingest_in_process()
        first = rig.projector("projector-1")
        second = rig.projector("projector-2")
        replicas = [rig.spawn("tracking-query", f"tracking-query-{n}") for n in (1, 2)]
        for replica in replicas:
            await replica.wait_serving()
        queries = QueryProbe(
            [f"127.0.0.1:{r.port}" for r in replicas],
            [s.shipment_id for s in rig.plan.shipments],
        )
        updates = UpdateProbe(rig.settings, rig.topics)
        updates.start()
        queries.start()
        workload = rig.start_workload()
        started = time.monotonic()
        await wait_log(first, "assigned", 1)
        await wait_log(second, "assigned", 1)
        await workload.wait_progress(0.3)
        await rig.wait_commit()
        answered_before = len(queries.answered)
        writing_at_kill = rig.workload_running
        rig.keeper.release(first)
        await first.kill()
        await replicas[0].kill()
        killed_at = time.monotonic()
        rig.faults += 2
        # The survivor is assigned the dead member's partitions too.
        await wait_log(second, "assigned", 2)
        await rig.recovered()
        report = await rig.finish()
        await queries.stop()
        await updates.stop()
    row = measure(report, workload, updates, queries, started=started, restarts=rig.keeper.total)
    print(f"gaps: {row}")
    # No Kafka fault here, but slow clients: a driver's stream outlives the workload's
    # 30 s stream deadline (DEADLINE_EXCEEDED), and a write issued just before it is
    # answered UNAVAILABLE (ingest leaves the write only what remains of the deadline).
    stream_deadline = frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE"})
    assert_clean(report, rig, restarts=range(1), client_errors=stream_deadline)
    assert writing_at_kill, "the kills came after the stream"
    answered_after = sum(1 for t in queries.answered if t > killed_at)
    assert answered_before > 0
    assert answered_after >= 10, f"queries stopped being answered: {answered_after} after the kill"
    # Only calls in flight on the killed replica, or sent before the channel saw it
    # gone, may fail; a client-side balancer that kept sending to it would fail many.
    assert queries.failures <= 5, dict(queries.failed)
