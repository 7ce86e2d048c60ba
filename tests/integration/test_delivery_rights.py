"""Who may confirm a delivery (issue 12, finding 1), against the real services.

The delivery-confirmations service (in-process, production wiring) takes the
confirmations; the real tracking projection folds them with the shipment's events
from Kafka into PostgreSQL; the test reads the stored state. On the code before
issue 12, vehicle B's confirmation delivered a shipment assigned to vehicle A, and a
second confirmation replaced a delivered shipment's proof.
"""

from __future__ import annotations

import grpc
import pytest

from shared import tracking_store as store
from shared.auth import Role
from shared.config import Settings
from shared.domain.tracking import (
    DELIVERED,
    IN_TRANSIT,
    NOT_ASSIGNED_VEHICLE,
    PROOF_ALREADY_SETTLED,
    ShipmentState,
)
from shared.pb import delivery_pb2, delivery_pb2_grpc
from shared.projection import ProjectionRunner
from tests.ingest_helpers import bearer, delivery_confirmation, running_service, service_settings
from tests.integration.test_projector import caught_up, running_projection
from tests.projection_helpers import T0, lifecycle, prepare, producer_for, send_all

pytestmark = pytest.mark.timeout(120)

TENANT = "acme"
SHIPMENT = "shp-rights-1"
ASSIGNED, OTHER = "van-a", "van-b"


async def stored(settings: Settings, runner: ProjectionRunner) -> ShipmentState:
    """The shipment's state once the projection has folded everything written so far."""
    await caught_up(runner, settings)
    async with runner.pool.acquire() as connection:
        states = await store.load_shipments(connection, [(TENANT, SHIPMENT)])
    return states[(TENANT, SHIPMENT)]


async def test_only_the_assigned_vehicle_delivers_and_a_delivered_proof_stands(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = service_settings(
        kafka_bootstrap, topic_prefix, DATABASE_URL=database_url, CARGOTRACK_DB_SCHEMA=pg_schema
    )
    await prepare(settings)
    async with producer_for(settings) as producer:
        # created → assigned to van-a → picked up → in transit
        await send_all(producer, settings, lifecycle(TENANT, SHIPMENT, ASSIGNED, T0))
    async with (
        running_projection(settings) as runner,
        running_service("delivery-confirmations", settings) as service,
    ):
        stub = delivery_pb2_grpc.DeliveryConfirmationsServiceStub(service.channel)

        async def confirm(vehicle: str, **fields: object) -> delivery_pb2.DeliveryConfirmation:
            confirmation = delivery_confirmation(SHIPMENT, vehicle, **fields)
            driver = bearer(Role.DRIVER, tenant=TENANT, vehicle_id=vehicle)
            await stub.ConfirmDelivery(
                delivery_pb2.ConfirmDeliveryRequest(confirmation=confirmation),
                metadata=driver,
                timeout=20,
            )
            return confirmation

        assert (await stored(settings, runner)).status == IN_TRANSIT

        # Vehicle B's driver, with a valid token for B, confirms A's shipment.
        await confirm(OTHER, recipient_name="Mallory")
        state = await stored(settings, runner)
        assert state.status == IN_TRANSIT
        assert state.proof is None
        assert state.anomalies[-1].reason == NOT_ASSIGNED_VEHICLE
        assert state.timeline[-1].anomaly

        # The assigned vehicle delivers.
        first = await confirm(ASSIGNED)
        state = await stored(settings, runner)
        assert state.status == DELIVERED
        assert state.proof is not None
        assert state.proof.confirmation_id == first.confirmation_id
        delivered = state

        # A further confirmation, even from the assigned vehicle, leaves the proof alone.
        await confirm(ASSIGNED, recipient_name="Someone Else")
        state = await stored(settings, runner)
        assert state.proof == delivered.proof
        assert state.delivered_at == delivered.delivered_at
        assert state.anomalies[-1].reason == PROOF_ALREADY_SETTLED


async def test_a_driver_still_cannot_confirm_for_another_vehicle_than_its_token(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The ingest-side check that existed before issue 12 stays."""
    settings = service_settings(kafka_bootstrap, topic_prefix)
    async with running_service("delivery-confirmations", settings) as service:
        stub = delivery_pb2_grpc.DeliveryConfirmationsServiceStub(service.channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ConfirmDelivery(
                delivery_pb2.ConfirmDeliveryRequest(
                    confirmation=delivery_confirmation(SHIPMENT, ASSIGNED)
                ),
                metadata=bearer(Role.DRIVER, tenant=TENANT, vehicle_id=OTHER),
                timeout=20,
            )
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
