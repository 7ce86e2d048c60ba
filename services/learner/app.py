"""The learner process: one consumer group member on gps-points, health for probes."""

from __future__ import annotations

import contextlib
import logging

import asyncpg
from aiokafka import AIOKafkaProducer

from services.learner.projection import LearnerProjection
from shared import metrics, readiness
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.kafka import ensure_topics, make_producer, topic_specs
from shared.projection import ProjectionRunner
from shared.rpc import GrpcApp
from shared.runtime import Supervisor

log = logging.getLogger(__name__)

#: Records per transaction: a batch saves every touched tenant's whole state, so the
#: learner prefers fewer, larger batches than the projector.
LEARNER_MAX_RECORDS = 20_000
#: Poll wait: while following live, a state is saved about once a second per tenant.
LEARNER_POLL_MS = 1000


def build_runner(
    settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer
) -> ProjectionRunner:
    """The learner's runner, as production builds it (tests use this too)."""
    return ProjectionRunner(
        LearnerProjection(settings.topics, settings.learner),
        pool,
        settings.kafka,
        settings.topics.dead_letters,
        producer,
        topic_prefix=settings.topics.prefix,
        max_records=LEARNER_MAX_RECORDS,
        poll_timeout_ms=LEARNER_POLL_MS,
    )


async def run(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT or the first failure (which is re-raised)."""
    supervisor = Supervisor("learner")
    supervisor.install_signal_handlers()
    await migrate(settings.database)
    await ensure_topics(settings.kafka, topic_specs(settings.topics))
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(metrics.service_telemetry(settings, "learner"))
        pool = await create_pool(settings.database)
        stack.push_async_callback(pool.close)
        producer = make_producer(settings.kafka)  # dead letters
        await producer.start()
        stack.push_async_callback(producer.stop)
        app = GrpcApp(settings.grpc, settings.auth, services=[], roles={})
        port = await app.start()
        stack.push_async_callback(app.stop)
        log.info("learner health on port %d", port)
        runner = build_runner(settings, pool, producer)
        supervisor.spawn("learning", runner.run())
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
