"""The tracking-query process: TrackingService on gRPC, reading the PostgreSQL projection.

`QueryServer` is one running service (pool, LISTEN feed, gRPC server, readiness); it is
what `run` serves until SIGTERM and what the tests start in-process
(`server(settings)`), so the tests exercise the production wiring.
"""

from __future__ import annotations

import logging

from services.tracking_query.cache import ResponseCache
from services.tracking_query.servicer import TrackingServicer, add_to_server
from services.tracking_query.watch import ChangeFeed
from shared import readiness
from shared.auth import Role
from shared.config import ConfigError, Settings
from shared.db import create_pool, migrate_or_check
from shared.pb import tracking_pb2
from shared.rpc import GrpcApp
from shared.runtime import ServiceServer, serve

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


class QueryServer(ServiceServer):
    """One tracking-query service, running (a `ServiceServer`).

    `start()` migrates the schema (idempotent; a read-only role only checks that no
    migration is pending), opens the pool, starts the gRPC server
    on settings.grpc (port 0 picks a free one: see `port`) with health NOT_SERVING,
    and supervises the LISTEN feed behind WatchShipment and the readiness check,
    which reports SERVING while PostgreSQL answers.

    `stop()` shuts down in order: health NOT_SERVING, the tasks stop, open watch
    streams end normally, `server.stop(grace)` lets in-flight calls finish, the pool
    closes. Idempotent and safe after a failed start; `async with` does both.
    `wait()` re-raises the first task failure.

    `cache` holds GetShipment and TrackByToken answers (CARGOTRACK_QUERY_CACHE_MB;
    services/tracking_query/cache.py), kept true by the LISTEN feed. `feed`: tests
    pass a ChangeFeed whose connections they control; by default one on
    settings.database.
    """

    def __init__(self, settings: Settings, *, feed: ChangeFeed | None = None) -> None:
        super().__init__(settings, LABEL)
        self.feed = feed if feed is not None else ChangeFeed(settings.database)
        self.cache = ResponseCache(settings.query_cache_mb * 1024 * 1024)
        self.feed.observe(self.cache)
        self.servicer: TrackingServicer | None = None
        key = settings.page_token_key_bytes()
        if key is None:
            raise ConfigError(
                "CARGOTRACK_PAGE_TOKEN_KEY must be set for tracking-query when tokens are"
                " verified with a public key (there is no JWT secret to derive it from)"
            )
        self._page_token_key = key

    async def _start(self) -> None:
        # In Kubernetes its role is read-only: it only checks that none is pending.
        await migrate_or_check(self.settings.database)
        pool = await create_pool(self.settings.database)
        self.on_stop(pool.close)
        servicer = TrackingServicer(pool, self.feed, self._page_token_key, self.cache)
        self.servicer = servicer
        await self.serve_grpc(
            GrpcApp(
                self.settings.grpc,
                self.settings.auth,
                [(SERVICE_NAME, lambda server: add_to_server(servicer, server))],
                ROLES,
                PUBLIC_METHODS,
            )
        )
        self.spawn("watch-feed", self.feed.run())
        self.check("postgres", readiness.postgres_check(pool))

    async def _drain(self) -> None:
        self.feed.close()  # open watches end before the grace period


def server(settings: Settings) -> QueryServer:
    """The service, not started: `async with server(settings) as running: running.port`."""
    return QueryServer(settings)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT or the first task failure (re-raised after an ordered
    shutdown). Prints "tracking-query listening on host:port" once serving, so a
    launcher that asked for port 0 can find the port."""
    await serve(QueryServer(settings))
