"""End to end across real processes: ingest → Kafka → projector → PostgreSQL → query.

Every service runs as `cargotrack serve NAME`, exactly what a container runs.
The test waits on the projection's stored offsets reaching Kafka's end offsets,
never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from devtools.devstack.ports import free_ports
from devtools.devstack.process import ChildProcess
from devtools.launcher import wait_serving
from services.registry import SERVICES
from shared.auth import Role
from shared.db import create_pool
from shared.envelopes import timestamp, utc_now
from shared.pb import (
    delivery_pb2_grpc,
    gps_pb2,
    gps_pb2_grpc,
    shipment_pb2,
    shipment_pb2_grpc,
    tracking_pb2,
    tracking_pb2_grpc,
)
from shared.projection import wait_caught_up
from tests.ingest_helpers import bearer, delivery_confirmation, gps_batch, shipment_created
from tests.projection_helpers import end_offsets, projector_settings

NAMES = ("gps-ingest", "shipment-events", "delivery-confirmations", "projector", "tracking-query")


@contextlib.asynccontextmanager
async def services_running(env: dict[str, str], log_dir: Path) -> AsyncIterator[dict[str, str]]:
    """Start the services as processes; yield name → target; SIGTERM them all after."""
    ports = dict(zip(NAMES, free_ports(len(NAMES)), strict=True))
    processes = []
    try:
        for name in NAMES:
            assert name in SERVICES
            processes.append(
                ChildProcess.spawn(
                    [sys.executable, "-c", "from services.cli import main; main()", "serve", name],
                    name=name,
                    log_path=log_dir / f"{name}.log",
                    append_log=False,
                    env={**env, "CARGOTRACK_GRPC_PORT": str(ports[name])},
                )
            )
        await asyncio.gather(
            *(
                wait_serving(ports[n], p, timeout_s=90)
                for n, p in zip(NAMES, processes, strict=True)
            )
        )
        yield {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    finally:
        await asyncio.gather(*(p.terminate(signal.SIGTERM, 15) for p in processes))
    codes = {p.name: p.returncode for p in processes}
    assert all(code == 0 for code in codes.values()), codes


@pytest.mark.timeout(240)
async def test_events_in_through_ingest_come_out_of_the_query_service(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str, tmp_path: Path
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "DATABASE_URL": database_url,
        "CARGOTRACK_DB_SCHEMA": pg_schema,
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_TOPIC_PREFIX": topic_prefix,
        "CARGOTRACK_TOPIC_PARTITIONS": "3",
        "CARGOTRACK_LOG_FORMAT": "json",
    }
    tenant, vehicle, shipment_id = "acme", "truck-7", "shp-e2e-1"
    ops = bearer(Role.OPS, tenant=tenant)
    driver = bearer(Role.DRIVER, tenant=tenant, vehicle_id=vehicle)
    customer = bearer(Role.CUSTOMER, tenant=tenant, customer_id="cust-1")
    async with services_running(env, tmp_path) as targets:
        async with grpc.aio.insecure_channel(targets["shipment-events"]) as channel:
            events = shipment_pb2_grpc.ShipmentEventsServiceStub(channel)
            created = shipment_created(shipment_id)
            steps = [
                created,
                shipment_pb2.ShipmentEvent(
                    shipment_id=shipment_id,
                    vehicle_assigned=shipment_pb2.VehicleAssigned(vehicle_id=vehicle),
                ),
                shipment_pb2.ShipmentEvent(
                    shipment_id=shipment_id, picked_up=shipment_pb2.PickedUp()
                ),
                shipment_pb2.ShipmentEvent(
                    shipment_id=shipment_id, out_for_delivery=shipment_pb2.OutForDelivery()
                ),
            ]
            for step in steps[1:]:
                step.occurred_at.CopyFrom(timestamp(utc_now() - timedelta(seconds=3)))
            await events.RecordEvents(
                shipment_pb2.RecordEventsRequest(events=steps), metadata=ops, timeout=20
            )
        async with grpc.aio.insecure_channel(targets["gps-ingest"]) as channel:
            gps = gps_pb2_grpc.GpsIngestServiceStub(channel)
            batches = [gps_batch(vehicle, seq, points=5) for seq in (1, 2, 3)]
            stream = gps.StreamPoints(
                (gps_pb2.StreamPointsRequest(batch=b) for b in batches), metadata=driver, timeout=20
            )
            acks = [ack async for ack in stream]
        assert [a.sequence for a in acks] == [1, 2, 3]
        assert all(a.outcome == gps_pb2.BATCH_OUTCOME_ACCEPTED for a in acks)
        topics = [
            settings.topics.shipment_events,
            settings.topics.delivery_confirmations,
            settings.topics.gps_points,
        ]
        pool = await create_pool(settings.database)
        # The topics are independent streams: let the projector see the trip before the
        # delivery, as it would in the field, where GPS keeps flowing.
        await wait_caught_up(pool, "tracking", await end_offsets(settings, topics), 60)
        async with grpc.aio.insecure_channel(targets["delivery-confirmations"]) as channel:
            confirmations = delivery_pb2_grpc.DeliveryConfirmationsServiceStub(channel)
            from shared.pb import delivery_pb2

            await confirmations.ConfirmDelivery(
                delivery_pb2.ConfirmDeliveryRequest(
                    confirmation=delivery_confirmation(shipment_id, vehicle)
                ),
                metadata=driver,
                timeout=20,
            )
        try:
            await wait_caught_up(pool, "tracking", await end_offsets(settings, topics), 60)
        finally:
            await pool.close()
        async with grpc.aio.insecure_channel(targets["tracking-query"]) as channel:
            tracking = tracking_pb2_grpc.TrackingServiceStub(channel)
            reply = await tracking.GetShipment(
                tracking_pb2.GetShipmentRequest(shipment_id=shipment_id),
                metadata=customer,
                timeout=10,
            )
            staff = await tracking.GetShipment(
                tracking_pb2.GetShipmentRequest(shipment_id=shipment_id),
                metadata=ops,
                timeout=10,
            )
            timeline = await tracking.GetTimeline(
                tracking_pb2.GetTimelineRequest(shipment_id=shipment_id),
                metadata=customer,
                timeout=10,
            )
            public = await tracking.TrackByToken(
                tracking_pb2.TrackByTokenRequest(tracking_token=reply.shipment.tracking_token),
                timeout=10,
            )
            other_tenant = bearer(Role.OPS, tenant="someone-else")
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await tracking.GetShipment(
                    tracking_pb2.GetShipmentRequest(shipment_id=shipment_id),
                    metadata=other_tenant,
                    timeout=10,
                )
    shipment = reply.shipment
    assert shipment.status == shipment_pb2.SHIPMENT_STATUS_DELIVERED
    assert shipment.proof.recipient_name == "A. Recipient"
    assert len(shipment.tracking_token) == 22
    # Delivered: the customer no longer sees the van (docs/query.md, "Visibility") ...
    assert shipment.vehicle_id == ""
    assert not shipment.HasField("last_position")
    assert shipment.proof.vehicle_id == ""
    # ... the staff view keeps everything the pipeline folded.
    assert staff.shipment.vehicle_id == vehicle
    assert staff.shipment.proof.vehicle_id == vehicle
    assert staff.shipment.last_position.location.longitude == pytest.approx(13.405 + 0.0004)
    assert [e.kind for e in timeline.entries] == [
        "created",
        "vehicle_assigned",
        "picked_up",
        "out_for_delivery",
        "delivery_confirmed",
    ]
    assert public.shipment.status == shipment_pb2.SHIPMENT_STATUS_DELIVERED
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
