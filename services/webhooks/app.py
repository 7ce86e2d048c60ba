"""The webhooks process: WebhookService on gRPC, and the delivery worker.

Three supervised tasks beside the gRPC server: the consumer (shared.projection's
runner with services/webhooks/projection.py: its own group on the alerts topic,
deliveries recorded with its offsets), the sender (services/webhooks/sender.py) and
the readiness monitor (SERVING while Kafka and PostgreSQL answer). Any replica may
run: the consumer group splits the partitions, and the sender's leases keep two
replicas from attempting one delivery at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.webhooks.projection import WebhookProjection
from services.webhooks.sender import Sender
from services.webhooks.servicer import WebhookServicer
from shared import metrics, readiness
from shared.auth import Role
from shared.config import Settings
from shared.db import create_pool, migrate
from shared.kafka import ensure_topics, make_producer, topic_specs
from shared.lifecycle import StackedServer
from shared.pb import webhooks_pb2, webhooks_pb2_grpc
from shared.projection import ProjectionRunner
from shared.readmodel import webhooks as store
from shared.rpc import GrpcApp
from shared.runtime import Supervisor, periodically

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


class WebhookServer(StackedServer):
    """One webhooks service, running (see the module docstring).

    `start()` migrates, creates the topics, opens the pool and the dead-letter
    producer, starts the gRPC server (health NOT_SERVING until readiness says
    otherwise) and the tasks. `stop()` undoes it in reverse: health NOT_SERVING,
    tasks stopped (an attempt in flight is abandoned: its lease runs out and it is
    attempted again), the server drained, producer and pool closed. `wait()`
    re-raises the first task failure.
    """

    def __init__(self, settings: Settings, *, poll_timeout_ms: int = 200) -> None:
        super().__init__()
        self.settings = settings
        self.app: GrpcApp | None = None
        self.runner: ProjectionRunner | None = None
        self.sender: Sender | None = None
        self._poll_timeout_ms = poll_timeout_ms
        self._supervisor = Supervisor(LABEL)
        self._supervised: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        settings = self.settings
        await self._stack.enter_async_context(metrics.service_telemetry(settings, LABEL))
        await migrate(settings.database)
        await ensure_topics(settings.kafka, topic_specs(settings.topics))
        pool = await create_pool(settings.database)
        self._stack.push_async_callback(pool.close)
        producer = make_producer(settings.kafka)  # dead letters of undecodable records
        await producer.start()
        self._stack.push_async_callback(producer.stop)
        servicer = WebhookServicer(pool, settings.webhooks)
        app = GrpcApp(
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
        self._stack.push_async_callback(app.stop)
        self.port = await app.start()
        self.app = app
        await app.set_serving(False)
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
        self._supervisor.spawn("consumer", self.runner.run())
        self._supervisor.spawn("sender", sender.run())

        async def prune() -> None:
            async with pool.acquire() as connection:
                deliveries, endpoints = await store.prune(
                    connection, settings.webhooks.retention_days
                )
            if deliveries or endpoints:
                log.info("pruned %d deliveries and %d deleted webhooks", deliveries, endpoints)

        self._supervisor.spawn("retention", periodically(PRUNE_INTERVAL_S, prune))
        self._supervisor.spawn(
            "readiness",
            readiness.monitor(
                {
                    "kafka": readiness.kafka_check(producer),
                    "postgres": readiness.postgres_check(pool),
                },
                app.set_serving,
            ),
        )
        self._supervised = asyncio.create_task(self._supervisor.run(), name=f"{LABEL}:supervisor")
        self._stack.push_async_callback(self._stop_tasks)
        self._stack.push_async_callback(app.health.enter_graceful_shutdown)
        log.info("%s listening on %s:%d", LABEL, settings.grpc.host, self.port)

    async def wait(self) -> None:
        """Until `stop()` (returns) or a supervised task fails (raises)."""
        assert self._supervised is not None, "start() first"
        await asyncio.shield(self._supervised)

    async def _stop_tasks(self) -> None:
        assert self._supervised is not None
        self._supervisor.request_stop()
        # A task failure was logged by the supervisor and is raised by wait().
        with contextlib.suppress(Exception):
            await self._supervised


def server(settings: Settings, *, poll_timeout_ms: int = 200) -> WebhookServer:
    """The service, not started: `async with server(settings) as running: running.port`."""
    return WebhookServer(settings, poll_timeout_ms=poll_timeout_ms)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT or the first task failure (`cargotrack serve webhooks`).
    Prints "webhooks listening on host:port" once serving."""
    async with WebhookServer(settings) as running:
        print(f"{LABEL} listening on {settings.grpc.host}:{running.port}", flush=True)
        supervisor = Supervisor(LABEL)
        supervisor.install_signal_handlers()
        supervisor.spawn("serve", running.wait())
        await supervisor.run()
