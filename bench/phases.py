"""The benchmark's phases, in the order `Bench.run` takes them.

0. setup     the fleet's shipments (created → assigned → picked up → in transit, each
             with a planned route) through shipment-events; wait until projected.
2. ingest    GPS through a gps-ingest instance whose topic nobody consumes.
1. raw       the records stage 2 wrote, read back and produced + consumed again with
             a bare aiokafka producer/consumer; their points COPYed into PostgreSQL;
             a bare Kafka produce→consume latency at the latency phase's rate.
3. e2e       GPS through gps-ingest → Kafka → projector → PostgreSQL, as fast as it
             goes while the projection keeps up (the client pauses when the lag
             exceeds a bound); completion by stored offsets. RSS sampled throughout.
3. latency   a fixed offered rate; receipt (the envelope's recorded_at, set by
             gps-ingest) to commit (first poll of projection_offsets showing the
             record applied, every 5 ms).
5. alerts    during the latency phase, vehicles whose promised window has passed
             send two batches each (the second confirms LATE); outbox created_at to
             the dispatch subscriber's receipt.
7. learner   the learner's replay of the raw phase's records against a raw consume of
             them; the ETA estimate's cost with the learner's model against the
             fleet average (bench/learner_rows.py).
4. query     GetShipment under concurrent load, and the same statement on asyncpg.
6. rebuild   `cargotrack rebuild` replays every topic into a fresh schema.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from google.protobuf import descriptor_pb2
from prometheus_client.parser import text_string_to_metric_families

from bench import learner_rows, profiling
from bench.measure import (
    JsonClient,
    Offsets,
    RssSeries,
    percentile,
    run_client,
    sample_load,
    sample_rss,
)
from bench.report import Report, Row
from bench.stack import PARTITIONS, BenchStack
from bench.workload import (
    ROUTE_LENGTH_M,
    SPEED_MPS,
    TENANT,
    points_per_vehicle,
    route_of,
    shipment_id,
    vehicle_id,
)
from shared import tracking_store as store
from shared.auth import Role, mint_token
from shared.config import DEV_JWT_SECRET, Settings
from shared.db import migrate
from shared.domain.polyline import encode as encode_polyline
from shared.envelopes import decode, timestamp
from shared.kafka import TopicSpec, ensure_topics, make_producer
from shared.pb import (
    common_pb2,
    dispatch_pb2,
    shipment_pb2,
    tracking_pb2,
)

GHZ_ENV = "CARGOTRACK_GHZ"
#: Points a device sends on one stream in the ingest-only runs (e2e: two batches).
INGEST_SESSION_POINTS = 2000


@dataclass
class BenchOptions:
    """What to run and for how long (`smoke()` gives the CI version)."""

    e2e_s: float = 60.0
    ingest_s: float = 15.0
    latency_s: float = 30.0
    query_s: float = 15.0
    #: Offered rate of the latency phase (points/s); lowered if e2e cannot sustain it.
    rate: float = 20_000.0
    vehicles: int = 2000
    alert_vehicles: int = 200
    streams: int = 8
    latency_streams: int = 16
    #: End-to-end runs, one per batch size (the first is the headline figure).
    e2e_batches: tuple[int, ...] = (500, 50)
    latency_batch: int = 50
    ingest_batches: tuple[int, ...] = (50, 500)
    query_concurrency: int = 32
    #: gRPC connections the query clients spread their calls over. A connection stays
    #: with one tracking-query worker (CARGOTRACK_PROCESSES), so N workers need several.
    query_connections: int = 2
    #: "auto" (ghz when found, else Python), "ghz" or "python".
    query_client: str = "auto"
    #: The e2e client pauses while the projection lags by more than this many points.
    lag_limit_points: int = 250_000
    #: Upper bound of any offered rate, to size each vehicle's event-time window.
    rate_cap: float = 250_000.0
    #: Most records read back for the raw Kafka baseline, per batch size.
    baseline_records: int = 20_000
    baseline_latency_s: float = 10.0
    #: Section 7's ETA cost: vehicles (100 km routes) and warm rounds per model.
    eta_vehicles: int = 200
    eta_rounds: int = 3
    rebuild: bool = True
    profile_dir: Path | None = None
    smoke: bool = False

    @classmethod
    def smoke_options(cls) -> BenchOptions:
        return cls(
            e2e_s=2.0,
            ingest_s=1.5,
            latency_s=3.0,
            query_s=1.5,
            rate=2_000.0,
            vehicles=60,
            alert_vehicles=6,
            streams=4,
            latency_streams=4,
            query_concurrency=8,
            query_client="python",
            lag_limit_points=5_000,
            baseline_records=2_000,
            baseline_latency_s=1.0,
            eta_vehicles=10,
            eta_rounds=1,
            smoke=True,
        )


def ghz_path() -> str | None:
    """ghz from $CARGOTRACK_GHZ, the tools cache (see the Makefile) or PATH."""
    import os

    explicit = os.environ.get(GHZ_ENV)
    if explicit:
        return explicit
    cache = Path(os.environ.get("CARGOTRACK_CACHE_DIR") or Path.home() / ".cache" / "cargotrack")
    candidate = cache / "tools" / "bin" / "ghz"
    if candidate.exists():
        return str(candidate)
    return shutil.which("ghz")


class Bench:
    """One benchmark run against a started BenchStack; fills a Report."""

    def __init__(self, stack: BenchStack, options: BenchOptions, report: Report) -> None:
        assert stack.settings is not None
        assert stack.ingest_settings is not None
        self.stack = stack
        self.options = options
        self.report = report
        self.settings: Settings = stack.settings
        self.ingest_settings: Settings = stack.ingest_settings
        self.rss = RssSeries()
        self.load_samples: list[tuple[float, float]] = []
        self.phase_load: dict[str, tuple[float, float]] = {}
        o = options
        now = int(time.time())
        v = o.vehicles
        # Event-time windows (one fix per second per vehicle), all in the past.
        # Each e2e run gets its window (small batches never reach the big ones' rate).
        self.e2e_spans = {
            b: points_per_vehicle(o.e2e_s, o.rate_cap * min(1.0, b / 500), v, b)
            for b in o.e2e_batches
        }
        self.lat_span = points_per_vehicle(o.latency_s, max(o.rate * 2, 10_000), v, o.latency_batch)
        self.t_e2e = now - 900 - self.lat_span - sum(self.e2e_spans.values())
        #: Where the next phase's fixes start; moved on by each phase that sends GPS.
        self.t_next = self.t_e2e
        self.t_setup = self.t_e2e - 4 * 3600
        #: Long enough that no vehicle reaches its destination during the run.
        self.route_length_m = ROUTE_LENGTH_M
        #: Slow enough that no vehicle reaches the end of its route (20 km to spare).
        self.speed_mps = min(
            SPEED_MPS,
            (ROUTE_LENGTH_M - 20_000) / (sum(self.e2e_spans.values()) + self.lat_span),
        )
        self.ingest_span = (
            points_per_vehicle(o.ingest_s, o.rate_cap, v, max(o.ingest_batches))
            + 2 * INGEST_SESSION_POINTS
        )
        self.t_ingest = now - 900 - self.ingest_span * len(o.ingest_batches)
        self.ingest_ranges: dict[int, tuple[dict[int, int], dict[int, int]]] = {}
        self.e2e_rates: dict[int, float] = {}
        self.failed: list[str] = []
        #: Records copied to each raw topic by the raw phase, by batch size.
        self.raw_records: dict[int, int] = {}
        self.pool: asyncpg.Pool | None = None
        self.offsets: Offsets | None = None

    # --- driver ---------------------------------------------------------------------

    async def run(self) -> None:
        self.pool = await asyncpg.create_pool(
            self.settings.database.url,
            min_size=1,
            max_size=4,
            server_settings={"search_path": self.settings.database.schema},
        )
        assert self.pool is not None
        self.offsets = Offsets(self.settings, self.settings.topics.gps_points, self.pool)
        await self.offsets.start()
        samplers = [
            asyncio.create_task(sample_rss(self.stack.pids(), self.rss)),
            asyncio.create_task(sample_load(self.load_samples)),
        ]
        try:
            await self._phase("setup", self.setup_fleet)
            await self._phase("ingest", self.ingest)
            await self._phase("raw", self.baselines)
            await self._phase("learner", self.learner)
            await self._phase("e2e", self.e2e)
            await self._phase("latency", self.latency_and_alerts)
            await self._phase("query", self.query)
            if self.options.rebuild:
                await self._phase("rebuild", self.rebuild)
            self.memory()
        finally:
            for task in samplers:
                task.cancel()
            await asyncio.gather(*samplers, return_exceptions=True)
            await self.offsets.stop()
            await self.pool.close()

    async def _phase(self, name: str, action: Callable[[], Awaitable[None]]) -> None:
        """Run one phase; a failure is recorded (its rows stay missing) and the run goes on."""
        self.stack.check_running()
        self.rss.phase = name
        started = time.time()
        load0 = _loadavg1()
        print(f"bench: {name} …", file=sys.stderr, flush=True)
        try:
            await action()
        except Exception as error:
            self.report.notes.append(f"phase {name} FAILED: {error!r}")
            print(f"bench: {name} FAILED: {error!r}", file=sys.stderr, flush=True)
            self.failed.append(name)
        self.phase_load[name] = (load0, _loadavg1())
        print(
            f"bench: {name} done in {time.time() - started:.1f}s (load {_loadavg1():.2f})",
            file=sys.stderr,
            flush=True,
        )
        self.stack.check_running()

    def _row(self, row: Row) -> None:
        self.report.add(row)
        print(f"bench:   {row.key} = {row.value:,.2f} {row.unit}  {row.note}", file=sys.stderr)

    # --- 0. setup -------------------------------------------------------------------

    def _shipment_events(self, index: int, late: bool) -> list[shipment_pb2.ShipmentEvent]:
        route = route_of(index)
        vertices = route.vertices(self.route_length_m)
        start = datetime.fromtimestamp(self.t_setup, UTC) + timedelta(seconds=index % 600)
        if late:  # the window closed a day before the vehicle's GPS starts: LATE
            gps_start = datetime.fromtimestamp(self.t_e2e, UTC)
            window = (gps_start - timedelta(days=2), gps_start - timedelta(days=1))
        else:
            window = (start, datetime.now(UTC) + timedelta(days=30))
        created = shipment_pb2.ShipmentCreated(
            customer_id=f"cust-{index % 97}",
            origin=common_pb2.LatLng(latitude=vertices[0][0], longitude=vertices[0][1]),
            destination=common_pb2.LatLng(latitude=vertices[-1][0], longitude=vertices[-1][1]),
            planned_route=encode_polyline(vertices),
            reference=f"bench-{index}",
        )
        created.promised_window.start.CopyFrom(timestamp(window[0]))
        created.promised_window.end.CopyFrom(timestamp(window[1]))
        steps = [
            shipment_pb2.ShipmentEvent(created=created),
            shipment_pb2.ShipmentEvent(
                vehicle_assigned=shipment_pb2.VehicleAssigned(
                    vehicle_id=vehicle_id(index), driver_id=f"driver-{index}"
                )
            ),
            shipment_pb2.ShipmentEvent(picked_up=shipment_pb2.PickedUp()),
            shipment_pb2.ShipmentEvent(in_transit=shipment_pb2.InTransit()),
        ]
        for step, event in enumerate(steps):
            event.event_id = f"{shipment_id(index)}-e{step}"
            event.shipment_id = shipment_id(index)
            event.occurred_at.CopyFrom(timestamp(start + timedelta(minutes=step)))
        return steps

    async def setup_fleet(self) -> None:
        o = self.options
        events: list[shipment_pb2.ShipmentEvent] = []
        for index in range(o.vehicles + o.alert_vehicles):
            events.extend(self._shipment_events(index, late=index >= o.vehicles))
        token = mint_token(
            DEV_JWT_SECRET, role=Role.SHIPPER, tenant_id=TENANT, subject="bench-tms", ttl_s=3600
        )
        service = self.stack.services["shipment-events"]
        async with grpc.aio.insecure_channel(service.target) as channel:
            call = channel.unary_unary(
                "/cargotrack.v1.ShipmentEventsService/RecordEvents",
                request_serializer=shipment_pb2.RecordEventsRequest.SerializeToString,
                response_deserializer=shipment_pb2.RecordEventsResponse.FromString,
            )
            # Shipment by shipment, in lifecycle order: chunks of whole lifecycles.
            for i in range(0, len(events), 400):
                await call(
                    shipment_pb2.RecordEventsRequest(events=events[i : i + 400]),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=60,
                )
        topic = self.settings.topics.shipment_events
        offsets = Offsets(self.settings, topic, self._pool())
        await offsets.start()
        try:
            await offsets.wait_applied(await offsets.ends(), timeout_s=300)
        finally:
            await offsets.stop()
        count = await self._pool().fetchval(
            "SELECT count(*) FROM shipments WHERE status = 4"  # IN_TRANSIT
        )
        if count != o.vehicles + o.alert_vehicles:
            raise RuntimeError(f"setup: {count} shipments in transit, expected all")

    def _pool(self) -> asyncpg.Pool:
        assert self.pool is not None
        return self.pool

    def _offsets(self) -> Offsets:
        assert self.offsets is not None
        return self.offsets

    # --- 2. ingest --------------------------------------------------------------------

    async def ingest(self) -> None:
        o = self.options
        topic = self.ingest_settings.topics.gps_points
        offsets = Offsets(self.ingest_settings, topic, self._pool())
        await offsets.start()
        try:
            for n, batch in enumerate(o.ingest_batches):
                before = await offsets.ends()
                result = await run_client(
                    "bench.gps_client",
                    {
                        "target": self.stack.services["gps-ingest-only"].target,
                        "vehicles": list(range(o.vehicles)),
                        "device": f"ingest{batch}",
                        "batch": batch,
                        "start_s": self.t_ingest + n * self.ingest_span,
                        "origin_s": self.t_ingest,
                        "max_points_per_vehicle": self.ingest_span,
                        "duration_s": o.ingest_s,
                        "streams": o.streams,
                        # Long-lived streams: what the service itself sustains per batch.
                        "batches_per_stream": INGEST_SESSION_POINTS // batch,
                    },
                    timeout_s=o.ingest_s + 120,
                )
                after = await offsets.ends()
                self.ingest_ranges[batch] = (before, after)
                _check_client("ingest", result)
                seconds = result["ended"] - result["started"]
                acks = result["ack_latencies"]
                self._row(
                    Row(
                        f"2.ingest.{batch}",
                        f"ingest: gps-ingest → Kafka, {batch}-point batches, "
                        f"{o.streams} streams of {INGEST_SESSION_POINTS:,} points",
                        result["points"] / seconds,
                        "points/s",
                        f"1.produce.{batch}",
                        note=f"ack p50 {percentile(acks, 0.5) * 1e3:.0f} ms, "
                        f"p99 {percentile(acks, 0.99) * 1e3:.0f} ms",
                    )
                )
        finally:
            await offsets.stop()

    # --- 1. raw baselines ---------------------------------------------------------------

    async def _read_back(
        self, batch: int
    ) -> list[tuple[int, bytes, bytes, list[tuple[str, bytes]]]]:
        """The records the ingest phase wrote with `batch`-point batches (capped)."""
        before, after = self.ingest_ranges[batch]
        topic = self.ingest_settings.topics.gps_points
        cap = self.options.baseline_records
        total = sum(after[p] - before[p] for p in after)
        fraction = min(1.0, cap / max(total, 1))
        share = {p: math.ceil((after[p] - before[p]) * fraction) for p in after}
        consumer = AIOKafkaConsumer(**self.settings.kafka.client_options(), group_id=None)
        await consumer.start()
        found: list[tuple[int, bytes, bytes, list[tuple[str, bytes]]]] = []
        try:
            partitions = [TopicPartition(topic, p) for p in after]
            consumer.assign(partitions)
            for tp in partitions:
                consumer.seek(tp, before[tp.partition])
            wanted = {p: before[p] + share[p] for p in after}
            done: set[int] = {p for p in after if share[p] == 0}
            async with asyncio.timeout(120):
                while len(done) < len(after):
                    batches = await consumer.getmany(timeout_ms=500, max_records=5000)
                    for tp, records in batches.items():
                        for record in records:
                            if record.offset < wanted[tp.partition]:
                                found.append(
                                    (
                                        tp.partition,
                                        record.key or b"",
                                        record.value or b"",
                                        [(k, bytes(v)) for k, v in record.headers],
                                    )
                                )
                            if record.offset >= wanted[tp.partition] - 1:
                                done.add(tp.partition)
        finally:
            await consumer.stop()
        return found

    async def baselines(self) -> None:
        o = self.options
        kafka = self.settings.kafka
        specs = [
            TopicSpec(f"{self.stack.raw_prefix}gps-{b}", PARTITIONS, 1, 24)
            for b in o.ingest_batches
        ]
        specs.append(TopicSpec(f"{self.stack.raw_prefix}latency", PARTITIONS, 1, 24))
        await ensure_topics(kafka, specs)
        copy_rows: list[tuple[Any, ...]] = []
        for batch in o.ingest_batches:
            records = await self._read_back(batch)
            if not records:
                raise RuntimeError(f"raw: no records of the {batch}-point ingest to replay")
            points = sum(len(decode(value).gps_batch.points) for _, _, value, _ in records)
            topic = f"{self.stack.raw_prefix}gps-{batch}"
            producer = make_producer(kafka)
            await producer.start()
            try:
                await _warm_up(producer, topic)
                t0 = time.perf_counter()
                futures = [
                    await producer.send(topic, value, key=key, headers=headers)
                    for _, key, value, headers in records
                ]
                await asyncio.gather(*futures)
                produce_s = time.perf_counter() - t0
            finally:
                await producer.stop()
            consume_s = await _consume_all(kafka.client_options(), topic, len(records) + PARTITIONS)
            self.raw_records[batch] = len(records)
            mean_bytes = sum(len(v) for _, _, v, _ in records) / len(records)
            detail = (
                f"{len(records):,} records of {mean_bytes / 1024:.1f} KiB, {PARTITIONS} partitions"
            )
            self._row(
                Row(
                    f"1.produce.{batch}",
                    f"raw aiokafka produce (acks=all, idempotent), {batch}-pt envelopes",
                    points / produce_s,
                    "points/s",
                    note=detail,
                )
            )
            self._row(
                Row(
                    f"1.consume.{batch}",
                    f"raw aiokafka consume, {batch}-pt envelopes",
                    points / consume_s,
                    "points/s",
                )
            )
            self._row(
                Row(
                    f"1.kafka.{batch}",
                    f"raw Kafka produce then consume, {batch}-pt envelopes",
                    points / (produce_s + consume_s),
                    "points/s",
                )
            )
            if batch == max(o.ingest_batches):
                for _, _, value, _ in records:
                    envelope = decode(value)
                    gps = envelope.gps_batch
                    for p in gps.points:
                        copy_rows.append(
                            (
                                envelope.tenant_id,
                                gps.vehicle_id,
                                p.recorded_at.ToDatetime(tzinfo=UTC),
                                p.latitude,
                                p.longitude,
                                p.speed_mps,
                                p.heading_deg,
                                p.accuracy_m,
                                envelope.event_id,
                            )
                        )
        await self._copy_baseline(copy_rows)
        await self._kafka_latency_baseline()

    async def _copy_baseline(self, rows: list[tuple[Any, ...]]) -> None:
        database = replace(self.settings.database, schema=self.stack.raw_schema)
        await migrate(database)
        connection = await asyncpg.connect(
            database.url, server_settings={"search_path": database.schema}
        )
        try:
            await store.maintain_position_partitions(
                connection, datetime.now(UTC), self.settings.position_retention_days
            )
            chunk = 50_000
            t0 = time.perf_counter()
            for i in range(0, len(rows), chunk):
                async with connection.transaction():
                    await connection.copy_records_to_table(
                        "vehicle_positions",
                        columns=store.HISTORY_COLUMNS,
                        records=rows[i : i + chunk],
                    )
            seconds = time.perf_counter() - t0
        finally:
            await connection.close()
        self._row(
            Row(
                "1.copy",
                "raw PostgreSQL COPY of the same history rows (50k rows per transaction)",
                len(rows) / seconds,
                "points/s",
                note=f"{len(rows):,} rows",
            )
        )
        # The raw limit of the whole path: the same bytes through each hop in turn.
        for b in self.options.ingest_batches:
            serial = 1.0 / (
                1.0 / self.report.value(f"1.produce.{b}")
                + 1.0 / self.report.value(f"1.consume.{b}")
                + 1.0 / self.report.value("1.copy")
            )
            self._row(
                Row(
                    f"1.pipeline.{b}",
                    f"raw path: produce + consume + COPY, {b}-pt envelopes, serial",
                    serial,
                    "points/s",
                )
            )
        b = max(self.options.ingest_batches)
        replay = 1.0 / (
            1.0 / self.report.value(f"1.consume.{b}") + 1.0 / self.report.value("1.copy")
        )
        self._row(Row("1.replay", "raw replay: consume + COPY, serial", replay, "points/s"))

    # --- 7. learner -------------------------------------------------------------------

    async def learner(self) -> None:
        """Section 7 (see bench/learner_rows.py): the learner's replay against a raw
        consume of the same records, and the ETA estimate's cost with its model."""
        b = max(self.options.ingest_batches)
        count = self.raw_records.get(b)
        if not count:
            raise RuntimeError("learner: the raw phase copied no records to replay")
        topic = f"{self.stack.raw_prefix}gps-{b}"
        options = self.settings.kafka.client_options()
        for row in await learner_rows.replay_rows(options, topic, PARTITIONS, count + PARTITIONS):
            self._row(row)
        o = self.options
        rows = await asyncio.to_thread(learner_rows.eta_rows, o.eta_vehicles, o.eta_rounds)
        for row in rows:
            self._row(row)

    def _latency_rate(self) -> float:
        """The latency phase's offered rate: the target, or 70 % of what e2e sustained
        with the same batch size when that is less than 1.25x the target."""
        o = self.options
        sustained = self.e2e_rates.get(o.latency_batch, math.nan)
        if math.isnan(sustained) or sustained >= o.rate * 1.25:
            return o.rate
        return max(500.0, math.floor(sustained * 0.7 / 500) * 500)

    async def _kafka_latency_baseline(self) -> None:
        """Bare producer → consumer latency at the target rate, with latency-phase records."""
        o = self.options
        batch = o.latency_batch if o.latency_batch in o.ingest_batches else min(o.ingest_batches)
        records = await self._read_back(batch)
        topic = f"{self.stack.raw_prefix}latency"
        kafka = self.settings.kafka
        consumer = AIOKafkaConsumer(**kafka.client_options(), group_id=None)
        await consumer.start()
        latencies: list[float] = []
        try:
            partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)
            producer = make_producer(kafka)
            await producer.start()
            await _warm_up(producer, topic)
            sent = 0
            stop = asyncio.Event()

            async def receive() -> None:
                while not stop.is_set() or len(latencies) < sent:
                    batches = await consumer.getmany(timeout_ms=100)
                    now = time.time()
                    for recs in batches.values():
                        for record in recs:
                            stamp = dict(record.headers).get("bench-sent")
                            if stamp is not None:
                                latencies.append(now - struct.unpack("<d", stamp)[0])

            receiver = asyncio.create_task(receive())
            try:
                per_record = o.latency_batch / o.rate
                t0 = time.monotonic()
                until = t0 + o.baseline_latency_s
                futures = []
                while time.monotonic() < until:
                    target = t0 + sent * per_record
                    delay = target - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    _, key, value, headers = records[sent % len(records)]
                    futures.append(
                        await producer.send(
                            topic,
                            value,
                            key=key,
                            headers=[*headers, ("bench-sent", struct.pack("<d", time.time()))],
                        )
                    )
                    sent += 1
                await asyncio.gather(*futures)
                stop.set()
                async with asyncio.timeout(30):
                    await receiver
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
                await producer.stop()
        finally:
            await consumer.stop()
        note = f"{o.rate:,.0f} points/s offered, {o.latency_batch}-pt envelopes"
        for q in (50, 99):
            self._row(
                Row(
                    f"1.latency.p{q}",
                    f"raw Kafka produce→consume latency p{q}",
                    percentile(latencies, q / 100) * 1e3,
                    "ms",
                    note=note if q == 50 else "",
                )
            )

    # --- 3. end to end ----------------------------------------------------------------

    async def e2e(self) -> None:
        for batch in self.options.e2e_batches:
            await self._e2e(batch)

    async def _e2e(self, b: int) -> None:
        o = self.options
        offsets = self._offsets()
        start_ends = await offsets.ends()
        await offsets.wait_applied(start_ends, timeout_s=120)
        job = {
            "target": self.stack.services["gps-ingest"].target,
            "vehicles": list(range(o.vehicles)),
            "device": f"e2e{b}",
            "batch": b,
            "start_s": self.t_next,
            "origin_s": self.t_e2e,
            "speed_mps": self.speed_mps,
            "max_points_per_vehicle": self.e2e_spans[b],
            "duration_s": o.e2e_s,
            "streams": o.streams,
        }
        committed: list[tuple[float, int]] = []
        paused_s = 0.0
        # The same number of records in flight whatever the batch size (small batches
        # cost the projector more per point: a fixed point bound would mean minutes).
        lag_limit = o.lag_limit_points * min(1.0, b / 500)
        profiles: list[asyncio.Task[None]] = []
        async with JsonClient("bench.gps_client", job) as client:
            if o.profile_dir is not None:
                for name in ("gps-ingest", "projector"):
                    profiles.append(
                        asyncio.create_task(
                            profiling.record(
                                self.stack.services[name].pid,
                                o.profile_dir / f"e2e{b}-{name}",
                                duration_s=max(1.0, o.e2e_s * 0.8),
                            )
                        )
                    )

            async def control() -> None:
                nonlocal paused_s
                paused = False
                paused_at = 0.0
                base = sum(start_ends.values())
                while True:
                    ends, stored = await offsets.ends(), await offsets.stored()
                    applied = sum(stored[p] + 1 for p in stored) - base
                    committed.append((time.time(), applied * b))
                    lag_points = sum(max(0, e - 1 - stored[p]) for p, e in ends.items()) * b
                    if not paused and lag_points > lag_limit:
                        await client.send("pause")
                        paused, paused_at = True, time.monotonic()
                    elif paused and lag_points < lag_limit / 2:
                        await client.send("resume")
                        paused = False
                        paused_s += time.monotonic() - paused_at
                    await asyncio.sleep(0.1)

            controller = asyncio.create_task(control())
            try:
                result = await client.result(timeout_s=o.e2e_s + 300)
            finally:
                controller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await controller
        _check_client("e2e", result)
        # The next phase continues each vehicle's track a minute after this one's last fix.
        self.t_next += int(result["max_point"]) + 60
        end_ends = await offsets.ends()
        done = await offsets.wait_applied(end_ends, timeout_s=600)
        for task in profiles:
            await task
        points = result["points"]
        total_s = done - result["started"]
        rate = points / total_s
        self.e2e_rates[b] = rate
        send_s = result["ended"] - result["started"]
        # Steady state: from a quarter into the send window until the backlog drained.
        steady_from = result["started"] + send_s / 4
        after = [(t, n) for t, n in committed if t >= steady_from]
        final = points  # every acknowledged point is applied at `done`
        steady = (
            (final - after[0][1]) / (done - after[0][0])
            if after and done > after[0][0]
            else math.nan
        )
        self._row(
            Row(
                f"3.e2e.{b}",
                f"end to end: gRPC receipt → state + history committed, {b}-pt batches, "
                f"{o.streams} streams of 2 batches, {o.e2e_s:g}s",
                rate,
                "points/s",
                f"1.pipeline.{b}",
                note=f"{points:,} points in {total_s:.1f}s incl. drain; client paused "
                f"{paused_s / max(send_s, 1e-9):.0%} of the time (projection lag bound)",
            )
        )
        self._row(
            Row(
                f"3.e2e.{b}.steady",
                f"end to end, {b}-pt: commit rate from 1/4 into the send window to drained",
                steady,
                "points/s",
                f"1.pipeline.{b}",
            )
        )

    # --- 3. latency + 5. alerts ---------------------------------------------------------

    async def latency_and_alerts(self) -> None:
        o = self.options
        offsets = self._offsets()
        start_ends = await offsets.ends()
        await offsets.wait_applied(start_ends, timeout_s=120)
        rate = self._latency_rate()
        topic = self.settings.topics.gps_points
        received: dict[int, list[tuple[int, float]]] = {p: [] for p in start_ends}
        observed: dict[int, list[tuple[int, float]]] = {p: [] for p in start_ends}
        alerts: list[tuple[str, float]] = []

        async def read_topic() -> None:
            consumer = AIOKafkaConsumer(**self.settings.kafka.client_options(), group_id=None)
            await consumer.start()
            try:
                partitions = [TopicPartition(topic, p) for p in start_ends]
                consumer.assign(partitions)
                for tp in partitions:
                    consumer.seek(tp, start_ends[tp.partition])
                while True:
                    batches = await consumer.getmany(timeout_ms=100, max_records=2000)
                    for tp, records in batches.items():
                        for record in records:
                            envelope = decode(record.value)
                            at = envelope.recorded_at.ToNanoseconds() / 1e9
                            received[tp.partition].append((record.offset, at))
            finally:
                await consumer.stop()

        async def poll_offsets() -> None:
            last = {p: -1 for p in start_ends}
            async with self._pool().acquire() as connection:
                while True:
                    rows = await connection.fetch(
                        "SELECT partition, last_offset FROM projection_offsets"
                        " WHERE projection = 'tracking' AND topic = $1",
                        topic,
                    )
                    now = time.time()
                    for row in rows:
                        p, offset = row["partition"], int(row["last_offset"])
                        if offset > last.get(p, -1):
                            last[p] = offset
                            observed.setdefault(p, []).append((offset, now))
                    await asyncio.sleep(0.005)

        subscriber_ready = asyncio.Event()
        alerts_source = "dispatch SubscribeDelays"

        async def subscribe() -> None:
            token = mint_token(
                DEV_JWT_SECRET, role=Role.DISPATCHER, tenant_id=TENANT, subject="bench-dispatch"
            )
            service = self.stack.services["dispatch"]
            async with grpc.aio.insecure_channel(service.target) as channel:
                call = channel.unary_stream(
                    "/cargotrack.v1.DispatchService/SubscribeDelays",
                    request_serializer=dispatch_pb2.SubscribeDelaysRequest.SerializeToString,
                    response_deserializer=dispatch_pb2.SubscribeDelaysResponse.FromString,
                )(
                    dispatch_pb2.SubscribeDelaysRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
                await call.initial_metadata()
                subscriber_ready.set()
                async for response in call:
                    alerts.append((response.alert.alert_id, time.time()))

        async def alerts_topic() -> None:
            alerts_topic_name = self.settings.topics.shipment_alerts
            consumer = AIOKafkaConsumer(**self.settings.kafka.client_options(), group_id=None)
            await consumer.start()
            try:
                partitions = [TopicPartition(alerts_topic_name, p) for p in range(PARTITIONS)]
                consumer.assign(partitions)
                await consumer.seek_to_end(*partitions)
                for tp in partitions:
                    await consumer.position(tp)
                subscriber_ready.set()
                while True:
                    batches = await consumer.getmany(timeout_ms=50)
                    now = time.time()
                    for records in batches.values():
                        for record in records:
                            alerts.append((decode(record.value).event_id, now))
            finally:
                await consumer.stop()

        if "dispatch" in self.stack.services:
            listener = asyncio.create_task(subscribe())
        else:
            alerts_source = "the alerts topic (dispatch service not available)"
            listener = asyncio.create_task(alerts_topic())
        tasks = [
            asyncio.create_task(read_topic()),
            asyncio.create_task(poll_offsets()),
            listener,
        ]
        # Where the projector's time goes at a fixed rate (the e2e profiles show it
        # flat out, which is another shape of work: larger batches, no idle time).
        profile = (
            None
            if o.profile_dir is None
            else asyncio.create_task(
                profiling.record(
                    self.stack.services["projector"].pid,
                    o.profile_dir / "latency-projector",
                    duration_s=max(1.0, o.latency_s * 0.9),
                )
            )
        )
        try:
            async with asyncio.timeout(60):
                await subscriber_ready.wait()
            target = self.stack.services["gps-ingest"].target
            main = run_client(
                "bench.gps_client",
                {
                    "target": target,
                    "vehicles": list(range(o.vehicles)),
                    "device": "latency",
                    "batch": o.latency_batch,
                    "start_s": self.t_next,
                    "origin_s": self.t_e2e,
                    "speed_mps": self.speed_mps,
                    "max_points_per_vehicle": self.lat_span,
                    "duration_s": o.latency_s,
                    "streams": o.latency_streams,
                    "rate": rate,
                },
                timeout_s=o.latency_s + 120,
            )
            alerting = run_client(
                "bench.gps_client",
                {
                    "target": target,
                    "vehicles": list(range(o.vehicles, o.vehicles + o.alert_vehicles)),
                    "device": "alerts",
                    "batch": o.latency_batch,
                    "start_s": self.t_next,
                    "origin_s": self.t_e2e,
                    "speed_mps": self.speed_mps,
                    "max_points_per_vehicle": self.lat_span,
                    "duration_s": o.latency_s * 0.8,
                    "batches_per_stream": 2,  # the second observation confirms LATE
                    "once": True,
                },
                timeout_s=o.latency_s + 120,
            )
            result, alert_result = await asyncio.gather(main, alerting)
            _check_client("latency", result)
            _check_client("alerts", alert_result)
            done_ends = await offsets.ends()
            await offsets.wait_applied(done_ends, timeout_s=120)
            await asyncio.sleep(0.05)  # one more offsets poll
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    while len(alerts) < o.alert_vehicles or any(  # noqa: ASYNC110
                        len(received[p]) < done_ends[p] - start_ends[p] for p in done_ends
                    ):
                        await asyncio.sleep(0.05)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if profile is not None:
                await profile
        latencies = _commit_latencies(received, observed)
        offered = result["points"] / max(result["ended"] - result["started"], 1e-9)
        if rate == 20_000:
            which = "the 20,000 points/s target"
        elif rate < o.rate:
            which = f"{rate:,.0f} points/s (e2e sustains less than 1.25x the target)"
        else:
            which = f"{rate:,.0f} points/s"
        self._row(
            Row(
                "3.latency.p50",
                f"receipt → committed state p50 at {which}, {o.latency_batch}-pt batches",
                percentile(latencies, 0.5) * 1e3,
                "ms",
                "1.latency.p50",
                note=f"{len(latencies):,} records, achieved {offered:,.0f} points/s; "
                "offsets polled every 5 ms",
            )
        )
        self._row(
            Row(
                "3.latency.p99",
                "receipt → committed state p99",
                percentile(latencies, 0.99) * 1e3,
                "ms",
                "1.latency.p99",
            )
        )
        await self._alert_rows(alerts, alerts_source)

    async def _alert_rows(self, alerts: list[tuple[str, float]], source: str) -> None:
        ids = [alert_id for alert_id, _ in alerts]
        rows = await self._pool().fetch(
            "SELECT alert_id, created_at FROM alert_outbox WHERE alert_id = ANY($1::text[])", ids
        )
        created = {r["alert_id"]: r["created_at"].timestamp() for r in rows}
        latencies = [at - created[a] for a, at in alerts if a in created]
        expected = self.options.alert_vehicles
        note = f"{len(latencies)} alerts of {expected} expected, to {source}"
        self._row(
            Row(
                "5.alerts.p50",
                "alert: outbox created_at → subscriber received, p50",
                percentile(latencies, 0.5) * 1e3,
                "ms",
                "1.latency.p50",
                note=note,
            )
        )
        self._row(
            Row(
                "5.alerts.p99",
                "alert: outbox created_at → subscriber received, p99",
                percentile(latencies, 0.99) * 1e3,
                "ms",
                "1.latency.p99",
            )
        )

    # --- 4. query -----------------------------------------------------------------------

    async def query(self) -> None:
        o = self.options
        ids = [shipment_id(i) for i in range(o.vehicles)]
        raw = await run_client(
            "bench.query_client",
            {
                "mode": "pg",
                "dsn": self.settings.database.url,
                "schema": self.settings.database.schema,
                "shipments": ids,
                "duration_s": o.query_s,
                "concurrency": o.query_concurrency,
            },
            timeout_s=o.query_s + 60,
        )
        if raw["errors"] or not raw["calls"]:
            raise RuntimeError(f"raw query failed: {raw['error_samples']}")
        self._row(
            Row(
                "1.pg.rps",
                f"raw asyncpg: GetShipment's SELECT, {o.query_concurrency} in flight",
                raw["calls"] / raw["seconds"],
                "requests/s",
            )
        )
        raw_p99 = percentile(raw["latencies"], 0.99) * 1e3
        self._row(Row("1.pg.p99", "raw asyncpg SELECT p99", raw_p99, "ms"))
        target = self.stack.services["tracking-query"].target
        ghz = ghz_path() if o.query_client in ("auto", "ghz") else None
        if o.query_client == "ghz" and ghz is None:
            raise RuntimeError("ghz not found: set CARGOTRACK_GHZ (see docs/performance.md)")
        profile: asyncio.Task[None] | None = None
        if o.profile_dir is not None:
            profile = asyncio.create_task(
                profiling.record(
                    self.stack.services["tracking-query"].pid,
                    o.profile_dir / "query-tracking-query",
                    duration_s=max(1.0, o.query_s * 0.8),
                )
            )
        lookups_before = await self._cache_lookups()
        ghz_result = None
        if ghz is not None:
            try:
                ghz_result = await self._ghz(ghz, target, ids)
            except RuntimeError as error:
                if o.query_client == "ghz":
                    raise
                self.report.notes.append(f"ghz failed, Python client used instead: {error}")
        if ghz_result is not None:
            rps, p50, p99, errors, client = ghz_result
        else:
            result = await run_client(
                "bench.query_client",
                {
                    "mode": "grpc",
                    "target": target,
                    "shipments": ids,
                    "duration_s": o.query_s,
                    "concurrency": o.query_concurrency,
                    "channels": o.query_connections,
                },
                timeout_s=o.query_s + 60,
            )
            rps = result["calls"] / result["seconds"]
            p50 = percentile(result["latencies"], 0.5)
            p99 = percentile(result["latencies"], 0.99)
            errors = result["errors"]
            client = "Python grpc.aio client"
        if profile is not None:
            await profile
        total_calls = rps * o.query_s + errors
        if errors > max(10, 0.01 * total_calls):
            raise RuntimeError(f"query: {errors} failed calls")
        cache = _hit_share(lookups_before, await self._cache_lookups())
        self._row(
            Row(
                "4.query.rps",
                f"GetShipment (tracking-query), {o.query_concurrency} in flight",
                rps,
                "requests/s",
                "1.pg.rps",
                note=f"{client}, p50 {p50 * 1e3:.1f} ms"
                + (f", {errors} failed calls" if errors else "")
                + (f"; {cache}" if cache else ""),
            )
        )
        self._row(Row("4.query.p99", "GetShipment p99", p99 * 1e3, "ms", "1.pg.p99"))
        if self.stack.http_port is not None:
            await self._http_query(ids, rps)

    async def _cache_lookups(self) -> dict[str, float]:
        """tracking-query's response cache lookups so far, by outcome (empty if unknown)."""
        port = self.stack.query_metrics_port
        if port is None:
            return {}
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=10)
                ) as response,
            ):
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return {}
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name == "cargotrack_query_cache_lookups":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        found[sample.labels["outcome"]] = sample.value
        return found

    async def _http_query(self, ids: list[str], grpc_rps: float) -> None:
        """GetShipment as JSON through the http-gateway, against gRPC GetShipment."""
        o = self.options
        result = await run_client(
            "bench.query_client",
            {
                "mode": "http",
                "target": f"http://127.0.0.1:{self.stack.http_port}",
                "shipments": ids,
                "duration_s": o.query_s,
                "concurrency": o.query_concurrency,
            },
            timeout_s=o.query_s + 60,
        )
        errors = result["errors"]
        if errors > max(10, 0.01 * (result["calls"] + errors)) or not result["calls"]:
            raise RuntimeError(f"http query: {errors} failed calls: {result['error_samples']}")
        rps = result["calls"] / result["seconds"]
        p50 = percentile(result["latencies"], 0.5)
        self._row(
            Row(
                "4.http.rps",
                f"GetShipment as JSON via the http-gateway, {o.query_concurrency} in flight",
                rps,
                "requests/s",
                "4.query.rps",
                note=f"aiohttp client, p50 {p50 * 1e3:.1f} ms; gRPC {grpc_rps:,.0f}/s"
                + (f", {errors} failed calls" if errors else ""),
            )
        )

    async def _ghz(
        self, ghz: str, target: str, ids: list[str]
    ) -> tuple[float, float, float, int, str]:
        o = self.options
        token = mint_token(
            DEV_JWT_SECRET, role=Role.OPS, tenant_id=TENANT, subject="bench-ops", ttl_s=3600
        )
        with tempfile.TemporaryDirectory() as tmp:
            protoset = Path(tmp) / "tracking.protoset"
            protoset.write_bytes(_protoset(tracking_pb2.DESCRIPTOR))
            data = Path(tmp) / "data.json"
            data.write_text(json.dumps([{"shipment_id": i} for i in ids]))

            def command(seconds: float) -> list[str]:
                return [
                    ghz,
                    "--insecure",
                    "--protoset",
                    str(protoset),
                    "--call",
                    "cargotrack.v1.TrackingService.GetShipment",
                    "-D",
                    str(data),
                    "--metadata",
                    json.dumps({"authorization": f"Bearer {token}"}),
                    "-c",
                    str(o.query_concurrency),
                    "--connections",
                    str(o.query_connections),
                    "-z",
                    f"{seconds:g}s",
                    "--format",
                    "json",
                    target,
                ]

            # A short warm-up run first (connections, caches), as the Python client does.
            warm, argv = command(1.0), command(o.query_s)
            for run in (warm, argv):
                process = await asyncio.create_subprocess_exec(
                    *run, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
                )
                try:
                    async with asyncio.timeout(o.query_s + 60):
                        out, err = await process.communicate()
                finally:
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                if process.returncode != 0:
                    raise RuntimeError(f"ghz failed: {err.decode(errors='replace')[-500:]}")
        summary = json.loads(out)
        latency = {d["percentage"]: d["latency"] / 1e9 for d in summary["latencyDistribution"]}
        distribution = summary.get("errorDistribution") or {}
        # ghz -z ends by closing its connections under the calls still in flight: at most
        # one per concurrent worker fails with "transport is closing". Not the service's.
        cut = sum(n for message, n in distribution.items() if "transport is closing" in message)
        if cut <= o.query_concurrency:
            distribution = {
                m: n for m, n in distribution.items() if "transport is closing" not in m
            }
        errors = sum(distribution.values())
        ok = summary.get("statusCodeDistribution", {}).get("OK", 0)
        rps = ok / (summary["total"] / 1e9)
        client = "ghz"
        if distribution:
            worst = max(distribution, key=lambda message: distribution[message])
            client += f" (errors: {worst[:120]!r})"
        return rps, latency.get(50, math.nan), latency.get(99, math.nan), errors, client

    # --- 6. rebuild -------------------------------------------------------------------

    async def rebuild(self) -> None:
        topics = (
            self.settings.topics.shipment_events,
            self.settings.topics.delivery_confirmations,
            self.settings.topics.gps_points,
        )
        records = 0
        for topic in topics:
            counter = Offsets(self.settings, topic, self._pool())
            await counter.start()
            try:
                records += sum((await counter.ends()).values())
            finally:
                await counter.stop()
        points = int(await self._pool().fetchval("SELECT count(*) FROM vehicle_positions") or 0)
        log_path = self.stack.run_dir / "rebuild.log"
        argv = [sys.executable, "-c", "from services.cli import main; main()", "rebuild"]
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *argv, env=self.stack.env(), stdout=log, stderr=subprocess.STDOUT
            )
            profile: asyncio.Task[None] | None = None
            if self.options.profile_dir is not None:
                profile = asyncio.create_task(
                    profiling.record(
                        process.pid, self.options.profile_dir / "rebuild", duration_s=20.0
                    )
                )
            try:
                async with asyncio.timeout(1800):
                    code = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            if profile is not None:
                profile.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await profile
        output = log_path.read_text(errors="replace")
        if code != 0:
            raise RuntimeError(f"rebuild failed ({code}); see {log_path}")
        line = next((x for x in output.splitlines() if x.startswith("rebuilt ")), "")
        # "rebuilt <schema> from N records in S s (R records/s)"
        words = line.split()
        seconds = float(words[words.index("in") + 1].rstrip("s"))
        self._row(
            Row(
                "6.rebuild",
                "rebuild: replay every topic into a fresh schema and switch",
                points / seconds,
                "points/s",
                "1.replay",
                note=f"{records:,} records ({records / seconds:,.0f} events/s), "
                f"{points:,} points in {seconds:.1f}s",
            )
        )

    # --- memory -----------------------------------------------------------------------

    def memory(self) -> None:
        for name in self.stack.services:
            phases: tuple[str, ...]
            if name == "gps-ingest-only":
                phases = ("ingest",)
                slope_phase = "ingest"
            else:
                phases = ("e2e", "latency")
                slope_phase = "e2e"
            peak = self.rss.peak(name, phases) / 1e6
            slope = self.rss.slope_mb_per_min(name, slope_phase)
            first, last = self.rss.phase_window(name, slope_phase)
            span_min = self._phase_minutes(name, slope_phase)
            growth = slope * span_min
            grows = growth > max(0.05 * first, 5.0)
            samples = [(t, rss) for t, rss, ph in self.rss.samples.get(name, []) if ph in phases]
            t0 = samples[0][0] if samples else 0.0
            self.report.memory.append(
                {
                    # (seconds, MB) every ~10 s, for plotting a soak
                    "series": [(round(t - t0), round(rss / 1e6)) for t, rss in samples[::10]],
                    "service": name,
                    "peak_mb": peak,
                    "slope_mb_per_min": slope,
                    "first_mb": first,
                    "last_mb": last,
                    "phase": slope_phase,
                    "verdict": (
                        f"yes (+{growth:.0f} MB over {span_min:.1f} min)"
                        if grows
                        else f"flat ({last - first:+.0f} MB, {span_min:.1f} min of {slope_phase})"
                    ),
                }
            )

    def _phase_minutes(self, name: str, phase: str) -> float:
        points = [t for t, _, ph in self.rss.samples.get(name, []) if ph == phase]
        points = points[int(len(points) * 0.25) :]
        return (points[-1] - points[0]) / 60 if len(points) > 1 else 0.0


def _protoset(file: Any) -> bytes:
    """A FileDescriptorSet of `file` and everything it imports (for ghz --protoset)."""
    found = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(descriptor: Any) -> None:
        if descriptor.name in seen:
            return
        for dependency in descriptor.dependencies:
            add(dependency)
        seen.add(descriptor.name)
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)
        found.file.append(proto)

    add(file)
    return found.SerializeToString()


def _loadavg1() -> float:
    import os

    return os.getloadavg()[0]


def _check_client(phase: str, result: dict[str, Any]) -> None:
    if result.get("errors"):
        raise RuntimeError(
            f"{phase}: {result['errors']} failed batches, e.g. {result['error_samples']}"
        )
    if not result.get("points"):
        raise RuntimeError(f"{phase}: no point was acknowledged")
    if result.get("exhausted"):
        print(
            f"bench: {phase}: a vehicle used up its event-time window; the client stopped early",
            file=sys.stderr,
        )


async def _warm_up(producer: Any, topic: str) -> None:
    """One record to every partition (leaders elected, connections open) before timing."""
    for attempt in range(50):
        try:
            async with asyncio.timeout(10):
                futures = [
                    await producer.send(topic, b"warm-up", partition=p) for p in range(PARTITIONS)
                ]
                await asyncio.gather(*futures)
            return
        except (KafkaError, TimeoutError):
            if attempt == 49:
                raise
            await asyncio.sleep(0.2)


async def _consume_all(options: dict[str, object], topic: str, count: int) -> float:
    """Seconds to read `count` records of `topic` from the beginning."""
    consumer = AIOKafkaConsumer(
        **options, group_id=None, max_partition_fetch_bytes=4 << 20, fetch_max_bytes=64 << 20
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        for tp in partitions:
            await consumer.position(tp)
        seen = 0
        t0 = time.perf_counter()
        async with asyncio.timeout(300):
            while seen < count:
                batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
                seen += sum(len(r) for r in batches.values())
        return time.perf_counter() - t0
    finally:
        await consumer.stop()


def _commit_latencies(
    received: dict[int, list[tuple[int, float]]],
    observed: dict[int, list[tuple[int, float]]],
) -> list[float]:
    """Per record: first time its partition's stored offset reached it, minus its receipt."""
    latencies = []
    for partition, records in received.items():
        seen = observed.get(partition, [])
        offsets = [offset for offset, _ in seen]
        for offset, at in records:
            i = bisect.bisect_left(offsets, offset)
            if i < len(seen):
                latencies.append(seen[i][1] - at)
    return latencies


def _hit_share(before: dict[str, float], after: dict[str, float]) -> str:
    """The response cache's outcomes between two counts, as a note (empty if unknown)."""
    delta = {outcome: after.get(outcome, 0.0) - before.get(outcome, 0.0) for outcome in after}
    total = sum(delta.values())
    if total <= 0:
        return ""
    share = ", ".join(
        f"{outcome} {delta.get(outcome, 0.0) / total:.1%}" for outcome in ("hit", "miss", "bypass")
    )
    return f"response cache over the phase's {total:,.0f} calls (warm-up included): {share}"
