"""Run a release's own code against a database: `python release_probe.py write|read URL SCHEMA`.

tests/integration/test_migrations.py runs this file with PYTHONPATH pointing at an
earlier release's `shared/` and `services/` (exported from git), so every `shared.*`
and `services.*` import below is that release's code, not today's. It therefore uses
only long-standing entry points (migrate, the folds, the store's load/save, the query
service's get_shipment), and prints JSON on stdout.

* `write`: migrate with the release's migrations, fold a few records with the
  release's folds and store them with its store (state rows, history, outbox alert);
* `read`: read them back with the release's store and query code.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.tracking_query import queries
from shared import db, statecodec, tracking_store
from shared.config import DatabaseSettings
from shared.domain import tracking
from shared.envelopes import timestamp
from shared.pb import common_pb2, envelope_pb2, gps_pb2, shipment_pb2

TENANT, SHIPMENT, VEHICLE = "acme", "shp-migrate-1", "veh-migrate-1"
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def _envelopes() -> list[envelope_pb2.Envelope]:
    created = shipment_pb2.ShipmentEvent(
        event_id="evt-m-1",
        shipment_id=SHIPMENT,
        occurred_at=timestamp(START),
        created=shipment_pb2.ShipmentCreated(
            customer_id="cust-m",
            origin=common_pb2.LatLng(latitude=52.52, longitude=13.405),
            destination=common_pb2.LatLng(latitude=52.39, longitude=13.06),
            tracking_token="tokenmigrate1234567890",
        ),
    )
    assigned = shipment_pb2.ShipmentEvent(
        event_id="evt-m-2",
        shipment_id=SHIPMENT,
        occurred_at=timestamp(START + timedelta(minutes=5)),
        vehicle_assigned=shipment_pb2.VehicleAssigned(vehicle_id=VEHICLE, stop_sequence=1),
    )
    envelopes = []
    for event in (created, assigned):
        envelope = envelope_pb2.Envelope(
            event_id=event.event_id,
            tenant_id=TENANT,
            schema_type="cargotrack.v1.ShipmentEvent",
            shipment_event=event,
        )
        envelope.occurred_at.CopyFrom(event.occurred_at)
        envelope.recorded_at.CopyFrom(event.occurred_at)
        envelopes.append(envelope)
    return envelopes


def _gps() -> envelope_pb2.Envelope:
    batch = gps_pb2.GpsBatch(vehicle_id=VEHICLE, device_id="dev-m", sequence=1)
    for minute in range(3):
        batch.points.add(
            recorded_at=timestamp(START + timedelta(minutes=10 + minute)),
            latitude=52.50 - minute * 0.005,
            longitude=13.38 - minute * 0.01,
            accuracy_m=5.0,
        )
    envelope = envelope_pb2.Envelope(
        event_id="gps-m-1", tenant_id=TENANT, schema_type="cargotrack.v1.GpsBatch"
    )
    envelope.gps_batch.CopyFrom(batch)
    envelope.occurred_at.CopyFrom(batch.points[-1].recorded_at)
    envelope.recorded_at.CopyFrom(batch.points[-1].recorded_at)
    return envelope


async def write(settings: DatabaseSettings) -> dict[str, Any]:
    applied = await db.migrate(settings)
    shipment: tracking.ShipmentState | None = None
    for envelope in _envelopes():
        shipment = tracking.apply(shipment, envelope)
    assert shipment is not None
    vehicle = tracking.apply_gps(None, _gps())
    positions = tracking.gps_positions(_gps().gps_batch)
    connection = await asyncpg.connect(
        settings.url, server_settings={"search_path": settings.schema}
    )
    try:
        async with connection.transaction():
            await tracking_store.save_shipments(connection, [shipment])
            await tracking_store.save_vehicles(connection, [vehicle])
            await tracking_store.append_history(
                connection, {(TENANT, VEHICLE): [("gps-m-1", p) for p in positions]}
            )
            await connection.execute(
                "INSERT INTO alert_outbox (alert_id, tenant_id, shipment_id, payload)"
                " VALUES ('alert-m-1', $1, $2, $3)",
                TENANT,
                SHIPMENT,
                b"\x0a\x09alert-m-1",
            )
    finally:
        await connection.close()
    return {
        "migrations": applied,
        "shipment": statecodec.encode(shipment),
        "vehicle": statecodec.encode(vehicle),
        "history_points": len(positions),
    }


async def read(settings: DatabaseSettings) -> dict[str, Any]:
    connection = await asyncpg.connect(
        settings.url, server_settings={"search_path": settings.schema}
    )
    try:
        shipments = await tracking_store.load_shipments(connection, [(TENANT, SHIPMENT)])
        vehicles = await tracking_store.load_vehicles(connection, [(TENANT, VEHICLE)])
        view = await queries.get_shipment(connection, queries.Scope(TENANT), SHIPMENT)
        history = await connection.fetchval(
            "SELECT count(*) FROM vehicle_positions WHERE tenant_id = $1 AND vehicle_id = $2",
            TENANT,
            VEHICLE,
        )
        outbox = await connection.fetchval(
            "SELECT count(*) FROM alert_outbox WHERE published_at IS NULL"
        )
    finally:
        await connection.close()
    return {
        "shipment": statecodec.encode(shipments[(TENANT, SHIPMENT)]),
        "vehicle": statecodec.encode(vehicles[(TENANT, VEHICLE)]),
        "query_status": int(view.state.status) if view is not None else None,
        "history_points": history,
        "unpublished_alerts": outbox,
    }


def main() -> None:
    mode, url, schema = sys.argv[1:4]
    settings = DatabaseSettings(url=url, schema=schema)
    result = asyncio.run(write(settings) if mode == "write" else read(settings))
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
