"""The dispatch process: DispatchService on gRPC, fed by one shared reader of the alerts topic."""

from __future__ import annotations

import logging

from services.dispatch.hub import DEFAULT_BUFFER_SIZE, DEFAULT_MAX_CATCHUPS, AlertHub
from services.dispatch.servicer import DispatchServicer
from shared.auth import Role
from shared.config import Settings
from shared.kafka import topic_specs
from shared.pb import dispatch_pb2, dispatch_pb2_grpc
from shared.rpc import GrpcApp
from shared.runtime import ServiceServer, serve

log = logging.getLogger(__name__)

LABEL = "dispatch"
SERVICE_NAME: str = dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"].full_name

#: Dispatchers and operations staff watch their tenant's delays.
ROLES = {f"/{SERVICE_NAME}/SubscribeDelays": frozenset({Role.DISPATCHER, Role.OPS})}


class DispatchServer(ServiceServer):
    """The dispatch service, running: alert hub, gRPC server, readiness (a
    `ServiceServer`).

    `start()` starts the hub (it connects to Kafka in the background), then the gRPC
    server on settings.grpc (port 0 picks a free one: see `port`) with health
    NOT_SERVING, and a readiness check that reports SERVING only while Kafka answers
    and the hub's reader is positioned; the hub's reader failing fails the service.

    `stop()` shuts down in order: health NOT_SERVING, readiness, every stream ended
    with UNAVAILABLE ("resume with your last token", so clients move to another
    instance at once instead of waiting for the grace period), server.stop(grace),
    then the hub's readers. Idempotent and safe after a failed start; `async with`
    does both.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        max_catchups: int = DEFAULT_MAX_CATCHUPS,
        readiness_interval_s: float = 2.0,
    ) -> None:
        super().__init__(settings, LABEL, readiness_interval_s=readiness_interval_s)
        alerts = settings.topics.shipment_alerts
        alerts_topic = next(spec for spec in topic_specs(settings.topics) if spec.name == alerts)
        self.hub = AlertHub(
            settings.kafka, alerts_topic, buffer_size=buffer_size, max_catchups=max_catchups
        )

    async def _start(self) -> None:
        await self.hub.start()
        self.on_stop(self.hub.stop)
        await self.serve_grpc(
            GrpcApp(
                self.settings.grpc,
                self.settings.auth,
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
        )
        self.check("kafka", self.hub.probe)
        self.spawn("alert-hub", self.hub.wait())

    async def _drain(self) -> None:
        self.hub.close_subscriptions()


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
    await serve(DispatchServer(settings))
