"""The learner process: one consumer group member on gps-points, health for probes.

`LearnerServer` is one running learner (a `shared.runtime.ServiceServer`); it is what
`run` serves until SIGTERM and what the tests start in-process (`server(settings)`).
"""

from __future__ import annotations

import logging

import asyncpg
from aiokafka import AIOKafkaProducer

from services.learner.projection import LearnerProjection
from shared import readiness
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.kafka import ensure_topics, make_producer, topic_specs
from shared.projection import ProjectionRunner
from shared.rpc import GrpcApp
from shared.runtime import ServiceServer, serve

log = logging.getLogger(__name__)

LABEL = "learner"
#: Records per transaction: a batch saves every touched tenant's whole state, so the
#: learner prefers fewer, larger batches than the projector.
LEARNER_MAX_RECORDS = 20_000
#: Poll wait: while following live, a state is saved about once a second per tenant.
LEARNER_POLL_MS = 1000


def build_runner(
    settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer
) -> ProjectionRunner:
    """The learner's runner, as production builds it."""
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


class LearnerServer(ServiceServer):
    """The learner, running: schema and topics ensured, pool, producer (dead
    letters), health only on settings.grpc, the learning runner and readiness
    (Kafka and PostgreSQL). Once started, `pool`, `producer` and `runner` are the
    running parts. `stop()`: health NOT_SERVING, the runner stops (an unfinished
    batch rolls back), the health server, the producer, the pool."""

    # Set by start().
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    runner: ProjectionRunner

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, LABEL)

    async def _start(self) -> None:
        settings = self.settings
        await migrate(settings.database)
        await ensure_topics(settings.kafka, topic_specs(settings.topics))
        pool = self.pool = await create_pool(settings.database)
        self.on_stop(pool.close)
        producer = self.producer = make_producer(settings.kafka)  # dead letters
        await producer.start()
        self.on_stop(producer.stop)
        await self.serve_grpc(GrpcApp(settings.grpc, settings.auth, services=[], roles={}))
        self.runner = build_runner(settings, pool, producer)
        self.spawn("learning", self.runner.run())
        self.check("kafka", readiness.kafka_check(producer))
        self.check("postgres", readiness.postgres_check(pool))


def server(settings: Settings) -> LearnerServer:
    """The service, not started: `async with server(settings) as running: running.runner`."""
    return LearnerServer(settings)


async def run(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT or the first failure (re-raised after an ordered
    shutdown): what `cargotrack serve learner` runs."""
    await serve(LearnerServer(settings))
