"""The shipment-events process: ShipmentEventsService on gRPC, writing to the events topic."""

from __future__ import annotations

from services.shipment_events.servicer import ShipmentEventsServicer
from shared.auth import Role
from shared.config import Settings
from shared.ingest import IngestServer, IngestService, KafkaLink, serve
from shared.pb import shipment_pb2, shipment_pb2_grpc

LABEL = "shipment-events"
SERVICE_NAME: str = shipment_pb2.DESCRIPTOR.services_by_name["ShipmentEventsService"].full_name

#: Shippers and operations staff record events for their own tenant.
_RECORDERS = frozenset({Role.SHIPPER, Role.OPS})
ROLES = {
    f"/{SERVICE_NAME}/RecordEvent": _RECORDERS,
    f"/{SERVICE_NAME}/RecordEvents": _RECORDERS,
}


def build(settings: Settings, kafka: KafkaLink) -> IngestService:
    servicer = ShipmentEventsServicer(
        kafka, settings.topics.shipment_events, settings.kafka.request_timeout_s
    )
    return IngestService(
        SERVICE_NAME,
        lambda server: shipment_pb2_grpc.add_ShipmentEventsServiceServicer_to_server(
            servicer, server
        ),
        ROLES,
    )


def server(settings: Settings) -> IngestServer:
    """The service, not started: `async with server(settings) as running: running.port`."""
    return IngestServer(settings, build, LABEL, settings.topics.shipment_events)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (what `cargotrack serve shipment-events` runs)."""
    await serve(settings, build, LABEL, settings.topics.shipment_events)
