"""ETA accuracy on real arrivals, end to end: GPS and shipment events on Kafka →
projection (live tracker) → eta_arrivals / eta_scores and the Prometheus histogram.

Real Kafka and PostgreSQL (the session's); waits on caught-up offsets, never on the
clock. A vehicle drives a 20 km route at 5 m/s (about 66 minutes, so every lead-time
horizon exists), stops at the destination (entering its geofence is the arrival), and
is delivered afterwards (which must change nothing). A second shipment is delivered
1 km short of its destination: the delivery is its arrival.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from shared.db import create_pool
from shared.domain.eta_accuracy import HORIZONS, GivenEta, score_arrival
from shared.domain.geo import haversine_m
from shared.envelopes import timestamp
from shared.pb import envelope_pb2, shipment_pb2
from shared.projection import wait_caught_up
from tests.integration.test_alerts_pipeline import (
    DESTINATION,
    GPS_START,
    LAT,
    METRES_PER_DEGREE_LON,
    projection_only,
    settings_for,
    shipment_log,
)
from tests.projection_helpers import (
    end_offsets,
    envelope_for,
    gps_envelope,
    prepare,
    producer_for,
    send_all,
)

pytestmark = pytest.mark.timeout(240)

TENANT = "tenant-eta-scores"
SPEED_MPS = 5.0
FIX_EVERY_S = 30


def drive(vehicle_id: str, stop_short_m: float) -> tuple[list[envelope_pb2.Envelope], datetime]:
    """GPS batches of 4 fixes (2 minutes) along the route at SPEED_MPS up to
    `stop_short_m` before the destination, then 3 minutes standing there. Returns the
    envelopes and the time of the last fix."""
    end_x = (DESTINATION[1] + 2.99) * METRES_PER_DEGREE_LON - stop_short_m
    points: list[tuple[datetime, float, float]] = []
    x, at = 0.0, GPS_START
    while True:
        points.append((at, LAT, -2.99 + x / METRES_PER_DEGREE_LON))
        if x >= end_x:
            break
        x = min(end_x, x + SPEED_MPS * FIX_EVERY_S)
        at += timedelta(seconds=FIX_EVERY_S)
    for _ in range(6):
        at += timedelta(seconds=FIX_EVERY_S)
        points.append((at, LAT, -2.99 + x / METRES_PER_DEGREE_LON))
    batches = [points[i : i + 4] for i in range(0, len(points), 4)]
    envelopes = [gps_envelope(TENANT, vehicle_id, "phone", k + 1, b) for k, b in enumerate(batches)]
    return envelopes, at


def delivered(shipment_id: str, at: datetime) -> envelope_pb2.Envelope:
    event = shipment_pb2.ShipmentEvent(
        event_id=f"{shipment_id}-delivered",
        shipment_id=shipment_id,
        delivered=shipment_pb2.Delivered(),
    )
    event.occurred_at.CopyFrom(timestamp(at))
    return envelope_for(TENANT, event.event_id, at, shipment_event=event)


def observed_count(horizon: str) -> float:
    value = REGISTRY.get_sample_value(
        "cargotrack_eta_error_seconds_count", {"tenant": TENANT, "horizon": horizon}
    )
    return value or 0.0


async def test_arrivals_are_scored_once_at_every_horizon(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = settings_for(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    reached, reached_last = drive("veh-1", stop_short_m=0.0)
    short, short_last = drive("veh-2", stop_short_m=1000.0)
    before = {h: observed_count(h) for h in HORIZONS}
    async with (
        projection_only(settings, "eta-scores") as runner,
        producer_for(settings) as producer,
    ):
        pool = runner.pool

        async def feed(envelopes: list[envelope_pb2.Envelope]) -> None:
            for envelope in envelopes:  # one at a time, as live traffic: many batches
                await send_all(producer, settings, [envelope])
                offsets = await end_offsets(settings, runner.projection.topics)
                await wait_caught_up(pool, runner.projection.name, offsets, timeout_s=60)

        await feed(shipment_log("shp-1", "veh-1", tenant=TENANT))
        await feed(shipment_log("shp-2", "veh-2", tenant=TENANT))
        for one, two in zip(reached, short, strict=False):
            await feed([one, two])
        await feed(reached[len(short) :] + short[len(reached) :])
        await feed([delivered("shp-2", short_last + timedelta(minutes=1))])

        arrivals = {
            r["shipment_id"]: (r["arrived_at"], r["source"])
            for r in await pool.fetch("SELECT * FROM eta_arrivals WHERE tenant_id = $1", TENANT)
        }
        # The first fix within the geofence's 100 m is shp-1's arrival.
        first_inside = min(
            p.recorded_at.ToDatetime(tzinfo=UTC)
            for e in reached
            for p in e.gps_batch.points
            if haversine_m(p.latitude, p.longitude, *DESTINATION) <= 100.0
        )
        assert arrivals["shp-1"] == (first_inside, "geofence")
        assert arrivals["shp-2"] == (short_last + timedelta(minutes=1), "delivered")

        # Delivering shp-1 afterwards is not a second arrival: nothing changes.
        scores_before = await pool.fetch(
            "SELECT * FROM eta_scores WHERE tenant_id = $1 ORDER BY shipment_id, horizon", TENANT
        )
        await feed([delivered("shp-1", reached_last + timedelta(minutes=2))])
        scores_after = await pool.fetch(
            "SELECT * FROM eta_scores WHERE tenant_id = $1 ORDER BY shipment_id, horizon", TENANT
        )
        assert [dict(r) for r in scores_after] == [dict(r) for r in scores_before]
        assert (
            await pool.fetchval("SELECT count(*) FROM eta_arrivals WHERE tenant_id = $1", TENANT)
            == 2
        )

        # shp-1 drove 66 minutes from its first ETA: every horizon is scored, with the
        # ETA eta_history says it was shown then.
        for shipment_id in ("shp-1", "shp-2"):
            history = await pool.fetch(
                "SELECT computed_at, position_at, estimated_arrival FROM eta_history"
                " WHERE tenant_id = $1 AND shipment_id = $2",
                TENANT,
                shipment_id,
            )
            given = [GivenEta(*r) for r in history]
            expected = score_arrival(given, arrivals[shipment_id][0])
            stored = [r for r in scores_after if r["shipment_id"] == shipment_id]
            assert [(r["horizon"], r["computed_at"], r["error_s"]) for r in stored] == sorted(
                (s.horizon, s.computed_at, s.error_s) for s in expected
            )
        horizons = {r["horizon"] for r in scores_after if r["shipment_id"] == "shp-1"}
        assert horizons == set(HORIZONS)
        # A vehicle at constant speed on its route: the ETA 5 minutes out is close.
        [five] = [r for r in scores_after if r["shipment_id"] == "shp-1" and r["horizon"] == "5m"]
        assert abs(five["error_s"]) < 120

    # Exported once per stored score, per tenant and horizon.
    for horizon in HORIZONS:
        stored_n = sum(1 for r in scores_after if r["horizon"] == horizon)
        assert observed_count(horizon) - before[horizon] == stored_n


async def test_eta_report_reads_the_scores(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """`cargotrack eta-report`'s reading and summary over rows written by record_arrivals."""
    from shared.eta_report import build_report, format_report
    from shared.readmodel.eta_scores import Arrival, load_errors, recent_line, record_arrivals

    settings = settings_for(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    pool = await create_pool(settings.database)
    try:
        now = GPS_START + timedelta(days=20)
        async with pool.acquire() as connection, connection.transaction():
            rows = []
            for n, days_ago in enumerate((1, 2, 9)):
                arrived = now - timedelta(days=days_ago)
                shipment = f"r{n}"
                for minutes_before, late_by in ((30, 4 + n), (5, 1 + n)):
                    at = arrived - timedelta(minutes=minutes_before)
                    rows.append(
                        (TENANT, shipment, at, at, arrived + timedelta(minutes=late_by), 1.0, 1)
                    )
                await connection.execute(
                    "INSERT INTO eta_history (tenant_id, shipment_id, position_at, computed_at,"
                    " estimated_arrival, remaining_m, method) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    *rows[-2],
                )
                await connection.execute(
                    "INSERT INTO eta_history (tenant_id, shipment_id, position_at, computed_at,"
                    " estimated_arrival, remaining_m, method) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    *rows[-1],
                )
                scored = await record_arrivals(
                    connection, [Arrival(TENANT, shipment, arrived, "delivered")]
                )
                assert [s.arrival.shipment_id for s in scored] == [shipment]
                # Recording the same arrival again records nothing.
                assert (
                    await record_arrivals(
                        connection, [Arrival(TENANT, shipment, arrived, "geofence")]
                    )
                    == []
                )
        async with pool.acquire() as connection:
            errors = await load_errors(connection, now - timedelta(days=14), now, TENANT)
            line = await recent_line(connection, TENANT, now)
        report = build_report(errors, now - timedelta(days=7), now)
        by_horizon = {r.horizon: r for r in report}
        # Two arrivals in the last 7 days: 5 min before, off by 1 and 2 minutes.
        five = by_horizon["5m"]
        assert five.summary is not None
        assert five.summary.count == 2
        assert five.summary.mae_s == pytest.approx(90.0)
        assert five.mae_week_before_s == pytest.approx(180.0)  # the arrival 9 days ago
        text = format_report(report, now - timedelta(days=7), now)
        [five_line] = [t for t in text.splitlines() if t.split()[:2] == [TENANT, "5m"]]
        assert five_line.split()[2:4] == ["2", "1.50"]  # n, MAE
        assert five_line.endswith("better (-1.50)")
        assert "2 arrivals" in line
        assert "MAE@5m 1.5 min" in line
    finally:
        await pool.close()
