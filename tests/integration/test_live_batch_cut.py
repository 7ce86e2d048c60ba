"""Live tracking decides the same alerts, ETAs and rows however the log is cut into poll
batches and however the topics' partitions interleave in them (services/projector/live.py).

The tracking projection is applied directly (no consumer): the crash test's log, smaller,
once in batches of up to 5000 and in several other cuts, each into a schema of its own,
and the live-tracking tables compared field by field. tests/integration/test_runner.py
checks that the runner hands the projection each partition's records in order.
"""

from __future__ import annotations

import random
import uuid
import zlib
from datetime import timedelta
from typing import Any

import asyncpg

from services.projector.live import LiveTracker
from services.projector.projection import TrackingProjection
from shared.db import migrate
from shared.projection import Delivered
from tests.e2e.test_projector_crash import differences, live_tables
from tests.projection_helpers import T0, gps_envelope, lifecycle, projector_settings

GPS_START = T0 + timedelta(minutes=20)
RECORDS = 40
VEHICLES = 4
SHIPMENTS = 8

Streams = dict[tuple[str, int], list[Delivered]]


def the_log(topics: tuple[str, str]) -> Streams:
    """Per (topic, partition), its records: shipments' lifecycles (every fourth with a
    30 min window it must miss: LATE), then 40 GPS records per vehicle."""
    streams: Streams = {}

    def add(topic: str, key: str, envelope: Any) -> None:
        partition = zlib.crc32(key.encode()) % 3
        stream = streams.setdefault((topic, partition), [])
        stream.append(Delivered(topic, partition, len(stream), key.encode(), envelope))

    for n in range(SHIPMENTS):
        start = T0 + timedelta(seconds=n)
        for envelope in lifecycle(
            "acme", f"s{n}", f"v{n % VEHICLES}", start, window_h=0.5 if n % 4 == 0 else 12.0
        ):
            add(topics[0], f"s{n}", envelope)
    for seq in range(1, RECORDS + 1):
        for v in range(VEHICLES):
            points = [
                (
                    GPS_START + timedelta(seconds=10 * (seq * 10 + i)),
                    53.40 + 0.0005 * seq,
                    -2.99 + 0.0002 * i,
                )
                for i in range(10)
            ]
            add(topics[1], f"v{v}", gps_envelope("acme", f"v{v}", "phone", seq, points))
    return streams


def random_cut(streams: Streams, rng: random.Random, size: int) -> list[list[Delivered]]:
    """Poll batches as a consumer may return them: each a prefix of what is left of each
    partition, at most `size` records."""
    at = dict.fromkeys(streams, 0)
    batches = []
    while any(at[key] < len(stream) for key, stream in streams.items()):
        batch: list[Delivered] = []
        for key in rng.sample(sorted(streams), len(streams)):
            take = min(rng.choice([0, 1, 3, 20, 1000]), size - len(batch))
            batch.extend(streams[key][at[key] : at[key] + take])
            at[key] += take
        if batch:
            batches.append(batch)
    return batches


async def project(database_url: str, batches: list[list[Delivered]]) -> dict[str, Any]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        settings = projector_settings("127.0.0.1:1", database_url, "cut.", schema)
        await migrate(settings.database)
        projection = TrackingProjection(settings.topics, LiveTracker(settings.alerts))
        connection = await asyncpg.connect(database_url, server_settings={"search_path": schema})
        try:
            for batch in batches:
                async with connection.transaction():
                    await projection.apply(connection, batch)
                projection.committed()
            return await live_tables(connection)
        finally:
            await connection.close()
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()


async def test_the_live_tables_do_not_depend_on_the_poll_batches(database_url: str) -> None:
    topics = projector_settings("127.0.0.1:1", database_url, "cut.", "x").topics
    streams = the_log((topics.shipment_events, topics.gps_points))
    everything = [r for key in sorted(streams) for r in streams[key]]
    whole = await project(database_url, [everything])
    late = {
        row["shipment_id"]: row["payload"]["detectedAt"] for row in whole["alert_outbox"].values()
    }
    # LATE once the second GPS record confirms it, whatever came before in the batch.
    assert late == {"s0": "2026-11-25T08:24:50Z", "s4": "2026-11-25T08:24:50Z"}
    gps = [r for key in sorted(streams) if key[0] == topics.gps_points for r in streams[key]]
    rest = [r for r in everything if r not in gps]
    cuts = {
        "GPS first": [gps, rest],
        "GPS, then the shipments 20 at a time": [gps]
        + [rest[i : i + 20] for i in range(0, len(rest), 20)],
        "20 at a time": [everything[i : i + 20] for i in range(0, len(everything), 20)],
    }
    for seed in range(4):
        cuts[f"random {seed}"] = random_cut(streams, random.Random(seed), 20 if seed % 2 else 5000)
    for name, batches in cuts.items():
        got = await project(database_url, batches)
        found = [line for table in whole for line in differences(table, got[table], whole[table])]
        assert not found, f"{name}: {len(found)} difference(s): {found[:5]}"
