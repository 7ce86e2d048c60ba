"""Microbenchmark: the learner's replay throughput against raw consumption.

``python -m bench.micro_learner`` builds GPS records as ingest writes them (encoded
envelopes of one vehicle's batch of points, 1 fix per 5 s, vehicles driving 100 km
routes) and times, on the same records:

* **raw consume**: what any consumer of gps-points must do per record: decode the
  envelope and its points (``shared.envelopes.decode`` + ``gps_positions``);
* **learner replay**: the same, plus the learner's fold
  (:func:`shared.domain.learner.fold`, default parameters), in batches of
  ``--batch`` records as the learner service's runner hands them over, including the
  snapshots it cuts.

It prints points/s for both and the ratio learner/raw. Kafka fetch and the PostgreSQL
commit of the state are outside both (the same network cost for any consumer; the
state commit is one row per tenant per batch). No thresholds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np

from bench.workload import route_of
from shared.domain import learner
from shared.domain.geo import Fix
from shared.domain.learner import LearnerParams, LearnerState
from shared.domain.tracking import gps_positions
from shared.envelopes import Headers, decode, encode, timestamp
from shared.pb import envelope_pb2, gps_pb2

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


def records(vehicles: int, batches: int, points: int) -> list[tuple[bytes, Headers]]:
    """Encoded gps-points records, in the time order a replay reads them."""
    out = []
    for b in range(batches):
        for v in range(vehicles):
            batch = gps_pb2.GpsBatch(vehicle_id=f"v{v}", device_id="d", sequence=b + 1)
            metres = (b * points + np.arange(points, dtype=np.float64)) * 45.0
            lat, lon = route_of(v).at(metres)
            for k in range(points):
                p = batch.points.add(latitude=float(lat[k]), longitude=float(lon[k]))
                p.recorded_at.CopyFrom(timestamp(T0 + timedelta(seconds=5.0 * (b * points + k))))
            env = envelope_pb2.Envelope(
                event_id=f"v{v}-{b}", tenant_id="acme", principal="bench", gps_batch=batch
            )
            env.occurred_at.CopyFrom(timestamp(T0))
            env.recorded_at.CopyFrom(timestamp(T0))
            record = encode(env, f"v{v}")
            out.append((record.value, list(record.headers)))
    return out


def raw(recs: Sequence[tuple[bytes, Headers]]) -> int:
    n = 0
    for value, headers in recs:
        n += len(gps_positions(decode(value, headers).gps_batch))
    return n


def learn(recs: Sequence[tuple[bytes, Headers]], per_batch: int) -> int:
    params = LearnerParams()
    state = LearnerState()
    n = 0
    for i in range(0, len(recs), per_batch):
        points: list[tuple[str, Fix]] = []
        for value, headers in recs[i : i + per_batch]:
            env = decode(value, headers)
            vehicle = env.gps_batch.vehicle_id
            points.extend((vehicle, fix) for fix in gps_positions(env.gps_batch))
        n += len(points)
        state, _ = learner.fold(state, points, params)
    return n


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.micro_learner", description=__doc__)
    ap.add_argument("--vehicles", type=int, default=50)
    ap.add_argument("--batches", type=int, default=40, help="records per vehicle")
    ap.add_argument("--points", type=int, default=20, help="points per record")
    ap.add_argument("--batch", type=int, default=2000, help="records per learner fold")
    args = ap.parse_args(argv)
    recs = records(args.vehicles, args.batches, args.points)
    started = time.perf_counter()
    n_raw = raw(recs)
    t_raw = time.perf_counter() - started
    started = time.perf_counter()
    n_learn = learn(recs, args.batch)
    t_learn = time.perf_counter() - started
    assert n_raw == n_learn
    print(f"records: {len(recs)}, points: {n_raw}")
    print(f"{'raw consume':<16} {n_raw / t_raw:>12,.0f} points/s")
    print(f"{'learner replay':<16} {n_learn / t_learn:>12,.0f} points/s")
    print(f"{'ratio':<16} {t_raw / t_learn:>12.3f}  (learner / raw throughput)")


if __name__ == "__main__":
    main()
