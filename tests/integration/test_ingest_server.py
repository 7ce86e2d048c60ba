"""What every ingest server has: health, reflection, authentication, a clean process life."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.gps_ingest.app import SERVICE_NAME
from services.gps_ingest.servicer import GpsIngestServicer
from shared.auth import Role
from shared.config import DEV_JWT_SECRET
from shared.ingest import KafkaLink
from shared.pb import (
    delivery_pb2,
    delivery_pb2_grpc,
    gps_pb2,
    gps_pb2_grpc,
    shipment_pb2,
    shipment_pb2_grpc,
)
from shared.rpc import GrpcApp
from tests.ingest_helpers import (
    Metadata,
    RunningService,
    bearer,
    delivery_confirmation,
    gps_batch,
    running_service,
    service_settings,
    shipment_event,
    wait_health,
)

pytestmark = pytest.mark.timeout(90)

INGEST = {
    "gps-ingest": "cargotrack.v1.GpsIngestService",
    "shipment-events": "cargotrack.v1.ShipmentEventsService",
    "delivery-confirmations": "cargotrack.v1.DeliveryConfirmationsService",
}


@pytest.fixture(params=sorted(INGEST))
async def service(
    request: pytest.FixtureRequest, kafka_bootstrap: str, topic_prefix: str
) -> AsyncIterator[RunningService]:
    async with running_service(
        request.param, service_settings(kafka_bootstrap, topic_prefix)
    ) as running:
        yield running


async def call_with(service: RunningService, metadata: Metadata | None) -> object:
    """Make the service's main call with the given metadata (None: no token at all)."""
    if service.name == "gps-ingest":
        stream = gps_pb2_grpc.GpsIngestServiceStub(service.channel).StreamPoints(
            iter([gps_pb2.StreamPointsRequest(batch=gps_batch("veh-1", 1))]),
            metadata=metadata,
            timeout=10,
        )
        return [answer async for answer in stream]
    if service.name == "shipment-events":
        return await shipment_pb2_grpc.ShipmentEventsServiceStub(service.channel).RecordEvent(
            shipment_pb2.RecordEventRequest(event=shipment_event()), metadata=metadata, timeout=10
        )
    return await delivery_pb2_grpc.DeliveryConfirmationsServiceStub(
        service.channel
    ).ConfirmDelivery(
        delivery_pb2.ConfirmDeliveryRequest(confirmation=delivery_confirmation("shp-1", "veh-1")),
        metadata=metadata,
        timeout=10,
    )


def allowed(service: RunningService) -> Metadata:
    if service.name == "shipment-events":
        return bearer(Role.SHIPPER)
    return bearer(Role.DRIVER, vehicle_id="veh-1")


async def test_health_reports_serving_for_the_server_and_its_service(
    service: RunningService,
) -> None:
    health = health_pb2_grpc.HealthStub(service.channel)
    for name in ["", INGEST[service.name]]:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_reflection_lists_the_services(service: RunningService) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    [reply] = [reply async for reply in call]
    names = {s.name for s in reply.list_services_response.service}
    assert {INGEST[service.name], "grpc.health.v1.Health"} <= names


async def test_the_allowed_role_gets_through(service: RunningService) -> None:
    await call_with(service, allowed(service))


async def test_no_token_is_unauthenticated(service: RunningService) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_with(service, None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "metadata",
    [
        (("authorization", "Bearer not-a-jwt"),),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        bearer(Role.OPS, ttl_s=-60, vehicle_id="veh-1"),
        bearer(Role.OPS, secret="some-other-signing-key-of-enough-length", vehicle_id="veh-1"),
    ],
    ids=["garbage", "not-bearer", "expired", "wrong-key"],
)
async def test_a_bad_token_is_unauthenticated(service: RunningService, metadata: Metadata) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_with(service, metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_role_without_access_is_denied(service: RunningService) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_with(service, bearer(Role.CUSTOMER, customer_id="cust-1"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_cargotrack_serve_prints_its_port_serves_and_stops_on_sigterm(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The real process: `cargotrack serve gps-ingest`, port 0, SIGTERM, exit status 0."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused",
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_TOPIC_PREFIX": topic_prefix,
        "CARGOTRACK_GRPC_PORT": "0",
        "CARGOTRACK_SHUTDOWN_GRACE_S": "2",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from services.cli import main; main()",
        "serve",
        "gps-ingest",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=None,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("gps-ingest listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_health(channel)
            answers = gps_pb2_grpc.GpsIngestServiceStub(channel).StreamPoints(
                iter([gps_pb2.StreamPointsRequest(batch=gps_batch("veh-1", 1))]),
                metadata=bearer(Role.DRIVER, vehicle_id="veh-1", secret=DEV_JWT_SECRET),
                timeout=10,
            )
            assert [a.outcome async for a in answers] == [gps_pb2.BATCH_OUTCOME_ACCEPTED]
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_method_missing_from_the_roles_table_is_closed_to_every_role() -> None:
    """GrpcApp with the GPS servicer but an empty roles table: even a driver is denied."""
    settings = service_settings("127.0.0.1:1", "unused.")
    servicer = GpsIngestServicer(KafkaLink(settings.kafka, []), "unused", 1.0)
    register = gps_pb2_grpc.add_GpsIngestServiceServicer_to_server
    app = GrpcApp(
        settings.grpc,
        settings.auth,
        [(SERVICE_NAME, lambda server: register(servicer, server))],
        roles={},
    )
    port = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = gps_pb2_grpc.GpsIngestServiceStub(channel).StreamPoints(
                iter([gps_pb2.StreamPointsRequest(batch=gps_batch("veh-1", 1))]),
                metadata=bearer(Role.DRIVER, vehicle_id="veh-1"),
                timeout=5,
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [answer async for answer in call]
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await app.stop()
