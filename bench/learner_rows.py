"""Section 7 of `python -m bench.run`: the learner and the ETA it feeds.

* ``7.consume`` / ``7.learner``: the gps-points records the ingest phase wrote (its
  larger batch size, as copied for the raw baselines), read from Kafka twice on one
  consumer: once as any consumer must (fetch, decode the envelope and its points),
  once as the learner replays them (the same, plus
  :func:`shared.domain.learner.fold` per fetched batch, cutting snapshots). The
  learner's ratio is its throughput over the raw consume's. Its PostgreSQL commit
  (one state row per tenant per batch) is outside both.
* ``7.eta.fleet`` / ``7.eta.learner``: µs per ``EtaModel.estimate`` on the
  projector's shape (:mod:`bench.micro_eta`'s vehicles: 100 km routes, a window of
  fixes sliding between calls), with the fleet-average model a tenant has before its
  first version, and with the model the learner publishes (its fold and the snapshot
  codec the projector loads it with). Warm rounds only; the ratio is the learner
  model's cost over the fleet average's.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.micro_eta import Vehicle, learner_speeds
from bench.report import Row
from shared.domain import learner
from shared.domain.eta import EtaModel
from shared.domain.geo import Fix, TrackMemo
from shared.domain.learner import LearnerParams, LearnerState
from shared.domain.speeds import HistoricalSpeeds
from shared.domain.tracking import gps_positions
from shared.envelopes import decode


async def _replay(
    options: dict[str, Any], topic: str, partitions: int, count: int, learn: bool
) -> tuple[int, float]:
    """(points, seconds) to read ``count`` records of ``topic`` from the beginning,
    decoding every point, and with ``learn`` folding them as the learner does."""
    consumer = AIOKafkaConsumer(
        **options, group_id=None, max_partition_fetch_bytes=4 << 20, fetch_max_bytes=64 << 20
    )
    await consumer.start()
    params = LearnerParams()
    states: dict[str, LearnerState] = {}
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for tp in tps:
            await consumer.position(tp)
        seen = points = 0
        t0 = time.perf_counter()
        async with asyncio.timeout(300):
            while seen < count:
                batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
                by_tenant: dict[str, list[tuple[str, Fix]]] = {}
                for records in batches.values():
                    seen += len(records)
                    for record in records:
                        if record.value == b"warm-up":
                            continue  # the raw phase's one record per partition
                        env = decode(record.value or b"", list(record.headers))
                        gps = env.gps_batch
                        fixes = gps_positions(gps)
                        points += len(fixes)
                        if learn:
                            out = by_tenant.setdefault(env.tenant_id, [])
                            out.extend((gps.vehicle_id, fix) for fix in fixes)
                for tenant, pts in by_tenant.items():
                    states[tenant], _ = learner.fold(
                        states.get(tenant, LearnerState()), pts, params
                    )
        return points, time.perf_counter() - t0
    finally:
        await consumer.stop()


async def replay_rows(
    options: dict[str, Any], topic: str, partitions: int, count: int
) -> list[Row]:
    """Rows 7.consume and 7.learner on the ``count`` records of ``topic``."""
    points, raw_s = await _replay(options, topic, partitions, count, learn=False)
    learned, learn_s = await _replay(options, topic, partitions, count, learn=True)
    assert learned == points
    note = f"{count:,} records, {points:,} points, same consumer settings"
    return [
        Row(
            "7.consume",
            "raw consume + decode of gps-points records",
            points / raw_s,
            "points/s",
            note=note,
        ),
        Row(
            "7.learner",
            "learner replay of the same records (consume + decode + fold)",
            learned / learn_s,
            "points/s",
            baseline="7.consume",
            note="state commit to PostgreSQL excluded",
        ),
    ]


def _cost(model: EtaModel, vehicles: list[Vehicle], rounds: int, slide: int, window: int) -> float:
    """Mean µs per estimate over the warm rounds (round 0, the cold one, is dropped)."""
    times: list[float] = []
    prev: dict[int, Any] = {}
    # One memo per vehicle, kept and trimmed to its window as the projector's track
    # cache does: without it every estimate works out every fix afresh.
    memos = [TrackMemo() for _ in vehicles]
    for r in range(rounds + 1):
        for i, v in enumerate(vehicles):
            if r:
                v.advance(slide, window)
            fixes = list(v.fixes)
            memos[i].retain(fixes)
            t0 = time.perf_counter_ns()
            est = model.estimate(
                now=v.now,
                destination=v.destination,
                positions=fixes,
                route=v.new_route,
                previous=prev.get(i),
                memo=memos[i],
            )
            if r:
                times.append((time.perf_counter_ns() - t0) / 1000.0)
            prev[i] = est
    return statistics.fmean(times)


def eta_rows(vehicles: int, rounds: int, window: int = 600, slide: int = 50) -> list[Row]:
    """Rows 7.eta.fleet and 7.eta.learner: the same vehicles and windows, each model
    on its own copy of them (same seed)."""
    speeds = learner_speeds(range(vehicles))
    fleet = HistoricalSpeeds(
        speeds.params, speeds.global_pace, {}, {}, {}, {}, speeds.observed_m, speeds.observed_s
    )
    out = []
    for key, what, model, base in (
        ("7.eta.fleet", "ETA estimate, fleet-average model (version 0)", EtaModel(fleet), None),
        (
            "7.eta.learner",
            "ETA estimate, the learner's model",
            EtaModel(speeds, version=1),
            "7.eta.fleet",
        ),
    ):
        rng = random.Random(1)
        fleet_of = [Vehicle(i, rng, window) for i in range(vehicles)]
        us = _cost(model, fleet_of, rounds, slide, window)
        out.append(
            Row(
                key,
                what,
                us,
                "µs/estimate",
                baseline=base,
                note=f"{vehicles} vehicles on 100 km routes, {window} fixes, {rounds} warm rounds",
            )
        )
    return out
