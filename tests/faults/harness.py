"""Running one fault scenario: the services, the workload, the catch-up, the check.

`Rig` owns everything a scenario starts and stops all of it on exit, whatever
happened: service processes (`cargotrack serve <name>`, the command a container
runs), in-process ingest services, the workload. A `Keeper` restarts a kept
process that exits on its own, as Kubernetes restarts a crashed pod (the projector
exits when PostgreSQL goes away: that is its design, and the restart is counted).

The end of a scenario never sleeps and hopes: the workload ends (everything
acknowledged, or its deadline), the ingest services stop (their producers
flushed), then the projector must reach Kafka's end offsets of the three input
topics, as stored in PostgreSQL, and only then the checker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Self

import asyncpg
import grpc
from aiokafka import TopicPartition
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.devstack import DevStackError, KafkaBroker, PostgresServer
from devtools.devstack.ports import free_ports
from devtools.devstack.process import ChildProcess
from shared.db import create_pool
from shared.projection import load_offsets, wait_caught_up
from tests.faults.background import Background
from tests.faults.checker import Report, check
from tests.faults.workload import Size, Targets, Workload, make_plan
from tests.ingest_helpers import running_service, service_settings
from tests.projection_helpers import end_offsets, prepare, projector_settings

log = logging.getLogger(__name__)

INGEST = ("gps-ingest", "shipment-events", "delivery-confirmations")
#: How a child dies when gRPC's fork handlers crash it between fork and exec (a
#: process forked while gRPC threads are busy, with GRPC_ENABLE_FORK_SUPPORT on:
#: tests/faults/conftest.py turns it off, but only if grpc was not imported first).
SPAWN_CRASH = -signal.SIGSEGV


async def start_server(
    server: KafkaBroker | PostgresServer, *, keep_data: bool, attempts: int = 3
) -> None:
    """server.start(keep_data), again if the child crashed before it could exec."""
    for attempt in range(attempts):
        try:
            await server.start(keep_data=keep_data)
            return
        except DevStackError as error:
            if f"exit code {SPAWN_CRASH}" not in str(error) or attempt == attempts - 1:
                raise
            log.warning("%s crashed before exec; starting it again", type(server).__name__)


class ServiceProcess:
    """One `cargotrack serve <name>` process; SIGKILL-able, restartable on the same port."""

    def __init__(self, name: str, label: str, env: dict[str, str], log_path: Path, port: int):
        self.name = name
        self.label = label
        self.env = env
        self.log_path = log_path
        self.port = port
        self.starts = 0
        self._process: ChildProcess | None = None

    def start(self) -> None:
        assert not self.running, f"{self.label} is running"
        self._process = ChildProcess.spawn(
            [sys.executable, "-c", "from services.cli import main; main()", "serve", self.name],
            name=self.label,
            log_path=self.log_path,
            append_log=self.starts > 0,
            env={**self.env, "CARGOTRACK_GRPC_PORT": str(self.port)},
        )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    async def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill; returns once it is gone."""
        if self._process is not None:
            self._process.send_signal(signal.SIGKILL)
            await self._process.kill()

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (an orderly stop), SIGKILL after grace_s."""
        if self._process is not None:
            await self._process.terminate(signal.SIGTERM, grace_s)

    async def wait_serving(self, timeout_s: float = 60.0) -> None:
        """Until grpc.health.v1 says SERVING (raises with the log's tail otherwise)."""
        deadline = time.monotonic() + timeout_s
        respawns = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.running and self.returncode == SPAWN_CRASH and respawns < 3:
                    respawns += 1  # crashed before exec (see SPAWN_CRASH)
                    self.start()
                if not self.running:
                    raise AssertionError(f"{self.label} exited:\n{self.tail()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"{self.label} not SERVING in {timeout_s:g}s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_count(self, text: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(text)
        except OSError:
            return 0


class Keeper(Background):
    """Restarts the kept processes that exit, after a short back-off (counted)."""

    task_name = "keeper"

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[ServiceProcess] = []
        self.restarts: Counter[str] = Counter()

    def keep(self, process: ServiceProcess) -> None:
        if process not in self.kept:
            self.kept.append(process)

    @property
    def total(self) -> int:
        """Restarts so far, of every kept process."""
        return sum(self.restarts.values())

    def release(self, process: ServiceProcess) -> None:
        if process in self.kept:
            self.kept.remove(process)

    async def _run(self) -> None:
        while True:
            for process in list(self.kept):
                if not process.running:
                    self.restarts[process.label] += 1
                    log.info(
                        "keeper: %s exited (%s), restarting", process.label, process.returncode
                    )
                    process.start()
            await asyncio.sleep(0.3)


@dataclass(frozen=True)
class Servers:
    """Where a scenario's services and its check connect: Kafka, PostgreSQL and the
    schema there, and the prefix of the scenario's topics and consumer groups."""

    kafka_bootstrap: str
    database_url: str
    topic_prefix: str
    schema: str


class Rig:
    """One scenario's services, workload and check. `async with` stops everything."""

    def __init__(
        self,
        scenario: str,
        size: Size,
        tmp_path: Path,
        servers: Servers,
        *,
        seed: int,
        session_timeout_ms: int = 6000,
        max_records: int = 20,
        kafka_timeout_s: float = 3.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        """`extra_env`: more settings for every service of the scenario (in-process and
        processes alike), e.g. a Kafka cluster's topic replication."""
        extra = dict(extra_env or {})
        self.extra_env = extra
        self.scenario = scenario
        self.size = size
        self.tmp_path = tmp_path
        self.servers = servers
        self.kafka_timeout_s = kafka_timeout_s
        self.settings = projector_settings(
            servers.kafka_bootstrap,
            servers.database_url,
            servers.topic_prefix,
            servers.schema,
            CARGOTRACK_CONSUMER_SESSION_TIMEOUT_MS=str(session_timeout_ms),
            **extra,
        )
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": servers.kafka_bootstrap,
            "DATABASE_URL": servers.database_url,
            "CARGOTRACK_DB_SCHEMA": servers.schema,
            "CARGOTRACK_DEV_MODE": "1",
            "CARGOTRACK_TOPIC_PREFIX": servers.topic_prefix,
            "CARGOTRACK_TOPIC_PARTITIONS": "3",
            "CARGOTRACK_GRPC_HOST": "127.0.0.1",
            "CARGOTRACK_LOG_FORMAT": "console",
            "CARGOTRACK_KAFKA_TIMEOUT_S": str(kafka_timeout_s),
            "CARGOTRACK_SHUTDOWN_GRACE_S": "2",
            # A killed member holds its partitions until its session expires: keep it short.
            "CARGOTRACK_CONSUMER_SESSION_TIMEOUT_MS": str(session_timeout_ms),
            # Small transactions, so that a fault lands in the middle of the stream.
            "CARGOTRACK_PROJECTOR_MAX_RECORDS": str(max_records),
            **extra,
        }
        # Times relative to a base a few hours back: valid for ingest (never in the
        # future) and inside the position history's retention.
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        self.plan = make_plan(seed, size, now - timedelta(hours=3))
        self.targets = Targets("", "", "")
        self.workload: Workload | None = None
        self.keeper = Keeper()
        self.processes: list[ServiceProcess] = []
        self.ingest_processes: list[ServiceProcess] = []
        self.faults = 0
        #: Keeper restarts once the last fault was over and a projector committed after
        #: it (see `recovered`): any restart after that is a crash loop.
        self.restarts_when_recovered: int | None = None
        self.notes: dict[str, object] = {}
        self._stack = contextlib.AsyncExitStack()
        self._workload_task: asyncio.Task[None] | None = None
        self._started = time.monotonic()

    @property
    def topics(self) -> list[str]:
        t = self.settings.topics
        return [t.shipment_events, t.delivery_confirmations, t.gps_points]

    async def __aenter__(self) -> Self:
        await prepare(self.settings)
        self.keeper.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._workload_task is not None and not self._workload_task.done():
            self._workload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._workload_task
        await self.keeper.stop()
        for process in self.processes:
            await process.kill()
        await self._stack.aclose()

    # --- services --------------------------------------------------------------------------

    def spawn(self, name: str, label: str, *, keep: bool = False) -> ServiceProcess:
        [port] = free_ports(1)
        process = ServiceProcess(name, label, dict(self.env), self.tmp_path / f"{label}.log", port)
        process.start()
        self.processes.append(process)
        if keep:
            self.keeper.keep(process)
        return process

    def projector(self, label: str = "projector") -> ServiceProcess:
        """A projector process, restarted by the keeper whenever it exits."""
        return self.spawn("projector", label, keep=True)

    async def ingest_in_process(self) -> None:
        """The three ingest services in this process (for scenarios that do not kill them)."""
        settings = service_settings(
            self.servers.kafka_bootstrap,
            self.servers.topic_prefix,
            CARGOTRACK_KAFKA_TIMEOUT_S=self.kafka_timeout_s,
            CARGOTRACK_SHUTDOWN_GRACE_S=2,
            **self.extra_env,
        )
        ports = []
        for name in INGEST:
            running = await self._stack.enter_async_context(running_service(name, settings))
            ports.append(running.port)
        self.targets.gps, self.targets.events, self.targets.confirmations = (
            f"127.0.0.1:{port}" for port in ports
        )

    async def start_services(self, projector: str = "projector") -> ServiceProcess:
        """What most scenarios run: the three ingest services in this process and a
        projector process labelled `projector` (kept: restarted whenever it exits),
        which is returned."""
        await self.ingest_in_process()
        return self.projector(projector)

    async def ingest_as_processes(self) -> None:
        """The three ingest services as processes on fixed ports (restartable in place)."""
        self.ingest_processes = [self.spawn(name, name) for name in INGEST]
        for process in self.ingest_processes:
            await process.wait_serving()
        self.targets.gps, self.targets.events, self.targets.confirmations = (
            f"127.0.0.1:{p.port}" for p in self.ingest_processes
        )

    # --- workload --------------------------------------------------------------------------

    def start_workload(self) -> Workload:
        self.workload = Workload(self.plan, self.targets)
        self._started = time.monotonic()
        self._workload_task = asyncio.create_task(self.workload.run(), name="workload")
        return self.workload

    @property
    def workload_running(self) -> bool:
        return self._workload_task is not None and not self._workload_task.done()

    # --- the projection's progress (tolerates PostgreSQL being down) -----------------------

    async def stored_offsets(self) -> dict[TopicPartition, int] | None:
        try:
            async with asyncio.timeout(5):
                connection = await asyncpg.connect(
                    self.settings.database.url,
                    server_settings={"search_path": self.settings.database.schema},
                )
                try:
                    partitions = [TopicPartition(t, p) for t in self.topics for p in range(3)]
                    return await load_offsets(connection, "tracking", partitions)
                finally:
                    await connection.close()
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None

    async def lagging(self) -> bool:
        stored = await self.stored_offsets()
        ends = await end_offsets(self.settings, self.topics)
        return stored is None or any(stored.get(tp, -1) < end - 1 for tp, end in ends.items())

    async def wait_lagging(self, within_s: float = 2.0) -> bool:
        """Whether the projection is behind the log, waiting up to `within_s` (while the
        workload runs) for a moment when it is. A projector that keeps up is behind
        only between a write and its next commit: one random instant can miss that."""
        deadline = time.monotonic() + within_s
        while True:
            if await self.lagging():
                return True
            if not self.workload_running or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)

    async def wait_running(self, process: ServiceProcess, timeout_s: float = 30.0) -> None:
        """Until the keeper has (re)started the process."""
        async with asyncio.timeout(timeout_s):
            while not process.running:  # noqa: ASYNC110 - polls the child process
                await asyncio.sleep(0.05)

    async def wait_commit(self, timeout_s: float = 60.0) -> None:
        """Until the stored offsets move (a projector committed a batch)."""
        before = await self.stored_offsets()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stored = await self.stored_offsets()
            if stored is not None and stored != before:
                return
            if not self.workload_running and not await self.lagging():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no projector committed within {timeout_s:g}s")

    async def recovered(self) -> None:
        """Call after the last fault: waits until a projector committed a batch, then
        notes the restarts so far. `finish` fails if any process restarts after this
        (a crash loop the catch-up alone would not notice: it still makes progress)."""
        await self.wait_commit()
        self.restarts_when_recovered = self.keeper.total

    # --- the end ---------------------------------------------------------------------------

    async def finish(self) -> Report:
        """Workload done → ingest stopped → projector caught up → check."""
        assert self._workload_task is not None
        assert self.workload is not None
        await asyncio.wait_for(self._workload_task, self.size.deadline_s + 30)
        workload_s = time.monotonic() - self._started
        for process in self.ingest_processes:
            await process.stop()
        await self._stack.aclose()  # in-process ingest: drained, producers flushed
        ends = await end_offsets(self.settings, self.topics)
        pool = await create_pool(self.settings.database)
        try:
            caught = time.monotonic()
            try:
                await wait_caught_up(pool, "tracking", ends, timeout_s=120)
            except TimeoutError as error:
                tails = "\n".join(p.tail(1500) for p in self.processes if p.name == "projector")
                raise AssertionError(f"{error}\n{tails}") from None
            async with pool.acquire() as connection:
                report = await check(
                    self.scenario,
                    self.size.name,
                    self.workload.ledger,
                    self.settings,
                    connection,
                    faults=self.faults,
                    seconds=time.monotonic() - self._started,
                )
        finally:
            await pool.close()
        if self.restarts_when_recovered is not None:
            looping = self.keeper.total - self.restarts_when_recovered
            if looping:
                report.problems.append(
                    f"{looping} restarts after the faults were over (a crash loop): "
                    f"{dict(self.keeper.restarts)}"
                )
        crashed = [p.label for p in self.keeper.kept if not p.running]
        if crashed:
            report.problems.append(f"not running at the end: {crashed}")
        report.notes.update(
            {
                "workload s": round(workload_s, 1),
                "catch-up s": round(time.monotonic() - caught, 1),
                "restarts": dict(self.keeper.restarts),
                **self.notes,
            }
        )
        print(f"\n{self.scenario} ({self.size.name}):\n{report.summary()}")
        return report
