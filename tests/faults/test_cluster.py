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
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from devtools.devstack import DevStackError, KafkaCluster, LocalStack
from tests.conftest import server_state_dir
from tests.faults.conftest import CLUSTER_ENV
from tests.faults.gaps import QueryProbe, UpdateProbe, measure, replicas_target
from tests.faults.harness import SPAWN_CRASH, Rig, Servers, ServiceProcess
from tests.faults.test_scenarios import OUTAGE_ERRORS, assert_clean, wait_log
from tests.faults.workload import FULL, Size, Workload
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


@pytest.fixture
def cluster_rig(
    cluster: KafkaCluster, servers: Servers, tmp_path: Path
) -> Callable[[str, Size, int], Rig]:
    """Makes a scenario's rig, `(scenario, size, seed)`, on the cluster: its nodes and
    its topic replication, with the session's PostgreSQL, this test's schema and topic
    prefix."""
    on_cluster = dataclasses.replace(servers, kafka_bootstrap=cluster.bootstrap_servers)

    def make(scenario: str, size: Size, seed: int) -> Rig:
        return Rig(scenario, size, tmp_path, on_cluster, seed=seed, extra_env=cluster.topic_env())

    return make


def kafka_fault_restarts(rig: Rig) -> range:
    """Projector restarts a fault on one Kafka node may cause: at most two per fault.

    The alert relay rides out a partition leader's failover (it retries the batch), but
    the projector still exits, by design, on a Kafka error its consumer group or its
    dead-letter writes cannot recover from, and the orchestrator restarts the process.
    No restart is allowed once the faults are over (`Rig.recovered`: a crash loop fails
    the report)."""
    return range(2 * rig.faults + 1)


async def assert_topics_replicated(rig: Rig, cluster: KafkaCluster) -> None:
    """The scenario's topics have 3 replicas, and min.insync.replicas 2 is what ingest
    writes against (read back from the brokers, not from our settings)."""
    # Topic creation reaches each node through the metadata log: the node asked may
    # lag the one that created them by a moment.
    deadline = time.monotonic() + 30.0
    while len(states := await cluster.partitions(rig.topics)) < 3 * len(rig.topics):
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)
    assert len(states) == 3 * len(rig.topics), states
    assert {len(s.replicas) for s in states.values()} == {3}, states
    configs = await described_topic_configs(cluster, rig.settings.topics.gps_points)
    assert configs.get("min.insync.replicas") == "2", configs


async def described_topic_configs(
    cluster: KafkaCluster, topic: str, timeout_s: float = 30.0
) -> dict[str, str]:
    """The topic's configuration as a node describes it. The admin client asks a random
    node, and one that has not yet applied the topic's creation from the metadata log
    answers UNKNOWN_TOPIC_OR_PARTITION with no entries: ask again until one describes
    it (the last error is in the failure message)."""
    deadline = time.monotonic() + timeout_s
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap_servers)
    await admin.start()
    try:
        while True:
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)]
            )
            [(error_code, message, _, _, entries, *_)] = response.resources
            if not error_code:
                return {entry[0]: entry[1] for entry in entries}
            if time.monotonic() >= deadline:
                raise AssertionError(f"no node described {topic}: error {error_code} {message}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def busiest_gps_partition(rig: Rig) -> int:
    """The gps-points partition holding the most records so far (being written to)."""
    ends = await end_offsets(rig.settings, [rig.settings.topics.gps_points])
    busiest: int = max(ends, key=lambda tp: ends[tp]).partition
    return busiest


@dataclasses.dataclass
class Scene:
    """A cluster scenario under way: the services run and the clients write (and query,
    when there are query replicas); what a scenario's fault acts on."""

    rig: Rig
    workload: Workload
    projectors: list[ServiceProcess]
    query_replicas: list[ServiceProcess]
    queries: QueryProbe | None


async def run_scenario(
    rig: Rig,
    fault: Callable[[Scene], Awaitable[None]],
    *,
    before_services: Callable[[Rig], Awaitable[None]] | None = None,
    projectors: Sequence[str] = ("projector",),
    query_replicas: int = 0,
    restarts: range | None = None,
    client_errors: frozenset[str] = OUTAGE_ERRORS,
) -> Scene:
    """One cluster scenario from the start to the verdict, around its `fault`:

    1. the rig is entered, then `before_services(rig)` awaited (when given);
    2. the ingest services start in this process, a projector process per label of
       `projectors`, and `query_replicas` tracking-query processes (until SERVING)
       with a `QueryProbe` polling them round robin;
    3. an `UpdateProbe` and the query probe start, then the clients' workload;
    4. `fault(scene)`: the scenario's faults, its notes and its checks meanwhile;
    5. `Rig.recovered`, `Rig.finish`, the probes stopped (also when a step fails);
       the gaps measured (tests/faults/gaps.py) and printed;
    6. `assert_clean`: restarts within `restarts` (by default `kafka_fault_restarts`
       of the faults counted), clients' failures only of `client_errors`.

    Returns the scene, for the scenario's own assertions."""
    async with rig:
        if before_services is not None:
            await before_services(rig)
        await rig.ingest_in_process()
        running = [rig.projector(label) for label in projectors]
        replicas = [
            rig.spawn("tracking-query", f"tracking-query-{n}") for n in range(1, query_replicas + 1)
        ]
        for replica in replicas:
            await replica.wait_serving()
        queries = None
        if replicas:
            queries = QueryProbe(
                replicas_target(f"127.0.0.1:{r.port}" for r in replicas),
                [s.shipment_id for s in rig.plan.shipments],
            )
        async with contextlib.AsyncExitStack() as probes:  # stopped last started first
            updates = await probes.enter_async_context(UpdateProbe(rig.settings, rig.topics))
            if queries is not None:
                await probes.enter_async_context(queries)
            workload = rig.start_workload()
            started = time.monotonic()
            scene = Scene(rig, workload, running, replicas, queries)
            await fault(scene)
            await rig.recovered()
            report = await rig.finish()
    row = measure(report, workload, updates, queries, started=started, restarts=rig.keeper.total)
    print(f"gaps: {row}")
    if restarts is None:
        restarts = kafka_fault_restarts(rig)
    assert_clean(report, rig, restarts=restarts, client_errors=client_errors)
    return scene


async def test_partition_leader_sigkill_during_ingest(
    size: Size, cluster: KafkaCluster, cluster_rig: Callable[[str, Size, int], Rig]
) -> None:
    """SIGKILL the node leading the busiest gps-points partition while drivers stream;
    a follower in sync takes over, ingest resends to it; the dead node restarts
    (keeping its log) and catches up. Acknowledged batches survive their leader."""
    kills = max(1, size.faults // 2)
    writing_at_kill: list[bool] = []

    async def kill_leaders(scene: Scene) -> None:
        rig = scene.rig
        killed = []
        for k in range(kills):
            await scene.workload.wait_progress((k + 1) / (kills + 2))
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

    await run_scenario(
        cluster_rig("leader-sigkill", paced(size, 1 if size is TINY else 4), 71),
        kill_leaders,
        before_services=lambda rig: assert_topics_replicated(rig, cluster),
    )
    assert all(writing_at_kill), f"a kill came after the stream: {writing_at_kill}"


async def test_rolling_restart_under_load(
    size: Size, cluster: KafkaCluster, cluster_rig: Callable[[str, Size, int], Rig]
) -> None:
    """Restart every node in turn (orderly stop, start keeping its log), waiting for
    full replication before the next, while the clients write."""
    full_only(size)
    writing: list[bool] = []

    async def restart_every_node(scene: Scene) -> None:
        await scene.workload.wait_progress(0.15)
        for broker in cluster.brokers:
            writing.append(scene.rig.workload_running)
            await broker.restart()
            scene.rig.faults += 1
            await cluster.wait_fully_replicated()
        scene.rig.notes["clients writing at each restart"] = writing

    await run_scenario(cluster_rig("rolling-restart", paced(size, 5), 73), restart_every_node)
    assert all(writing), f"a restart came after the stream: {writing}"


async def test_node_paused_past_the_session_timeouts(
    size: Size, cluster: KafkaCluster, cluster_rig: Callable[[str, Size, int], Rig]
) -> None:
    """SIGSTOP the node leading the busiest gps-points partition for PAUSE_S (past the
    brokers' 3 s and the consumers' 6 s session timeouts), then SIGCONT: the
    controller fences it and moves its leaderships; thawed, it must not serve as a
    stale leader (nothing acknowledged by it alone), and it rejoins."""
    full_only(size)
    pauses = max(1, size.faults // 3)
    paused: list[str] = []

    async def freeze_leaders(scene: Scene) -> None:
        rig = scene.rig
        for k in range(pauses):
            await scene.workload.wait_progress((k + 1) / (pauses + 2))
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

    await run_scenario(cluster_rig("node-sigstop", paced(size, 2), 79), freeze_leaders)
    assert all("writing: True" in p for p in paused), paused


async def test_two_projectors_and_two_query_replicas_one_of_each_killed(
    size: Size, cluster_rig: Callable[[str, Size, int], Rig]
) -> None:
    """Two projectors share the partitions and two tracking-query replicas answer
    GetShipment (round robin, as behind a Service); one of each is SIGKILLed for good
    while the clients write and query. The survivor projector takes the partitions
    over; queries go on being answered by the other replica."""
    full_only(size)
    answered_before = 0
    writing_at_kill = False
    killed_at = 0.0

    async def kill_one_of_each(scene: Scene) -> None:
        nonlocal answered_before, writing_at_kill, killed_at
        rig = scene.rig
        first, second = scene.projectors
        assert scene.queries is not None
        await wait_log(first, "assigned", 1)
        await wait_log(second, "assigned", 1)
        await scene.workload.wait_progress(0.3)
        await rig.wait_commit()
        answered_before = len(scene.queries.answered)
        writing_at_kill = rig.workload_running
        rig.keeper.release(first)
        await first.kill()
        await scene.query_replicas[0].kill()
        killed_at = time.monotonic()
        rig.faults += 2
        # The survivor is assigned the dead member's partitions too.
        await wait_log(second, "assigned", 2)

    # No Kafka fault here, but slow clients: a driver's stream outlives the workload's
    # 30 s stream deadline (DEADLINE_EXCEEDED), and a write issued just before it is
    # answered UNAVAILABLE (ingest leaves the write only what remains of the deadline).
    stream_deadline = frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE"})
    scene = await run_scenario(
        cluster_rig("projector-and-query-kill", paced(size, 2), 83),
        kill_one_of_each,
        projectors=("projector-1", "projector-2"),
        query_replicas=2,
        restarts=range(1),
        client_errors=stream_deadline,
    )
    queries = scene.queries
    assert queries is not None
    assert writing_at_kill, "the kills came after the stream"
    answered_after = sum(1 for t in queries.answered if t > killed_at)
    assert answered_before > 0
    assert answered_after >= 10, f"queries stopped being answered: {answered_after} after the kill"
    # Only calls in flight on the killed replica, or sent before the channel saw it
    # gone, may fail; a client-side balancer that kept sending to it would fail many.
    assert queries.failures <= 5, dict(queries.failed)
