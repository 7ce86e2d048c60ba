"""The tracking-query process: TrackingService on gRPC, reading the PostgreSQL projection.

`QueryServer` is one running service (pool, LISTEN feed, gRPC server, readiness); it is
what `run` serves until SIGTERM and what the tests start in-process
(`server(settings)`), so the tests exercise the production wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.tracking_query.servicer import TrackingServicer
from services.tracking_query.watch import ChangeFeed
from shared import metrics, readiness
from shared.auth import Role
from shared.config import ConfigError, Settings
from shared.db import create_pool, migrate_or_check
from shared.lifecycle import StackedServer
from shared.pb import tracking_pb2, tracking_pb2_grpc
from shared.rpc import GrpcApp
from shared.runtime import Supervisor

log = logging.getLogger(__name__)

LABEL = "tracking-query"
SERVICE_NAME: str = tracking_pb2.DESCRIPTOR.services_by_name["TrackingService"].full_name

#: Roles that may read shipments. Customers are further limited to their own
#: shipments by the servicer; drivers read nothing here.
READERS = frozenset({Role.CUSTOMER, Role.OPS, Role.SHIPPER, Role.DISPATCHER})
ROLES = {
    f"/{SERVICE_NAME}/{method}": READERS
    for method in ("GetShipment", "ListShipments", "GetTimeline", "WatchShipment")
}
#: The tracking token is the secret: no bearer token needed.
PUBLIC_METHODS = (f"/{SERVICE_NAME}/TrackByToken", f"/{SERVICE_NAME}/WatchByToken")


class QueryServer(StackedServer):
    """One tracking-query service, running.

    `start()` migrates the schema (idempotent; a read-only role only checks that no
    migration is pending), opens the pool, starts the gRPC server
    on settings.grpc (port 0 picks a free one: see `port`) with health NOT_SERVING,
    and supervises two tasks: the LISTEN feed behind WatchShipment and the readiness
    monitor, which reports SERVING while PostgreSQL answers.

    `stop()` shuts down in order: health NOT_SERVING, the tasks stop, open watch
    streams end normally, `server.stop(grace)` lets in-flight calls finish, the pool
    closes. Idempotent and safe after a failed start; `async with` does both.
    `wait()` re-raises the first task failure.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.app: GrpcApp | None = None
        self.feed = ChangeFeed(settings.database)
        key = settings.page_token_key_bytes()
        if key is None:
            raise ConfigError(
                "CARGOTRACK_PAGE_TOKEN_KEY must be set for tracking-query when tokens are"
                " verified with a public key (there is no JWT secret to derive it from)"
            )
        self._page_token_key = key
        self._supervisor = Supervisor(LABEL)
        self._supervised: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        # Exit callbacks run in reverse order of registration: metrics and tracing last.
        await self._stack.enter_async_context(metrics.service_telemetry(self.settings, LABEL))
        # In Kubernetes its role is read-only: it only checks that none is pending.
        await migrate_or_check(self.settings.database)
        pool = await create_pool(self.settings.database)
        self._stack.push_async_callback(pool.close)
        servicer = TrackingServicer(pool, self.feed, self._page_token_key)
        app = GrpcApp(
            self.settings.grpc,
            self.settings.auth,
            [
                (
                    SERVICE_NAME,
                    lambda server: tracking_pb2_grpc.add_TrackingServiceServicer_to_server(
                        servicer, server
                    ),
                )
            ],
            ROLES,
            PUBLIC_METHODS,
        )
        self._stack.push_async_callback(app.stop)  # drains in-flight calls
        self._stack.callback(self.feed.close)  # open watches end first
        self.port = await app.start()
        self.app = app
        await app.set_serving(False)
        self._supervisor.spawn("watch-feed", self.feed.run())
        self._supervisor.spawn(
            "readiness",
            readiness.monitor({"postgres": readiness.postgres_check(pool)}, app.set_serving),
        )
        self._supervised = asyncio.create_task(self._supervisor.run(), name=f"{LABEL}:supervisor")
        self._stack.push_async_callback(self._stop_tasks)
        self._stack.push_async_callback(app.health.enter_graceful_shutdown)
        log.info(
            "%s listening on %s:%d",
            LABEL,
            self.settings.grpc.host,
            self.port,
            extra={"service": LABEL, "port": self.port},
        )

    async def wait(self) -> None:
        """Until `stop()` (returns) or a supervised task fails (raises). Cancelling the
        wait does not stop anything: `stop()` does, in order."""
        assert self._supervised is not None, "start() first"
        await asyncio.shield(self._supervised)

    async def _stop_tasks(self) -> None:
        assert self._supervised is not None
        self._supervisor.request_stop()
        # A task failure was logged by the supervisor and is raised by wait().
        with contextlib.suppress(Exception):
            await self._supervised


def server(settings: Settings) -> QueryServer:
    """The service, not started: `async with server(settings) as running: running.port`."""
    return QueryServer(settings)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT or the first task failure (re-raised after an ordered
    shutdown). Prints "tracking-query listening on host:port" once serving, so a
    launcher that asked for port 0 can find the port."""
    async with QueryServer(settings) as running:
        print(f"{LABEL} listening on {settings.grpc.host}:{running.port}", flush=True)
        # Signals stop this supervisor only; leaving the block then stops the server
        # in its order (health NOT_SERVING before anything else).
        supervisor = Supervisor(LABEL)
        supervisor.install_signal_handlers()
        supervisor.spawn("serve", running.wait())
        await supervisor.run()
