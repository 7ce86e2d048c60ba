"""Who may confirm a delivery (issue 12, finding 1), against the real services.

The delivery-confirmations service (in-process, production wiring) takes the
confirmations; the real tracking projection folds them with the shipment's events
from Kafka into PostgreSQL; the test reads the stored state. On the code before
issue 12, vehicle B's confirmation delivered a shipment assigned to vehicle A, and a
second confirmation replaced a delivered shipment's proof.

Two layers decide: the fold is the authority (without a database the service
answers OK and the fold records an anomaly), and with a database the service
pre-checks the read model and answers PERMISSION_DENIED / FAILED_PRECONDITION
before writing anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import pytest
from prometheus_client import REGISTRY

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
from shared.rpc import error_infos
from tests.ingest_helpers import (
    UNUSED_DATABASE_URL,
    bearer,
    delivery_confirmation,
    running_service,
    service_settings,
)
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


Confirm = Callable[..., Awaitable[delivery_pb2.DeliveryConfirmation]]


def confirmer(service_channel: grpc.aio.Channel, role: Role = Role.DRIVER) -> Confirm:
    """Confirm SHIPMENT's delivery naming a vehicle, with that vehicle's driver token
    (or an ops token); returns the confirmation sent."""
    stub = delivery_pb2_grpc.DeliveryConfirmationsServiceStub(service_channel)

    async def confirm(
        vehicle: str, *, again: delivery_pb2.DeliveryConfirmation | None = None, **fields: object
    ) -> delivery_pb2.DeliveryConfirmation:
        confirmation = again or delivery_confirmation(SHIPMENT, vehicle, **fields)
        token = bearer(role, tenant=TENANT, vehicle_id=vehicle if role is Role.DRIVER else None)
        await stub.ConfirmDelivery(
            delivery_pb2.ConfirmDeliveryRequest(confirmation=confirmation),
            metadata=token,
            timeout=20,
        )
        return confirmation

    return confirm


def prechecks(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("cargotrack_confirmation_prechecks_total", {"outcome": outcome})
        or 0.0
    )


async def test_without_a_database_the_fold_alone_decides(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """No DATABASE_URL for the service: no pre-check, every well-formed confirmation is
    answered OK, and the fold refuses the wrong vehicle's and the second proof."""
    settings = service_settings(
        kafka_bootstrap, topic_prefix, DATABASE_URL=database_url, CARGOTRACK_DB_SCHEMA=pg_schema
    )
    without_database = service_settings(kafka_bootstrap, topic_prefix, DATABASE_URL="")
    assert without_database.database.url == ""
    await prepare(settings)
    async with producer_for(settings) as producer:
        # created → assigned to van-a → picked up → in transit
        await send_all(producer, settings, lifecycle(TENANT, SHIPMENT, ASSIGNED, T0))
    async with (
        running_projection(settings) as runner,
        running_service("delivery-confirmations", without_database) as service,
    ):
        confirm = confirmer(service.channel)
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


async def refused(confirm: Confirm, vehicle: str, **fields: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await confirm(vehicle, **fields)
    return raised.value


async def test_with_a_database_the_service_refuses_what_the_fold_would_not_apply(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """DATABASE_URL set: the service reads the shipment's row first. The wrong vehicle
    gets PERMISSION_DENIED, a second proof FAILED_PRECONDITION, and neither is written
    (the fold sees no anomaly); a retry of the confirmation that delivered stays OK."""
    settings = service_settings(
        kafka_bootstrap, topic_prefix, DATABASE_URL=database_url, CARGOTRACK_DB_SCHEMA=pg_schema
    )
    await prepare(settings)
    async with producer_for(settings) as producer:
        await send_all(producer, settings, lifecycle(TENANT, SHIPMENT, ASSIGNED, T0))
    async with (
        running_projection(settings) as runner,
        running_service("delivery-confirmations", settings) as service,
    ):
        confirm = confirmer(service.channel)
        assert (await stored(settings, runner)).status == IN_TRANSIT

        # Vehicle B's driver confirms A's shipment: refused, nothing written.
        error = await refused(confirm, OTHER, recipient_name="Mallory")
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not assigned to vehicle 'van-b'" in (error.details() or "")
        assert ASSIGNED not in (error.details() or "")  # the other vehicle is not revealed
        assert error_infos(error) == [
            (
                "SHIPMENT_NOT_ASSIGNED_TO_VEHICLE",
                {"field": "confirmation.vehicle_id", "shipment_id": SHIPMENT},
            )
        ]
        state = await stored(settings, runner)
        assert state.status == IN_TRANSIT
        assert state.proof is None
        assert state.anomalies == ()

        # The assigned vehicle delivers; retrying that very confirmation stays OK.
        first = await confirm(ASSIGNED)
        delivered = await stored(settings, runner)
        assert delivered.status == DELIVERED
        assert delivered.proof is not None
        assert delivered.proof.confirmation_id == first.confirmation_id
        await confirm(ASSIGNED, again=first)

        # Another confirmation of the delivered shipment: refused, the proof stands.
        error = await refused(confirm, ASSIGNED, recipient_name="Someone Else")
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_infos(error) == [
            (
                "PROOF_ALREADY_SETTLED",
                {"field": "confirmation.shipment_id", "shipment_id": SHIPMENT},
            )
        ]
        state = await stored(settings, runner)
        assert state.proof == delivered.proof
        assert state.delivered_at == delivered.delivered_at
        assert state.timeline == delivered.timeline  # nothing reached the fold

        # The back office (ops, no vehicle) is not pre-checked: the fold decides.
        before = prechecks("skipped")
        await confirmer(service.channel, Role.OPS)("", recipient_name="Back Office")
        assert prechecks("skipped") == before + 1
        state = await stored(settings, runner)
        assert state.proof == delivered.proof
        assert state.anomalies[-1].reason == PROOF_ALREADY_SETTLED


async def test_an_unknown_shipment_or_an_unreachable_read_model_is_left_to_the_fold(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """The pre-check never blocks a confirmation it cannot judge: a shipment the read
    model does not know (it lags) and a PostgreSQL that does not answer both give OK."""
    with_database = service_settings(
        kafka_bootstrap, topic_prefix, DATABASE_URL=database_url, CARGOTRACK_DB_SCHEMA=pg_schema
    )
    unreachable = service_settings(kafka_bootstrap, topic_prefix, DATABASE_URL=UNUSED_DATABASE_URL)
    await prepare(with_database)
    for settings, outcome in ((with_database, "unknown"), (unreachable, "unavailable")):
        async with running_service("delivery-confirmations", settings) as service:
            before = prechecks(outcome)
            await confirmer(service.channel)(OTHER)
            assert prechecks(outcome) == before + 1
