"""The gps-ingest process: GpsIngestService on gRPC, writing to the GPS points topic."""

from __future__ import annotations

from services.gps_ingest.servicer import GpsIngestServicer
from shared.auth import Role
from shared.config import Settings
from shared.ingest import IngestServer, IngestService, KafkaLink, serve
from shared.pb import gps_pb2, gps_pb2_grpc

LABEL = "gps-ingest"
SERVICE_NAME: str = gps_pb2.DESCRIPTOR.services_by_name["GpsIngestService"].full_name

#: Who may call what. Only drivers stream GPS, each for its own vehicle (the
#: servicer checks the vehicle).
ROLES = {f"/{SERVICE_NAME}/StreamPoints": frozenset({Role.DRIVER})}


def build(settings: Settings, kafka: KafkaLink) -> IngestService:
    servicer = GpsIngestServicer(
        kafka, settings.topics.gps_points, settings.kafka.request_timeout_s
    )
    return IngestService(
        SERVICE_NAME,
        lambda server: gps_pb2_grpc.add_GpsIngestServiceServicer_to_server(servicer, server),
        ROLES,
    )


def server(settings: Settings) -> IngestServer:
    """The service, not started: `async with server(settings) as running: running.port`."""
    return IngestServer(settings, build, LABEL, settings.topics.gps_points)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (what `cargotrack serve gps-ingest` runs)."""
    await serve(settings, build, LABEL, settings.topics.gps_points)
