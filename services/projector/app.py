"""The projector process: consumer group member, outbox relay, maintenance."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime

from services.projector.live import LiveTracker
from services.projector.models import ModelStore
from services.projector.outbox import OutboxRelay
from services.projector.projection import TrackingProjection
from services.projector.stale import StaleScanner
from shared import metrics, readiness
from shared import tracking_store as store
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.kafka import ensure_topics, make_producer, topic_specs
from shared.projection import ProjectionRunner
from shared.rpc import GrpcApp
from shared.runtime import Supervisor, periodically

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 3600.0


async def run(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT or the first failure (which is re-raised)."""
    # Signals first: a SIGTERM during start-up still ends in an orderly stop.
    supervisor = Supervisor("projector")
    supervisor.install_signal_handlers()
    await migrate(settings.database)
    await ensure_topics(settings.kafka, topic_specs(settings.topics))
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(metrics.service_telemetry(settings, "projector"))
        pool = await create_pool(settings.database)
        stack.push_async_callback(pool.close)
        producer = make_producer(settings.kafka)
        await producer.start()
        stack.push_async_callback(producer.stop)
        # Health only: probes and the dev launcher wait on it.
        app = GrpcApp(settings.grpc, settings.auth, services=[], roles={})
        port = await app.start()
        stack.push_async_callback(app.stop)
        log.info("projector health on port %d", port)

        # Learned models (services/learner) are hot-loaded between batches.
        models = ModelStore(pool, settings.learner.model_poll_s)
        await models.refresh()
        projection = TrackingProjection(
            settings.topics, LiveTracker(settings.alerts, models=models)
        )
        runner = ProjectionRunner(
            projection,
            pool,
            settings.kafka,
            settings.topics.dead_letters,
            producer,
            topic_prefix=settings.topics.prefix,
            max_records=settings.projector_max_records,
        )
        relay = OutboxRelay(settings, pool, producer)

        async def maintain() -> None:
            async with pool.acquire() as connection:
                created, dropped = await store.maintain_position_partitions(
                    connection, datetime.now(UTC), settings.position_retention_days
                )
            if created or dropped:
                log.info("history partitions: created %s, dropped %s", created, dropped)

        # The history's day partitions must exist before the projection writes: a
        # point that lands in the DEFAULT partition for a day that gets its partition
        # later makes creating that partition fail, and the projector crash-loops.
        await maintain()
        supervisor.spawn("projection", runner.run())
        supervisor.spawn("outbox", relay.run())
        supervisor.spawn("models", models.run())
        supervisor.spawn("maintenance", periodically(MAINTENANCE_INTERVAL_S, maintain))
        supervisor.spawn("stale-tracking", StaleScanner(pool, settings.alerts).run())
        supervisor.spawn(
            "readiness",
            readiness.monitor(
                {
                    "kafka": readiness.kafka_check(producer),
                    "postgres": readiness.postgres_check(pool),
                },
                app.set_serving,
            ),
        )
        await supervisor.run()
