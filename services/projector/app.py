"""The projector process: consumer group member, outbox relay, maintenance.

`ProjectorServer` is one running projector (a `shared.runtime.ServiceServer`); it is
what `run` serves until SIGTERM and what the tests start in-process
(`server(settings)`), so the tests exercise the production wiring: the projection
runner, the alert outbox relay, the learned models' poll, the history partitions'
maintenance, the stale-tracking scan and readiness.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer

from services.projector.freshness import ReceiptAges
from services.projector.live import LiveTracker
from services.projector.models import ModelStore
from services.projector.outbox import OutboxRelay
from services.projector.projection import TrackingProjection
from services.projector.stale import SCAN_INTERVAL_S, StaleScanner
from shared import readiness
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.kafka import ensure_topics, make_producer, topic_specs
from shared.projection import ProjectionRunner
from shared.readmodel import vehicle_positions
from shared.rpc import GrpcApp
from shared.runtime import READINESS_INTERVAL_S, ServiceServer, periodically, serve

log = logging.getLogger(__name__)

LABEL = "projector"
MAINTENANCE_INTERVAL_S = 3600.0
#: How long the outbox relay waits when no alert is pending.
OUTBOX_IDLE_S = 0.1


class ProjectorServer(ServiceServer):
    """The projector, running.

    `start()` migrates the schema, creates the topics, opens the pool and the
    producer, serves health only on settings.grpc (probes and the dev launcher wait
    on it), loads the learned models, creates the history's day partitions, then
    supervises: the projection runner, the outbox relay, the models' poll, the
    partitions' maintenance (every `maintenance_interval_s`), the stale-tracking
    scan (every `stale_scan_interval_s`) and the readiness checks (Kafka and
    PostgreSQL). Once started, `pool`, `producer`, `models`, `runner`, `relay` and
    `scanner` are the running parts.

    `stop()`: health NOT_SERVING, every task stopped (an unfinished batch rolls back),
    the health server, the producer (flushed), the pool. `wait()` raises the first
    task failure. `group_id` (default `<prefix>tracking`) and the intervals are for
    tests; production uses the defaults.
    """

    # Set by start().
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    models: ModelStore
    runner: ProjectionRunner
    relay: OutboxRelay
    scanner: StaleScanner

    def __init__(
        self,
        settings: Settings,
        *,
        group_id: str | None = None,
        readiness_interval_s: float = READINESS_INTERVAL_S,
        outbox_idle_s: float = OUTBOX_IDLE_S,
        stale_scan_interval_s: float = SCAN_INTERVAL_S,
        maintenance_interval_s: float = MAINTENANCE_INTERVAL_S,
    ) -> None:
        super().__init__(settings, LABEL, readiness_interval_s=readiness_interval_s)
        self._group_id = group_id
        self._outbox_idle_s = outbox_idle_s
        self._stale_scan_interval_s = stale_scan_interval_s
        self._maintenance_interval_s = maintenance_interval_s

    async def _start(self) -> None:
        settings = self.settings
        await migrate(settings.database)
        await ensure_topics(settings.kafka, topic_specs(settings.topics))
        pool = self.pool = await create_pool(settings.database)
        self.on_stop(pool.close)
        producer = self.producer = make_producer(settings.kafka)
        await producer.start()
        self.on_stop(producer.stop)
        await self.serve_grpc(GrpcApp(settings.grpc, settings.auth, services=[], roles={}))

        # Learned models (services/learner) are hot-loaded between batches.
        models = self.models = ModelStore(pool, settings.learner.model_poll_s)
        await models.refresh()
        projection = TrackingProjection(
            settings.topics,
            LiveTracker(settings.alerts, models=models),
            freshness=ReceiptAges(),
        )
        self.runner = ProjectionRunner(
            projection,
            pool,
            settings.kafka,
            settings.topics.dead_letters,
            producer,
            group_id=self._group_id,
            topic_prefix=settings.topics.prefix,
            max_records=settings.projector_max_records,
            latency_budget_s=(settings.projector_latency_budget_ms / 1000) or None,
            pipelined=settings.projector_pipelined,
        )
        self.relay = OutboxRelay(settings, pool, producer, idle_s=self._outbox_idle_s)
        self.scanner = StaleScanner(pool, settings.alerts, interval_s=self._stale_scan_interval_s)
        # The history's day partitions must exist before the projection writes: a
        # point that lands in the DEFAULT partition for a day that gets its partition
        # later makes creating that partition fail, and the projector crash-loops.
        await self.maintain()
        self.spawn("projection", self.runner.run())
        self.spawn("outbox", self.relay.run())
        self.spawn("models", models.run())
        self.spawn("maintenance", periodically(self._maintenance_interval_s, self.maintain))
        self.spawn("stale-tracking", self.scanner.run())
        self.check("kafka", readiness.kafka_check(producer))
        self.check("postgres", readiness.postgres_check(pool))

    async def maintain(self) -> None:
        """Create the history's day partitions ahead, drop those past retention."""
        async with self.pool.acquire() as connection:
            created, dropped = await vehicle_positions.maintain_position_partitions(
                connection, datetime.now(UTC), self.settings.position_retention_days
            )
        if created or dropped:
            log.info("history partitions: created %s, dropped %s", created, dropped)


def server(
    settings: Settings,
    *,
    group_id: str | None = None,
    readiness_interval_s: float = READINESS_INTERVAL_S,
    outbox_idle_s: float = OUTBOX_IDLE_S,
    stale_scan_interval_s: float = SCAN_INTERVAL_S,
    maintenance_interval_s: float = MAINTENANCE_INTERVAL_S,
) -> ProjectorServer:
    """The service, not started: `async with server(settings) as running: running.runner`."""
    return ProjectorServer(
        settings,
        group_id=group_id,
        readiness_interval_s=readiness_interval_s,
        outbox_idle_s=outbox_idle_s,
        stale_scan_interval_s=stale_scan_interval_s,
        maintenance_interval_s=maintenance_interval_s,
    )


async def run(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT or the first failure (re-raised after an ordered
    shutdown): what `cargotrack serve projector` runs."""
    await serve(ProjectorServer(settings))
