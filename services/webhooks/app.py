"""The webhooks process: WebhookService on gRPC, and the delivery worker.

Three supervised tasks beside the gRPC server: the consumer (shared.projection's
runner with services/webhooks/projection.py: its own group on the alerts topic,
deliveries recorded with its offsets), the sender (services/webhooks/sender.py) and
the readiness monitor (SERVING while Kafka and PostgreSQL answer). Any replica may
run: the consumer group splits the partitions, and the sender's leases keep two
replicas from attempting one delivery at once.
"""

from __future__ import annotations

import logging

from services.webhooks.projection import WebhookProjection
from services.webhooks.sender import Sender
from services.webhooks.servicer import WebhookServicer
from shared import readiness
from shared.auth import Role
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.kafka import ensure_topics, make_producer, topic_specs
from shared.pb import webhooks_pb2, webhooks_pb2_grpc
from shared.projection import ProjectionRunner
from shared.readmodel import webhooks as store
from shared.rpc import GrpcApp
from shared.runtime import ServiceServer, periodically, serve

log = logging.getLogger(__name__)

LABEL = "webhooks"
SERVICE_NAME: str = webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name

#: A tenant's dispatchers and operations staff manage its webhooks (as SubscribeDelays).
MANAGERS = frozenset({Role.DISPATCHER, Role.OPS})
ROLES = {
    f"/{SERVICE_NAME}/{method}": MANAGERS
    for method in ("CreateWebhook", "ListWebhooks", "DeleteWebhook", "ListDeliveries")
}


#: How often finished deliveries past CARGOTRACK_WEBHOOK_RETENTION_DAYS are deleted.
PRUNE_INTERVAL_S = 3600.0


class WebhookServer(ServiceServer):
    """One webhooks service, running (a `ServiceServer`; see the module docstring).

    `start()` migrates, creates the topics, opens the pool and the dead-letter
    producer, starts the gRPC server (health NOT_SERVING until readiness says
    otherwise) and the tasks. `stop()` undoes it in reverse: health NOT_SERVING,
    tasks stopped (an attempt in flight is abandoned: its lease runs out and it is
    attempted again), the server drained, producer and pool closed. `wait()`
    re-raises the first task failure.
    """

    def __init__(self, settings: Settings, *, poll_timeout_ms: int = 200) -> None:
        super().__init__(settings, LABEL)
        self.runner: ProjectionRunner | None = None
        self.sender: Sender | None = None
        self._poll_timeout_ms = poll_timeout_ms

    async def _start(self) -> None:
        settings = self.settings
        await migrate(settings.database)
        await ensure_topics(settings.kafka, topic_specs(settings.topics))
        pool = await create_pool(settings.database)
        self.on_stop(pool.close)
        producer = make_producer(settings.kafka)  # dead letters of undecodable records
        await producer.start()
        self.on_stop(producer.stop)
        servicer = WebhookServicer(pool, settings.webhooks)
        await self.serve_grpc(
            GrpcApp(
                settings.grpc,
                settings.auth,
                [
                    (
                        SERVICE_NAME,
                        lambda server: webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(
                            servicer, server
                        ),
                    )
                ],
                ROLES,
            )
        )
        self.sender = sender = Sender(settings.webhooks, pool)
        projection = WebhookProjection(settings.topics, on_recorded=sender.wake)
        self.runner = ProjectionRunner(
            projection,
            pool,
            settings.kafka,
            settings.topics.dead_letters,
            producer,
            topic_prefix=settings.topics.prefix,
            poll_timeout_ms=self._poll_timeout_ms,
        )
        self.spawn("consumer", self.runner.run())
        self.spawn("sender", sender.run())

        async def prune() -> None:
            async with pool.acquire() as connection:
                deliveries, endpoints = await store.prune(
                    connection, settings.webhooks.retention_days
                )
            if deliveries or endpoints:
                log.info("pruned %d deliveries and %d deleted webhooks", deliveries, endpoints)

        self.spawn("retention", periodically(PRUNE_INTERVAL_S, prune))
        self.check("kafka", readiness.kafka_check(producer))
        self.check("postgres", readiness.postgres_check(pool))


def server(settings: Settings, *, poll_timeout_ms: int = 200) -> WebhookServer:
    """The service, not started: `async with server(settings) as running: running.port`."""
    return WebhookServer(settings, poll_timeout_ms=poll_timeout_ms)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT or the first task failure (`cargotrack serve webhooks`).
    Prints "webhooks listening on host:port" once serving."""
    await serve(WebhookServer(settings))
