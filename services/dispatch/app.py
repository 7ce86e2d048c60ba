"""The dispatch process: DispatchService on gRPC, fed by one shared reader of the alerts topic."""

from __future__ import annotations

import asyncio
import logging

from services.dispatch.hub import DEFAULT_BUFFER_SIZE, DEFAULT_MAX_CATCHUPS, AlertHub
from services.dispatch.servicer import DispatchServicer
from shared import metrics, readiness
from shared.auth import Role
from shared.config import Settings
from shared.kafka import topic_specs
from shared.lifecycle import StackedServer, cancel_and_wait
from shared.pb import dispatch_pb2, dispatch_pb2_grpc
from shared.rpc import GrpcApp
from shared.runtime import Supervisor

log = logging.getLogger(__name__)

LABEL = "dispatch"
SERVICE_NAME: str = dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"].full_name

#: Dispatchers and operations staff watch their tenant's delays.
ROLES = {f"/{SERVICE_NAME}/SubscribeDelays": frozenset({Role.DISPATCHER, Role.OPS})}


class DispatchServer(StackedServer):
    """The dispatch service, running: alert hub, gRPC server, readiness.

    `start()` starts the hub (it connects to Kafka in the background), then the gRPC
    server on settings.grpc (port 0 picks a free one: see `port`) with health
    NOT_SERVING, and a readiness task that reports SERVING only while Kafka answers
    and the hub's reader is positioned.

    `stop()` shuts down in order: health NOT_SERVING, every stream ended with
    UNAVAILABLE ("resume with your last token", so clients move to another
    instance at once instead of waiting for the grace period), server.stop(grace),
    readiness, then the hub's readers. Idempotent and safe after a failed start;
    `async with` does both.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        max_catchups: int = DEFAULT_MAX_CATCHUPS,
        readiness_interval_s: float = 2.0,
    ) -> None:
        super().__init__()
        self.settings = settings
        alerts = settings.topics.shipment_alerts
        alerts_topic = next(spec for spec in topic_specs(settings.topics) if spec.name == alerts)
        self.hub = AlertHub(
            settings.kafka, alerts_topic, buffer_size=buffer_size, max_catchups=max_catchups
        )
        self.app = GrpcApp(
            settings.grpc,
            settings.auth,
            [
                (
                    SERVICE_NAME,
                    lambda server: dispatch_pb2_grpc.add_DispatchServiceServicer_to_server(
                        DispatchServicer(self.hub), server
                    ),
                )
            ],
            ROLES,
        )
        self._readiness_interval_s = readiness_interval_s
        self._readiness: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        # Telemetry first, so it covers the whole shutdown.
        await self._stack.enter_async_context(metrics.service_telemetry(self.settings, "dispatch"))
        # Exit callbacks run in reverse: drain the server, then readiness, then the hub.
        await self.hub.start()
        self._stack.push_async_callback(self.hub.stop)
        self.port = await self.app.start()
        await self.app.set_serving(False)
        self._readiness = asyncio.create_task(
            readiness.monitor(
                {"kafka": self.hub.probe}, self.app.set_serving, self._readiness_interval_s
            ),
            name="dispatch-readiness",
        )
        self._stack.push_async_callback(self._stop_readiness)
        self._stack.push_async_callback(self._drain)
        log.info("%s listening on %s:%d", LABEL, self.settings.grpc.host, self.port)

    async def _drain(self) -> None:
        await self.app.set_serving(False)
        self.hub.close_subscriptions()
        await self.app.stop()

    async def _stop_readiness(self) -> None:
        await cancel_and_wait(self._readiness)

    async def wait(self) -> None:
        """Run until cancelled; raise if the hub's reader or the readiness task fails."""
        assert self._readiness is not None, "start() first"
        hub = asyncio.ensure_future(self.hub.wait())
        ready = asyncio.ensure_future(asyncio.shield(self._readiness))
        try:
            done, _ = await asyncio.wait({hub, ready}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            hub.cancel()
            ready.cancel()


def server(
    settings: Settings,
    *,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    max_catchups: int = DEFAULT_MAX_CATCHUPS,
    readiness_interval_s: float = 2.0,
) -> DispatchServer:
    """The service, not started: `async with server(settings) as running: running.port`."""
    return DispatchServer(
        settings,
        buffer_size=buffer_size,
        max_catchups=max_catchups,
        readiness_interval_s=readiness_interval_s,
    )


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (what `cargotrack serve dispatch` runs)."""
    supervisor = Supervisor(LABEL)
    supervisor.install_signal_handlers()
    async with DispatchServer(settings) as running:
        print(f"{LABEL} listening on {settings.grpc.host}:{running.port}", flush=True)
        supervisor.spawn("dispatch", running.wait())
        await supervisor.run()
