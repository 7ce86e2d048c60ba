"""Prometheus metrics scraped over HTTP from running services, after real traffic.

Each test starts a service in-process with the production wiring (CARGOTRACK_METRICS_PORT
set to a free port), sends traffic, fetches `/metrics` as Prometheus would, and checks
the named series. Counters are process-wide and other tests run services in the same
process, so label-less counters are compared before and after; series labelled with
the test's own topics are compared absolutely.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.projector.app import ProjectorServer
from services.projector.freshness import ReceiptAges
from services.projector.live import LiveTracker
from services.projector.projection import TrackingProjection
from shared.auth import Role
from shared.config import Settings
from shared.db import Connection, create_pool
from shared.envelopes import timestamp, utc_now
from shared.metrics import MetricsServer
from shared.pb import envelope_pb2, gps_pb2, gps_pb2_grpc, shipment_pb2, shipment_pb2_grpc
from shared.projection import Delivered, Projection, ProjectionRunner, wait_caught_up
from tests.ingest_helpers import (
    bearer,
    gps_batch,
    running_service,
    service_settings,
    shipment_event,
)
from tests.projection_helpers import (
    T0,
    WrappedProjection,
    end_offsets,
    gps_envelope,
    in_process_server_settings,
    lifecycle,
    prepare,
    producer_for,
    projector_settings,
    send_all,
)

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample by name, with its labels."""

    samples: list[tuple[str, dict[str, str], float]]
    #: Every metric the scrape declares (HELP/TYPE), with or without samples.
    families: frozenset[str] = frozenset()

    def declares(self, name: str) -> bool:
        """Whether the sample name `name` belongs to a metric of this scrape."""
        if any(sample == name for sample, _, _ in self.samples):
            return True
        suffixes = ("_total", "_count", "_sum", "_bucket", "_created")
        return name in self.families or any(
            name.endswith(suffix) and name.removesuffix(suffix) in self.families
            for suffix in suffixes
        )

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples `name` whose labels include `labels` (0 when none has
        them). The metric itself must be declared in the scrape: a renamed or removed
        metric fails here instead of reading as 0."""
        assert self.declares(name), f"no metric {name} in the scrape"
        return self.total(name, labels)

    def total(self, name: str, labels: Mapping[str, str]) -> float:
        """Sum of the samples `name` whose labels include `labels`; 0 when none."""
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and labels.items() <= sample_labels.items()
        )

    def series(self, name: str) -> list[dict[str, str]]:
        return [labels for sample, labels, _ in self.samples if sample == name]


def _fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
        return body.decode()


async def scrape(port: int) -> Scrape:
    text = await asyncio.to_thread(_fetch, port)
    families = list(text_string_to_metric_families(text))
    return Scrape(
        [
            (sample.name, dict(sample.labels), sample.value)
            for family in families
            for sample in family.samples
        ],
        frozenset(family.name for family in families),
    )


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    # Before the traffic a labelled metric may have no series yet; after, it must.
    return after.value(name, **labels) - before.total(name, labels)


async def assert_closed(port: int) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        await asyncio.to_thread(_fetch, port)


GPS = "cargotrack.v1.GpsIngestService"
EVENTS = "cargotrack.v1.ShipmentEventsService"


# --- ingest -----------------------------------------------------------------------------


async def test_gps_ingest_counts_points_batches_calls_and_produce_latency(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    port = free_port()
    settings = service_settings(kafka_bootstrap, topic_prefix, CARGOTRACK_METRICS_PORT=port)
    async with running_service("gps-ingest", settings) as service:
        before = await scrape(port)
        stub = gps_pb2_grpc.GpsIngestServiceStub(service.channel)
        partial = gps_batch("veh-1", 6, points=4)
        partial.points[1].latitude = 123.0  # one point out of range: 3 of 4 stored
        batches = [
            *(gps_batch("veh-1", sequence, points=5) for sequence in range(1, 6)),
            partial,
            gps_pb2.GpsBatch(vehicle_id="veh-1", device_id="device-veh-1", sequence=7),  # no points
        ]
        call = stub.StreamPoints(
            iter(gps_pb2.StreamPointsRequest(batch=b) for b in batches),
            metadata=bearer(Role.DRIVER, vehicle_id="veh-1"),
            timeout=30,
        )
        answers = [answer async for answer in call]
        assert [a.outcome for a in answers] == [gps_pb2.BATCH_OUTCOME_ACCEPTED] * 5 + [
            gps_pb2.BATCH_OUTCOME_PARTIALLY_ACCEPTED,
            gps_pb2.BATCH_OUTCOME_REJECTED,
        ]
        # A call without a token: refused by the auth interceptor, counted all the same.
        refused = stub.StreamPoints(iter([gps_pb2.StreamPointsRequest(batch=batches[0])]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [answer async for answer in refused]
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        after = await scrape(port)

    points_sent_and_valid = 5 * 5 + 3
    assert delta(before, after, "cargotrack_gps_points_ingested_total") == points_sent_and_valid
    assert delta(before, after, "cargotrack_gps_points_rejected_total") == 1
    for outcome, count in (("accepted", 5), ("partially_accepted", 1), ("rejected", 1)):
        assert delta(before, after, "cargotrack_gps_batches_total", outcome=outcome) == count
    assert delta(before, after, "cargotrack_gps_batch_points_count") == 7
    assert delta(before, after, "cargotrack_gps_batch_points_sum") == 5 * 5 + 4

    # gRPC calls by method and status code, with their latency.
    stream = {"service": GPS, "method": "StreamPoints"}
    assert delta(before, after, "cargotrack_grpc_server_handled_total", **stream, code="OK") == 1
    assert (
        delta(
            before, after, "cargotrack_grpc_server_handled_total", **stream, code="UNAUTHENTICATED"
        )
        == 1
    )
    assert delta(before, after, "cargotrack_grpc_server_handling_seconds_count", **stream) == 2
    assert after.value("cargotrack_grpc_server_in_flight", **stream) == 0
    # Health probes are calls too (the test's Watch ended when it saw SERVING).
    health = {"service": "grpc.health.v1.Health", "method": "Watch", "code": "CANCELLED"}
    assert after.value("cargotrack_grpc_server_handled_total", **health) >= 1

    # Kafka writes of this test's topic: 6 records acknowledged (the rejected batch is not
    # written), in at least one timed write, and no failure.
    topic = {"topic": settings.topics.gps_points}
    assert after.value("cargotrack_kafka_produced_records_total", **topic) == 6
    writes = after.value("cargotrack_kafka_produce_seconds_count", **topic)
    assert 1 <= writes <= 6
    assert 0 < after.value("cargotrack_kafka_produce_seconds_sum", **topic) < 30
    assert after.value("cargotrack_kafka_produce_failures_total", **topic) == 0

    # The process collectors come with prometheus_client: RSS of a live Python process.
    assert after.value("process_resident_memory_bytes") > 10_000_000
    assert after.series("cargotrack_service_info")
    # No _created companion series: they would double the series count.
    assert not after.series("cargotrack_gps_points_ingested_created")

    # The metrics server stopped with the service.
    await assert_closed(port)


async def test_request_counts_by_method_and_code(kafka_bootstrap: str, topic_prefix: str) -> None:
    port = free_port()
    settings = service_settings(kafka_bootstrap, topic_prefix, CARGOTRACK_METRICS_PORT=port)
    async with running_service("shipment-events", settings) as service:
        before = await scrape(port)
        stub = shipment_pb2_grpc.ShipmentEventsServiceStub(service.channel)
        shipper = bearer(Role.SHIPPER)
        for n in range(3):
            await stub.RecordEvent(
                shipment_pb2.RecordEventRequest(event=shipment_event(f"shp-{n}")),
                metadata=shipper,
                timeout=10,
            )
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.RecordEvent(
                    shipment_pb2.RecordEventRequest(event=shipment_event("")),
                    metadata=shipper,
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await stub.RecordEvents(
            shipment_pb2.RecordEventsRequest(events=[shipment_event("shp-9")]),
            metadata=shipper,
            timeout=10,
        )
        after = await scrape(port)

    def handled(method: str, code: str) -> float:
        return delta(
            before,
            after,
            "cargotrack_grpc_server_handled_total",
            service=EVENTS,
            method=method,
            code=code,
        )

    assert handled("RecordEvent", "OK") == 3
    assert handled("RecordEvent", "INVALID_ARGUMENT") == 2
    assert handled("RecordEvents", "OK") == 1
    assert handled("RecordEvents", "INVALID_ARGUMENT") == 0
    latency = {"service": EVENTS, "method": "RecordEvent"}
    assert delta(before, after, "cargotrack_grpc_server_handling_seconds_count", **latency) == 5
    # Every sample's labels are from the small, fixed set: never an id.
    allowed = {"service", "method", "code", "topic", "partition", "outcome", "kind", "horizon"}
    allowed |= {"source", "role", "certificate"}
    allowed |= {"version", "implementation", "major", "minor", "patchlevel", "generation", "le"}
    for name, labels, _ in after.samples:
        # Tenants are few: only the ETA-error histogram is per tenant (docs/operations.md).
        per_tenant = {"tenant"} if name.startswith("cargotrack_eta_error_seconds") else set()
        assert set(labels) <= allowed | per_tenant, (name, labels)
        assert "shp-" not in "".join(labels.values()), (name, labels)
    topic = {"topic": settings.topics.shipment_events}
    assert after.value("cargotrack_kafka_produced_records_total", **topic) == 4
    await assert_closed(port)


# --- projector --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def projector_with_metrics(
    settings: Settings, projection: Projection | None = None, *, max_records: int = 7
) -> AsyncIterator[tuple[ProjectionRunner, int]]:
    """The projection runner, as the projector runs it, and a metrics server next to it."""
    server = MetricsServer(0, "127.0.0.1")
    port = server.start()
    pool = await create_pool(settings.database)
    try:
        async with producer_for(settings) as producer:
            runner = ProjectionRunner(
                projection or TrackingProjection(settings.topics, LiveTracker(settings.alerts)),
                pool,
                settings.kafka,
                settings.topics.dead_letters,
                producer,
                topic_prefix=settings.topics.prefix,
                max_records=max_records,
            )
            task = asyncio.create_task(runner.run())
            try:
                yield runner, port
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await pool.close()
        await server.stop()


async def wait_for(
    port: int, condition: Callable[[Scrape], object], timeout_s: float = 30.0
) -> Scrape:
    """Scrape until condition(scrape) holds (the lag is refreshed after each poll)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        found = await scrape(port)
        if condition(found):
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s:g}s")
        await asyncio.sleep(0.1)


def lag_by_partition(found: Scrape, topics: Mapping[str, int]) -> dict[tuple[str, str], float]:
    return {
        (labels["topic"], labels["partition"]): found.value(
            "cargotrack_projector_consumer_lag", **labels
        )
        for labels in found.series("cargotrack_projector_consumer_lag")
        if labels["topic"] in topics
    }


async def test_projector_counts_records_and_its_lag_reaches_zero(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    topics = settings.topics
    log = []
    for n in range(4):
        log += lifecycle("acme", f"s{n}", "v0", T0 + timedelta(minutes=n))  # 16 events
    for sequence in range(1, 4):
        points = [
            (T0 + timedelta(minutes=10 * sequence, seconds=30 * i), 53.40, -2.99 + 0.001 * i)
            for i in range(5)
        ]
        log.append(gps_envelope("acme", "v0", "phone", sequence, points))  # 3 GPS records
    async with producer_for(settings) as producer:
        await send_all(producer, settings, log)
        await producer.send_and_wait(topics.shipment_events, b"\xff\x00garbage", key=b"s1")

    before = await scrape_registry()  # before the runner starts
    async with projector_with_metrics(settings) as (runner, port):
        ends = await end_offsets(settings, runner.projection.topics)
        await wait_caught_up(runner.pool, runner.projection.name, ends, timeout_s=60)
        partitions = {str(tp.partition) for tp in ends}
        owned = {topic: len(partitions) for topic in runner.projection.topics}

        def all_partitions_at_zero(found: Scrape) -> bool:
            lags = lag_by_partition(found, owned)
            return len(lags) == sum(owned.values()) and not any(lags.values())

        after = await wait_for(port, all_partitions_at_zero)

    applied = "cargotrack_projector_records_applied_total"
    assert after.value(applied, topic=topics.shipment_events) == 16
    assert after.value(applied, topic=topics.gps_points) == 3
    assert after.value(applied, topic=topics.delivery_confirmations) == 0
    assert after.value("cargotrack_projector_dead_letters_total", topic=topics.shipment_events) == 1
    assert after.value("cargotrack_kafka_produced_records_total", topic=topics.dead_letters) == 1
    batches = delta(before, after, "cargotrack_projector_batches_total")
    assert batches >= 3  # 20 records, at most 7 per batch
    for histogram in ("batch_seconds", "fold_seconds", "commit_seconds", "batch_records"):
        assert delta(before, after, f"cargotrack_projector_{histogram}_count") == batches
    assert delta(before, after, "cargotrack_projector_batch_records_sum") == 19
    assert delta(before, after, "cargotrack_projector_offset_conflicts_total") == 0
    # Lag is per partition and topic, and it is 0 everywhere once caught up.
    assert set(lag_by_partition(after, owned)) == {
        (topic, partition) for topic in owned for partition in partitions
    }
    # A stopped runner drops its partitions' lag: nothing stale stays behind.
    assert all(
        labels["topic"] not in owned
        for labels in (await scrape_registry()).series("cargotrack_projector_consumer_lag")
    )


async def scrape_registry() -> Scrape:
    """The default registry, read in-process (the test's metrics server is stopped)."""
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    return Scrape(
        [
            (sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
    )


class GatedProjection(WrappedProjection):
    """The tracking projection, holding its second batch until `gate` is set."""

    def __init__(self, inner: TrackingProjection) -> None:
        super().__init__(inner)
        self.calls = 0
        self.gate = asyncio.Event()
        self.holding = asyncio.Event()

    async def apply(self, connection: Connection, records: Sequence[Delivered]) -> None:
        self.calls += 1
        if self.calls == 2:
            self.holding.set()
            await self.gate.wait()
        await self.inner.apply(connection, records)


async def test_lag_counts_records_fetched_but_not_applied(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    async with producer_for(settings) as producer:
        await send_all(producer, settings, lifecycle("acme", "s1", "v1", T0))  # 4, one partition
    projection = GatedProjection(TrackingProjection(settings.topics, LiveTracker(settings.alerts)))
    async with projector_with_metrics(settings, projection, max_records=1) as (runner, port):
        ends = await end_offsets(settings, runner.projection.topics)
        events = settings.topics.shipment_events
        ((partition, end),) = [
            (tp.partition, end) for tp, end in ends.items() if tp.topic == events and end
        ]
        assert end == 4
        series = {"topic": events, "partition": str(partition)}
        await asyncio.wait_for(projection.holding.wait(), 30)
        # One record applied, the second held in its transaction: 3 to go.
        found = await scrape(port)
        assert found.value("cargotrack_projector_consumer_lag", **series) == 3
        projection.gate.set()
        await wait_caught_up(runner.pool, projection.name, ends, timeout_s=60)

        def caught_up(found: Scrape) -> bool:
            return bool(found.series("cargotrack_projector_consumer_lag")) and not found.value(
                "cargotrack_projector_consumer_lag", **series
            )

        await wait_for(port, caught_up)


# --- freshness: receipt to visible (#16) ------------------------------------------------

GPS_FRESHNESS = "cargotrack_projector_gps_freshness_seconds"


async def test_the_projector_observes_each_gps_batch_age_from_receipt_to_commit(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """The production wiring: gps-ingest stamps each batch it accepts (recorded_at), the
    projector (ProjectorServer) observes its age once the transaction that applied it
    committed. Each age lies between 0 and the wall-clock time from before the first
    batch was sent until the metric held them all. The points were taken an hour ago
    (an app that was offline): their device time must not count, only the receipt."""
    port = free_port()
    settings = in_process_server_settings(
        kafka_bootstrap, database_url, topic_prefix, pg_schema, CARGOTRACK_METRICS_PORT=str(port)
    )
    an_hour_ago = utc_now() - timedelta(hours=1)
    batches = [
        gps_batch("veh-fresh", sequence, points=5, start=an_hour_ago + timedelta(minutes=sequence))
        for sequence in range(1, 5)
    ]
    async with (
        ProjectorServer(settings) as projector,
        running_service("gps-ingest", service_settings(kafka_bootstrap, topic_prefix)) as ingest,
    ):
        await asyncio.wait_for(projector.runner.assigned.wait(), 60)
        before = await scrape(port)
        started = time.time()
        stub = gps_pb2_grpc.GpsIngestServiceStub(ingest.channel)
        call = stub.StreamPoints(
            iter(gps_pb2.StreamPointsRequest(batch=b) for b in batches),
            metadata=bearer(Role.DRIVER, vehicle_id="veh-fresh"),
            timeout=30,
        )
        answers = [answer async for answer in call]
        assert [a.outcome for a in answers] == [gps_pb2.BATCH_OUTCOME_ACCEPTED] * 4
        found = await wait_for(
            port, lambda found: delta(before, found, f"{GPS_FRESHNESS}_count") >= len(batches)
        )
        bound = time.time() - started
        ends = await end_offsets(settings, [settings.topics.gps_points])
        await wait_caught_up(projector.pool, projector.runner.projection.name, ends)
        after = await scrape(port)

    # Once per GPS record (a batch), not per point, and nothing more once caught up.
    assert delta(before, found, f"{GPS_FRESHNESS}_count") == len(batches)
    assert delta(before, after, f"{GPS_FRESHNESS}_count") == len(batches)
    total = delta(before, after, f"{GPS_FRESHNESS}_sum")
    assert 0 < total <= len(batches) * bound, (total, bound)
    # Every age within the bound: all in the first bucket whose bound is at least it.
    le = min(
        (
            labels["le"]
            for labels in after.series(f"{GPS_FRESHNESS}_bucket")
            if labels["le"] != "+Inf" and float(labels["le"]) >= bound
        ),
        key=float,
    )
    assert delta(before, after, f"{GPS_FRESHNESS}_bucket", le=le) == len(batches), (le, bound)


class ConflictedProjection(WrappedProjection):
    """The tracking projection, whose first batch with GPS records is rolled back: while
    that transaction is open, "another instance" stores offsets past its records, so
    the runner's fenced offset update fails (OffsetConflict) and it re-seeks past them."""

    def __init__(self, inner: TrackingProjection) -> None:
        super().__init__(inner)
        self.pool: Any = None  # the runner's, set once it exists
        self.rolled_back: list[Delivered] = []

    async def apply(self, connection: Connection, records: Sequence[Delivered]) -> None:
        await self.inner.apply(connection, records)
        if self.rolled_back or not any(r.envelope.HasField("gps_batch") for r in records):
            return
        self.rolled_back = list(records)
        last = {(r.topic, r.partition): r.offset for r in records}  # records in log order
        async with self.pool.acquire() as other:
            await other.executemany(
                "INSERT INTO projection_offsets (projection, topic, partition, last_offset)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (projection, topic, partition)"
                " DO UPDATE SET last_offset = EXCLUDED.last_offset",
                [(self.name, topic, part, offset) for (topic, part), offset in last.items()],
            )


async def test_gps_batches_of_a_rolled_back_transaction_are_not_observed(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    projection = ConflictedProjection(
        TrackingProjection(settings.topics, LiveTracker(settings.alerts), freshness=ReceiptAges())
    )

    def gps(sequence: int) -> envelope_pb2.Envelope:
        at = T0 + timedelta(minutes=sequence)
        envelope = gps_envelope("acme", "v-rb", "phone", sequence, [(at, 53.4, -2.99)])
        envelope.recorded_at.CopyFrom(timestamp(utc_now()))  # received now
        return envelope

    before = await scrape_registry()
    async with projector_with_metrics(settings, projection) as (runner, port):
        projection.pool = runner.pool
        # Three records, the first batch of which rolls back; then three more.
        async with producer_for(settings) as producer:
            await send_all(producer, settings, [gps(n) for n in (1, 2, 3)])
            async with asyncio.timeout(60):
                while not runner.stats.conflicts:  # noqa: ASYNC110 - the runner's own count
                    await asyncio.sleep(0.05)
            ends = await end_offsets(settings, runner.projection.topics)
            await wait_caught_up(runner.pool, runner.projection.name, ends, timeout_s=60)
            await send_all(producer, settings, [gps(n) for n in (4, 5, 6)])
        ends = await end_offsets(settings, runner.projection.topics)
        await wait_caught_up(runner.pool, runner.projection.name, ends, timeout_s=60)
        assert runner.stats.conflicts == 1
        rolled_back = len(projection.rolled_back)
        assert 1 <= rolled_back <= 3
        committed = 6 - rolled_back
        # Observed right after each commit: wait for the last one, then check none more.
        await wait_for(
            port, lambda found: delta(before, found, f"{GPS_FRESHNESS}_count") >= committed
        )
        after = await scrape(port)
    assert delta(before, after, f"{GPS_FRESHNESS}_count") == committed
