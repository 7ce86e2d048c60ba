"""What a customer sees before pickup (issue 12, finding 2), against the real query service.

Projected: a shipment assigned to a van that is moving (the live tracking row holds
its position), not yet picked up. Before issue 12 a customer saw the van's live
position, its id and the driver's id through every reader; now no reader shows them
until pickup, and they appear once the goods are on the way. The full table is
checked cell by cell in tests/unit/test_visibility.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from shared.auth import Role
from shared.pb import shipment_pb2, tracking_pb2, tracking_pb2_grpc
from tests.ingest_helpers import bearer, running_service
from tests.integration.test_tracking_query import (
    OPS,
    TENANT,
    Query,
    event,
    first_watch_message,
    moving,
    project,
    query_settings,
    shipment_log,
    walk,
)
from tests.projection_helpers import T0, prepare

pytestmark = pytest.mark.timeout(120)

VEHICLE, DRIVER, CUSTOMER = "veh-secret-7", "drv-secret-9", "cust-1"


@pytest.fixture
async def query(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> AsyncIterator[Query]:
    """The query service on the test's own schema and topics, SERVING."""
    settings = query_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    async with running_service("tracking-query", settings) as service:
        yield Query(settings, service, tracking_pb2_grpc.TrackingServiceStub(service.channel))


async def customer_views(query: Query, shipment_id: str) -> dict[str, tracking_pb2.Shipment]:
    """The shipment as a customer gets it from GetShipment, ListShipments and WatchShipment."""
    customer = bearer(Role.CUSTOMER, tenant=TENANT, customer_id=CUSTOMER)
    got = await query.stub.GetShipment(
        tracking_pb2.GetShipmentRequest(shipment_id=shipment_id), metadata=customer, timeout=10
    )
    (listed,) = [s for page in await walk(query, customer, 10) for s in page]
    watched = await first_watch_message(query, shipment_id, customer)
    return {"GetShipment": got.shipment, "ListShipments": listed, "WatchShipment": watched}


async def test_a_customer_sees_no_van_before_pickup_and_sees_it_on_the_way(query: Query) -> None:
    # created → assigned; the van drives around serving other customers.
    log = shipment_log(TENANT, "s1", customer=CUSTOMER, vehicle=VEHICLE, driver=DRIVER, steps=2)
    log.append(moving(TENANT, VEHICLE, 1, T0 + timedelta(minutes=10)))
    await project(query.settings, log)
    staff = (
        await query.stub.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id="s1"), metadata=OPS
        )
    ).shipment
    assert staff.status == shipment_pb2.SHIPMENT_STATUS_ASSIGNED
    assert staff.HasField("last_position"), "the staff view has the live position"
    assert (staff.vehicle_id, staff.driver_id) == (VEHICLE, DRIVER)

    for reader, shipment in (await customer_views(query, "s1")).items():
        assert shipment.status == shipment_pb2.SHIPMENT_STATUS_ASSIGNED, reader
        assert not shipment.HasField("last_position"), reader
        assert not shipment.HasField("progress"), reader
        assert (shipment.vehicle_id, shipment.driver_id) == ("", ""), reader
        wire = shipment.SerializeToString()
        assert VEHICLE.encode() not in wire, reader
        assert DRIVER.encode() not in wire, reader

    # Picked up: the goods are on the way, the customer may follow the van.
    picked = event(
        TENANT, "s1", "s1-pick", T0 + timedelta(minutes=20), picked_up=shipment_pb2.PickedUp()
    )
    await project(query.settings, [picked, moving(TENANT, VEHICLE, 2, T0 + timedelta(minutes=21))])
    for reader, shipment in (await customer_views(query, "s1")).items():
        assert shipment.status == shipment_pb2.SHIPMENT_STATUS_PICKED_UP, reader
        assert shipment.HasField("last_position"), reader
        assert (shipment.vehicle_id, shipment.driver_id) == (VEHICLE, DRIVER), reader
        assert not shipment.anomalies, reader
