"""The delivery-confirmations process: DeliveryConfirmationsService on gRPC."""

from __future__ import annotations

from services.delivery_confirmations.precheck import ReadModelPrecheck
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
#: With DATABASE_URL set, confirmations naming a vehicle are pre-checked against the
#: read model (precheck.py).
ROLES = {f"/{SERVICE_NAME}/ConfirmDelivery": frozenset({Role.DRIVER, Role.OPS})}


def build(settings: Settings, kafka: KafkaLink) -> IngestService:
    """The servicer, with the read-model pre-check when DATABASE_URL is set (it is
    optional for this service: without it, the fold alone decides, as before)."""
    precheck = ReadModelPrecheck(settings.database) if settings.database.url else None
    servicer = DeliveryConfirmationsServicer(
        kafka,
        settings.topics.delivery_confirmations,
        settings.kafka.request_timeout_s,
        precheck=precheck,
    )
    return IngestService(
        SERVICE_NAME,
        lambda server: delivery_pb2_grpc.add_DeliveryConfirmationsServiceServicer_to_server(
            servicer, server
        ),
        ROLES,
        resources=[precheck] if precheck is not None else [],
    )


def server(settings: Settings) -> IngestServer:
    """The service, not started: `async with server(settings) as running: running.port`."""
    return IngestServer(settings, build, LABEL, settings.topics.delivery_confirmations)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (what `cargotrack serve delivery-confirmations` runs)."""
    await serve(settings, build, LABEL, settings.topics.delivery_confirmations)
