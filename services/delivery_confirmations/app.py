"""The delivery-confirmations process: DeliveryConfirmationsService on gRPC."""

from __future__ import annotations

from services.delivery_confirmations.servicer import DeliveryConfirmationsServicer
from shared.auth import Role
from shared.config import Settings
from shared.ingest import IngestServer, IngestService, KafkaLink, serve
from shared.pb import delivery_pb2, delivery_pb2_grpc

LABEL = "delivery-confirmations"
SERVICE_NAME: str = delivery_pb2.DESCRIPTOR.services_by_name[
    "DeliveryConfirmationsService"
].full_name

#: Drivers confirm for their own vehicle (checked by the servicer); ops for any.
ROLES = {f"/{SERVICE_NAME}/ConfirmDelivery": frozenset({Role.DRIVER, Role.OPS})}


def build(settings: Settings, kafka: KafkaLink) -> IngestService:
    servicer = DeliveryConfirmationsServicer(
        kafka, settings.topics.delivery_confirmations, settings.kafka.request_timeout_s
    )
    return IngestService(
        SERVICE_NAME,
        lambda server: delivery_pb2_grpc.add_DeliveryConfirmationsServiceServicer_to_server(
            servicer, server
        ),
        ROLES,
    )


def server(settings: Settings) -> IngestServer:
    """The service, not started: `async with server(settings) as running: running.port`."""
    return IngestServer(settings, build, LABEL, settings.topics.delivery_confirmations)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (what `cargotrack serve delivery-confirmations` runs)."""
    await serve(settings, build, LABEL, settings.topics.delivery_confirmations)
