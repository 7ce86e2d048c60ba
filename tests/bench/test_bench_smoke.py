"""The benchmark's smoke run: every phase for a few seconds, so `bench/` cannot rot.

No thresholds (CI machines are shared and noisy): the run must finish, and the table
must hold every row with a finite, positive figure and a ratio to its baseline.
Runs against the session's Kafka and PostgreSQL (own topic prefix and schemas).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.phases import BenchOptions
from bench.run import run_bench
from bench.workload import SPEED_MPS, encode_points, encode_request, route_of, vehicle_id
from devtools.devstack import LocalStack
from shared.pb import gps_pb2

pytestmark = pytest.mark.timeout(240)

#: Every row the table must hold.
ROWS = {
    "1.produce.50",
    "1.consume.50",
    "1.kafka.50",
    "1.produce.500",
    "1.consume.500",
    "1.kafka.500",
    "1.copy",
    "1.pipeline.50",
    "1.pipeline.500",
    "1.replay",
    "1.latency.p50",
    "1.latency.p99",
    "2.ingest.50",
    "2.ingest.500",
    "3.e2e.500",
    "3.e2e.500.steady",
    "3.e2e.50",
    "3.e2e.50.steady",
    "3.latency.p50",
    "3.latency.p99",
    "5.alerts.p50",
    "5.alerts.p99",
    "1.pg.rps",
    "1.pg.p99",
    "4.query.rps",
    "4.http.rps",
    "4.query.p99",
    "6.rebuild",
    "7.consume",
    "7.learner",
    "7.eta.fleet",
    "7.eta.learner",
}
SERVICES = {"projector", "gps-ingest", "shipment-events", "tracking-query", "gps-ingest-only"}


def test_wire_encoder_matches_protobuf() -> None:
    """The load client's hand-made requests parse to the batch they claim to be."""
    route = route_of(3)
    start = 1_764_000_000
    raw = encode_request(vehicle_id(3), "dev", 7, encode_points(route, start, start, 100, 5))
    request = gps_pb2.StreamPointsRequest.FromString(raw)
    batch = request.batch
    assert (batch.vehicle_id, batch.device_id, batch.sequence) == (vehicle_id(3), "dev", 7)
    assert [p.recorded_at.seconds for p in batch.points] == list(
        range(1_764_000_100, 1_764_000_105)
    )
    lat, lon = route.at(np.array([100.0 * SPEED_MPS]))
    assert batch.points[0].latitude == pytest.approx(float(lat[0]))
    assert batch.points[0].longitude == pytest.approx(float(lon[0]))
    assert batch.points[0].accuracy_m == 5.0
    # Byte-for-byte what protobuf itself would write.
    assert request.SerializeToString() == raw


async def test_smoke_run_prints_every_row(stack: LocalStack, tmp_path: Path) -> None:
    report = await run_bench(
        BenchOptions.smoke_options(),
        run_dir=tmp_path,
        bootstrap_servers=stack.bootstrap_servers,
        database_url=stack.database_url,
        fsync=False,
    )
    table = report.table()
    print(table)
    keys = {row.key for row in report.rows}
    assert keys >= ROWS, f"missing rows: {sorted(ROWS - keys)}"
    for row in report.rows:
        assert math.isfinite(row.value), f"{row.key}: {row.value}"
        assert row.value > 0, f"{row.key}: {row.value}"
        assert math.isfinite(row.ratio), f"{row.key}: ratio {row.ratio}"
        assert row.ratio > 0, f"{row.key}: ratio {row.ratio}"
        assert row.key in table
    memory = {m["service"]: m for m in report.memory}
    assert set(memory) >= SERVICES
    for name in SERVICES:
        assert memory[name]["peak_mb"] > 0, name
    assert len(report.targets) == 4
