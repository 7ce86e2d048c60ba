"""Delay alerts end to end: GPS on Kafka → projection → outbox → alerts topic → dispatch.

Everything runs in-process against the session's real Kafka and PostgreSQL: the
tracking projection (runner + live tracker), the outbox relay and the dispatch
service, read through a real gRPC stream. GPS arrives as Kafka envelopes, as the
ingest service would write them. Waiting is on caught-up offsets, on published
outbox rows and on stream messages, each with a timeout; never on the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import grpc
import pytest
from aiokafka import AIOKafkaProducer

from devtools.devstack import KafkaBroker
from services.dispatch.app import DispatchServer
from services.projector.live import LiveTracker
from services.projector.outbox import OutboxRelay
from services.projector.projection import TrackingProjection
from services.projector.stale import StaleScanner
from shared.config import Settings
from shared.db import create_pool
from shared.domain.polyline import encode as encode_polyline
from shared.envelopes import timestamp, utc_now
from shared.kafka import KafkaUnavailable
from shared.pb import alerts_pb2, common_pb2, dispatch_pb2, envelope_pb2, shipment_pb2
from shared.projection import ProjectionRunner, wait_caught_up
from tests.ingest_helpers import consume_envelopes, wait_health
from tests.integration.test_dispatch import (
    alert_envelope,
    dispatcher,
    publish,
    subscribe,
)
from tests.projection_helpers import (
    T0,
    end_offsets,
    envelope_for,
    fresh_schema,
    gps_envelope,
    prepare,
    producer_for,
    projector_settings,
    send_all,
)

pytestmark = pytest.mark.timeout(180)

TENANT = "tenant-a"
LAT = 53.40
#: A straight planned route east along LAT, about 20 km; the destination is its end.
ROUTE = [(LAT, -2.99 + 0.03 * i) for i in range(11)]
DESTINATION = ROUTE[-1]
METRES_PER_DEGREE_LON = 111_194.9 * math.cos(math.radians(LAT))
#: GPS starts here; the promised window ends 45 minutes later.
GPS_START = T0 + timedelta(minutes=5)
WINDOW_END = GPS_START + timedelta(minutes=45)
#: Small margins, so that a simulated trip of 20 minutes crosses them.
MARGINS = {"CARGOTRACK_LATE_MARGIN_MIN": "5", "CARGOTRACK_AT_RISK_MARGIN_MIN": "2"}


def shipment_log(
    shipment_id: str, vehicle_id: str, *, tenant: str = TENANT, start: datetime = T0
) -> list[envelope_pb2.Envelope]:
    """created (with window and route) → assigned → picked up → in transit."""
    created = shipment_pb2.ShipmentCreated(
        customer_id="cust-1",
        origin=common_pb2.LatLng(latitude=ROUTE[0][0], longitude=ROUTE[0][1]),
        destination=common_pb2.LatLng(latitude=DESTINATION[0], longitude=DESTINATION[1]),
        planned_route=encode_polyline(ROUTE),
        reference=f"ref-{shipment_id}",
    )
    created.promised_window.start.CopyFrom(timestamp(start))
    created.promised_window.end.CopyFrom(timestamp(start + (WINDOW_END - T0)))
    steps = [
        shipment_pb2.ShipmentEvent(created=created),
        shipment_pb2.ShipmentEvent(
            vehicle_assigned=shipment_pb2.VehicleAssigned(vehicle_id=vehicle_id, driver_id="d1")
        ),
        shipment_pb2.ShipmentEvent(picked_up=shipment_pb2.PickedUp()),
        shipment_pb2.ShipmentEvent(in_transit=shipment_pb2.InTransit()),
    ]
    envelopes = []
    for i, event in enumerate(steps):
        at = start + timedelta(minutes=i)
        event.event_id = f"{shipment_id}-e{i}"
        event.shipment_id = shipment_id
        event.occurred_at.CopyFrom(timestamp(at))
        envelopes.append(envelope_for(tenant, event.event_id, at, shipment_event=event))
    return envelopes


def late_then_catching_up(vehicle_id: str, device: str = "phone-1") -> list[envelope_pb2.Envelope]:
    """20 GPS batches of one minute each, on the route: 10 minutes at 3 m/s (the ETA
    ends far past the window: LATE), then 10 minutes at 25 m/s (back on time)."""
    points: list[tuple[datetime, float, float]] = []
    x = 0.0
    for i in range(81):
        if i:
            x += (3.0 if i <= 40 else 25.0) * 15
        points.append(
            (GPS_START + timedelta(seconds=15 * i), LAT, -2.99 + x / METRES_PER_DEGREE_LON)
        )
    batches = [points[0:5]] + [points[4 * k + 1 : 4 * k + 5] for k in range(1, 20)]
    return [gps_envelope(TENANT, vehicle_id, device, k + 1, b) for k, b in enumerate(batches)]


@dataclass
class Pipeline:
    settings: Settings
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    runner: ProjectionRunner
    relay: OutboxRelay
    dispatch: DispatchServer
    channel: grpc.aio.Channel

    async def caught_up(self) -> None:
        """The projection has applied everything written to its topics so far."""
        offsets = await end_offsets(self.settings, self.runner.projection.topics)
        await wait_caught_up(self.pool, self.runner.projection.name, offsets, timeout_s=60)

    async def published(self, timeout_s: float = 30.0) -> None:
        """Every alert decided so far is on the alerts topic (the relay marked it)."""
        async with asyncio.timeout(timeout_s):
            while True:
                unpublished = await self.pool.fetchval(
                    "SELECT count(*) FROM alert_outbox WHERE published_at IS NULL"
                )
                if not unpublished:
                    return
                await asyncio.sleep(0.05)  # polls a condition, as wait_caught_up does

    async def feed(self, envelopes: list[envelope_pb2.Envelope]) -> None:
        """Write records one at a time, each applied before the next (as live traffic)."""
        for envelope in envelopes:
            await send_all(self.producer, self.settings, [envelope])
            await self.caught_up()

    async def outbox(self) -> list[tuple[str, int]]:
        rows = await self.pool.fetch("SELECT alert_id, payload FROM alert_outbox ORDER BY id")
        return [(r["alert_id"], alerts_pb2.Alert.FromString(r["payload"]).kind) for r in rows]


@contextlib.asynccontextmanager
async def projection_only(
    settings: Settings, group: str, tracker: LiveTracker | None = None
) -> AsyncIterator[ProjectionRunner]:
    """A projection runner (own consumer group) into settings' schema."""
    pool = await create_pool(settings.database)
    async with producer_for(settings) as producer:
        runner = ProjectionRunner(
            TrackingProjection(settings.topics, tracker or LiveTracker(settings.alerts)),
            pool,
            settings.kafka,
            settings.topics.dead_letters,
            producer,
            group_id=f"{settings.topics.prefix}{group}",
        )
        task = asyncio.create_task(runner.run())
        try:
            yield runner
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pool.close()


@contextlib.asynccontextmanager
async def pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    """Projection, outbox relay and dispatch, running until the block exits."""
    async with projection_only(settings, "projector") as runner, producer_for(settings) as producer:
        relay = OutboxRelay(settings, runner.pool, producer, idle_s=0.05)
        relay_task = asyncio.create_task(relay.run())
        try:
            async with (
                DispatchServer(settings, readiness_interval_s=0.2) as dispatch,
                grpc.aio.insecure_channel(f"127.0.0.1:{dispatch.port}") as channel,
            ):
                await wait_health(channel)
                yield Pipeline(settings, runner.pool, producer, runner, relay, dispatch, channel)
        finally:
            relay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay_task


def settings_for(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, schema: str, **extra: str
) -> Settings:
    return projector_settings(
        kafka_bootstrap,
        database_url,
        topic_prefix,
        schema,
        CARGOTRACK_SHUTDOWN_GRACE_S="1",
        **MARGINS,
        **extra,
    )


async def test_a_late_vehicle_alerts_once_late_once_recovered_resumes_and_replays(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = settings_for(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    gps = late_then_catching_up("veh-1")
    slow_part, fast_part = gps[:10], gps[10:]
    async with pipeline(settings) as p:
        subscriber = subscribe(p.channel, dispatcher())
        assert await subscriber.subscribed() == "live"
        await p.feed(shipment_log("shp-1", "veh-1"))
        await p.feed(slow_part)
        # Ten batches behind schedule: one LATE, however many batches confirmed it.
        late = await subscriber.next()
        assert late.alert.kind == alerts_pb2.ALERT_KIND_LATE
        assert late.alert.shipment_id == "shp-1"
        assert late.alert.severity == alerts_pb2.SEVERITY_CRITICAL
        assert late.alert.expected_delay.ToTimedelta() > timedelta(minutes=5)
        assert late.alert.HasField("last_location")
        # The dispatcher disconnects, having acknowledged the LATE alert.
        subscriber.cancel()
        await p.feed(fast_part)
        await p.published()
        # A marker on the same shipment key (so the same partition), written after
        # everything the relay published: reading up to it shows all before it.
        [marker] = await publish(
            p.producer, settings, [alert_envelope("shp-1", alerts_pb2.ALERT_KIND_OFF_ROUTE)]
        )
        outbox = await p.outbox()
        assert [kind for _, kind in outbox] == [
            alerts_pb2.ALERT_KIND_LATE,
            alerts_pb2.ALERT_KIND_RECOVERED,
        ]
        (late_id, _), (recovered_id, _) = outbox
        assert late.alert.alert_id == late_id

        # Resuming with the last token: the rest, nothing it acknowledged, nothing missed.
        resumed = subscribe(p.channel, dispatcher(), resume_token=late.resume_token)
        assert await resumed.read_until(marker) == [recovered_id, marker]
        recovered = resumed.received[0].alert
        assert recovered.severity == alerts_pb2.SEVERITY_INFO
        assert recovered.expected_delay.ToTimedelta() == timedelta(0)
        # The whole retained history: exactly one LATE and one RECOVERED.
        history = subscribe(p.channel, dispatcher(), from_beginning=True)
        assert await history.read_until(marker) == [late_id, recovered_id, marker]
        resumed.cancel()
        history.cancel()

    # Replay: a fresh projector (new group, fresh schema) over the same log, which it
    # now reads in a few large batches instead of one record per batch.
    async with fresh_schema(database_url) as schema:
        replay_settings = settings_for(kafka_bootstrap, database_url, topic_prefix, schema)
        await prepare(replay_settings)
        async with projection_only(replay_settings, "replay") as runner:
            offsets = await end_offsets(replay_settings, runner.projection.topics)
            await wait_caught_up(runner.pool, runner.projection.name, offsets, timeout_s=60)
            assert runner.stats.batches < len(gps)
            rows = await runner.pool.fetch("SELECT alert_id FROM alert_outbox ORDER BY id")
    assert [r["alert_id"] for r in rows] == [late_id, recovered_id]


async def test_the_same_log_in_one_batch_or_record_by_record_decides_the_same_alerts(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """Two vehicles, the log written before the projection starts (so consumed in
    large batches) and replayed record by record into another schema."""
    settings = settings_for(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    log = shipment_log("shp-1", "veh-1") + shipment_log("shp-2", "veh-2")
    gps_1 = late_then_catching_up("veh-1")
    gps_2 = late_then_catching_up("veh-2", "phone-2")
    async with producer_for(settings) as producer:
        await send_all(producer, settings, log + gps_1 + gps_2)
    async with projection_only(settings, "bulk") as runner:
        offsets = await end_offsets(settings, runner.projection.topics)
        await wait_caught_up(runner.pool, runner.projection.name, offsets, timeout_s=60)
        bulk = await runner.pool.fetch("SELECT alert_id FROM alert_outbox ORDER BY alert_id")
    assert len(bulk) == 4  # LATE and RECOVERED for each shipment
    async with fresh_schema(database_url) as schema:
        one_by_one = settings_for(kafka_bootstrap, database_url, f"{topic_prefix}x.", schema)
        await prepare(one_by_one)
        async with (
            projection_only(one_by_one, "one-by-one") as runner,
            producer_for(one_by_one) as producer,
        ):
            for envelope in log + [e for pair in zip(gps_1, gps_2, strict=True) for e in pair]:
                await send_all(producer, one_by_one, [envelope])
                offsets = await end_offsets(one_by_one, runner.projection.topics)
                await wait_caught_up(runner.pool, runner.projection.name, offsets, timeout_s=60)
            single = await runner.pool.fetch("SELECT alert_id FROM alert_outbox ORDER BY alert_id")
    assert [r["alert_id"] for r in single] == [r["alert_id"] for r in bulk]


async def test_stale_tracking_alerts_once_per_silence(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = settings_for(
        kafka_bootstrap, database_url, topic_prefix, pg_schema, CARGOTRACK_STALE_AFTER_MIN="10"
    )
    await prepare(settings)
    now = utc_now()
    start = now - timedelta(minutes=40)
    silent_since = now - timedelta(minutes=15)
    moving = [
        (start + timedelta(minutes=5) + timedelta(seconds=30 * i), LAT, -2.99 + 0.001 * i)
        for i in range(40)
    ]
    moving = [point for point in moving if point[0] <= silent_since]
    async with pipeline(settings) as p:
        subscriber = subscribe(
            p.channel,
            dispatcher(),
            filter=dispatch_pb2.AlertFilter(kinds=[alerts_pb2.ALERT_KIND_STALE_TRACKING]),
        )
        await subscriber.subscribed()
        await p.feed(shipment_log("shp-9", "veh-9", start=start))
        # Assigned but not picked up: tracked, silent as long, yet not stale (not moving).
        await p.feed(shipment_log("shp-10", "veh-10", start=start)[:2])
        await p.feed([gps_envelope(TENANT, "veh-10", "phone-10", 1, moving)])
        await p.feed([gps_envelope(TENANT, "veh-9", "phone-9", 1, moving)])
        tracked = await p.pool.fetchval("SELECT count(*) FROM shipment_tracking")
        assert tracked == 2
        scanner = StaleScanner(p.pool, settings.alerts)
        assert await scanner.scan_once() == 1
        assert await scanner.scan_once() == 0  # the same silence: nothing new
        await p.published()
        first = await subscriber.next()
        assert first.alert.kind == alerts_pb2.ALERT_KIND_STALE_TRACKING
        assert first.alert.shipment_id == "shp-9"
        assert first.alert.last_location.longitude == pytest.approx(moving[-1][2])
        # GPS comes back, then goes silent again: a new silence, a new alert.
        back = now - timedelta(minutes=12)
        await p.feed([gps_envelope(TENANT, "veh-9", "phone-9", 2, [(back, LAT, -2.95)])])
        assert await scanner.scan_once() == 1
        await p.published()
        second = await subscriber.next()
        assert second.alert.alert_id != first.alert.alert_id
        # Fresh GPS: not stale.
        await p.feed([gps_envelope(TENANT, "veh-9", "phone-9", 3, [(utc_now(), LAT, -2.94)])])
        assert await scanner.scan_once() == 0
        conditions = await p.pool.fetchval(
            "SELECT conditions->>'stale_since' FROM shipment_tracking WHERE shipment_id = 'shp-9'"
        )
        assert conditions == back.isoformat()
        subscriber.cancel()


async def put_in_outbox(pool: asyncpg.Pool, envelopes: list[envelope_pb2.Envelope]) -> None:
    """The alerts as a projection decides them: unpublished outbox rows of shp-1."""
    await pool.executemany(
        "INSERT INTO alert_outbox (alert_id, tenant_id, shipment_id, payload)"
        " VALUES ($1, $2, $3, $4)",
        [(e.alert.alert_id, TENANT, "shp-1", e.alert.SerializeToString()) for e in envelopes],
    )


async def on_dedicated_broker(
    broker: KafkaBroker, database_url: str, topic_prefix: str, schema: str
) -> Settings:
    """Settings whose Kafka is `broker`, with a 1 s Kafka timeout; schema and topics
    prepared."""
    settings = settings_for(
        broker.bootstrap_servers, database_url, topic_prefix, schema, CARGOTRACK_KAFKA_TIMEOUT_S="1"
    )
    await prepare(settings)
    return settings


async def still_running_until(
    task: asyncio.Task[None], condition: Callable[[], bool], timeout_s: float = 60
) -> None:
    """Wait for `condition()` while `task` goes on running (its end fails the test)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            assert not task.done(), task
            await asyncio.sleep(0.05)


async def test_relays_running_at_once_keep_a_shipments_alerts_in_order(
    kafka_bootstrap: str,
    database_url: str,
    topic_prefix: str,
    pg_schema: str,
    dedicated_broker: KafkaBroker,
) -> None:
    """Two projector instances relay the same outbox. While one is stuck publishing a
    shipment's oldest alert (its broker is stopped: a real producer waiting for an
    acknowledgement that does not come), the other must not publish the later ones
    ahead of it: dispatch promises order per shipment."""
    settings = settings_for(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    kinds = [
        alerts_pb2.ALERT_KIND_LATE,
        alerts_pb2.ALERT_KIND_RECOVERED,
        alerts_pb2.ALERT_KIND_OFF_ROUTE,
    ]
    written = [alert_envelope("shp-1", kind) for kind in kinds]
    pool = await create_pool(settings.database)
    stranded = settings_for(
        dedicated_broker.bootstrap_servers,
        database_url,
        topic_prefix,
        pg_schema,
        CARGOTRACK_KAFKA_TIMEOUT_S="5",
    )
    try:
        await put_in_outbox(pool, written)
        async with producer_for(stranded) as stranded_producer:
            await dedicated_broker.stop()
            stuck = OutboxRelay(stranded, pool, stranded_producer, batch_size=1)
            stuck_task = asyncio.create_task(stuck.publish_pending())
            # It holds the oldest alert now: its row is locked by another session.
            async with asyncio.timeout(30):
                while not await pool.fetchval(  # noqa: ASYNC110 - polls PostgreSQL
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                    " WHERE c.relname = 'alert_outbox' AND l.mode = 'RowShareLock'"
                    " AND l.pid <> pg_backend_pid() AND l.granted"
                ):
                    await asyncio.sleep(0.05)
            async with producer_for(settings) as producer:
                relay = OutboxRelay(settings, pool, producer)
                assert await relay.publish_pending() == 0  # waits its turn, publishes nothing
                assert not stuck_task.done(), "the stuck relay gave up before the check"
                with pytest.raises(KafkaUnavailable):
                    await stuck_task
                assert await relay.publish_pending() == len(written)
            # An idempotent producer retries its batch until a broker takes it: only
            # then can it stop.
            await dedicated_broker.start(keep_data=True)
        history = await consume_envelopes(
            kafka_bootstrap, settings.topics.shipment_alerts, count=len(written)
        )
        assert [c.envelope.alert.kind for c in history] == kinds
    finally:
        await pool.close()


async def test_a_relay_rides_out_a_kafka_outage_then_publishes_every_alert_in_order(
    database_url: str, topic_prefix: str, pg_schema: str, dedicated_broker: KafkaBroker
) -> None:
    """The relay's broker is gone for several of its Kafka timeouts (a leader's failover,
    longer): the relay retries instead of ending, which would restart the projector.
    Once the broker is back every alert is on the topic, a shipment's in the order they
    were decided (a batch sent again can repeat alerts: their ids tell)."""
    settings = await on_dedicated_broker(dedicated_broker, database_url, topic_prefix, pg_schema)
    kinds = [
        alerts_pb2.ALERT_KIND_LATE,
        alerts_pb2.ALERT_KIND_RECOVERED,
        alerts_pb2.ALERT_KIND_OFF_ROUTE,
    ]
    written = [alert_envelope("shp-1", kind) for kind in kinds]
    pool = await create_pool(settings.database)
    try:
        async with producer_for(settings) as producer:
            await dedicated_broker.stop()
            await put_in_outbox(pool, written)
            relay = OutboxRelay(settings, pool, producer, batch_size=2, idle_s=0.05)
            relay_task = asyncio.create_task(relay.run())
            try:
                await still_running_until(relay_task, lambda: relay.retries >= 3)
                assert relay.published == 0
                await dedicated_broker.start(keep_data=True)
                await still_running_until(relay_task, lambda: relay.published == len(written))
            finally:
                if not dedicated_broker.running:  # the producer can stop only then
                    await dedicated_broker.start(keep_data=True)
                relay_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay_task
        unpublished = await pool.fetchval(
            "SELECT count(*) FROM alert_outbox WHERE published_at IS NULL"
        )
        history = await consume_envelopes(
            dedicated_broker.bootstrap_servers,
            settings.topics.shipment_alerts,
            until=lambda got: (
                {c.envelope.event_id for c in got} >= {e.alert.alert_id for e in written}
            ),
        )
    finally:
        await pool.close()
    assert unpublished == 0
    first_seen = list(dict.fromkeys(c.envelope.event_id for c in history))
    assert first_seen == [e.alert.alert_id for e in written]


async def test_a_relay_ends_once_kafka_refused_longer_than_it_waits(
    database_url: str, topic_prefix: str, pg_schema: str, dedicated_broker: KafkaBroker
) -> None:
    """Past `give_up_after_s` of refusals the relay ends with the error (the process
    exits and its orchestrator starts it again, with a new producer)."""
    settings = await on_dedicated_broker(dedicated_broker, database_url, topic_prefix, pg_schema)
    pool = await create_pool(settings.database)
    try:
        await put_in_outbox(pool, [alert_envelope("shp-1", alerts_pb2.ALERT_KIND_LATE)])
        async with producer_for(settings) as producer:
            await dedicated_broker.stop()
            try:
                relay = OutboxRelay(settings, pool, producer, give_up_after_s=2.5)
                with pytest.raises(KafkaUnavailable):
                    await asyncio.wait_for(relay.run(), 60)
                assert relay.retries >= 1
                assert relay.published == 0
            finally:
                # An idempotent producer retries its batch until a broker takes it:
                # only then can it stop.
                await dedicated_broker.start(keep_data=True)
    finally:
        await pool.close()


def late_upload(vehicle_id: str) -> envelope_pb2.Envelope:
    """A second device's batch of veh's minutes 3-6, uploaded late: its fixes fall
    between fixes already in the vehicle's track (7.5 s after each of them)."""
    x0 = 3.0 * 15 * 12  # where the vehicle was at minute 3 (3 m/s)
    points = [
        (
            GPS_START + timedelta(seconds=180 + 15 * i + 7.5),
            LAT,
            -2.99 + (x0 + 3.0 * (15 * i + 7.5)) / METRES_PER_DEGREE_LON,
        )
        for i in range(12)
    ]
    return gps_envelope(TENANT, vehicle_id, "phone-late", 1, points)


async def derived_state(
    settings: Settings, group: str, envelopes: list[envelope_pb2.Envelope]
) -> tuple[list[tuple[object, ...]], LiveTracker]:
    """Apply the log one record per batch; return every row live tracking derived."""
    tracker = LiveTracker(settings.alerts)
    async with (
        projection_only(settings, group, tracker) as runner,
        producer_for(settings) as producer,
    ):
        for envelope in envelopes:
            await send_all(producer, settings, [envelope])
            offsets = await end_offsets(settings, runner.projection.topics)
            await wait_caught_up(runner.pool, runner.projection.name, offsets, timeout_s=60)
        tracking = await runner.pool.fetch(
            "SELECT shipment_id, vehicle_id, position, progress, eta, conditions"
            " FROM shipment_tracking ORDER BY shipment_id"
        )
        etas = await runner.pool.fetch(
            "SELECT shipment_id, position_at, computed_at, estimated_arrival, remaining_m,"
            " method FROM eta_history ORDER BY shipment_id, position_at"
        )
        outbox = await runner.pool.fetch(
            "SELECT alert_id, shipment_id, payload FROM alert_outbox ORDER BY alert_id"
        )
    rows = [tuple(r) for r in tracking] + [tuple(r) for r in etas] + [tuple(r) for r in outbox]
    return rows, tracker


async def test_tracks_kept_in_memory_derive_exactly_what_reading_them_back_derives(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """The projector's in-memory tracks (CARGOTRACK_TRACK_CACHE_FIXES) change nothing:
    record by record, with a late upload that lands inside a cached track, the
    progress, ETAs, ETA history and alerts equal those of a projector that reads
    every track back from PostgreSQL."""
    gps_1 = late_then_catching_up("veh-1")
    gps_2 = late_then_catching_up("veh-2", "phone-2")
    interleaved = [e for pair in zip(gps_1, gps_2, strict=True) for e in pair]
    log = (
        shipment_log("shp-1", "veh-1")
        + shipment_log("shp-2", "veh-2")
        + interleaved[:24]
        + [late_upload("veh-1")]
        + interleaved[24:]
    )
    cached_settings = settings_for(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(cached_settings)
    cached, tracker = await derived_state(cached_settings, "cached", log)
    assert tracker.tracks.hits > len(interleaved) // 2  # the cache was really used
    assert len(tracker.tracks) == 2
    async with fresh_schema(database_url) as schema:
        uncached_settings = settings_for(
            kafka_bootstrap,
            database_url,
            f"{topic_prefix}nc.",
            schema,
            CARGOTRACK_TRACK_CACHE_FIXES="0",
        )
        await prepare(uncached_settings)
        uncached, no_cache = await derived_state(uncached_settings, "uncached", log)
    assert no_cache.tracks.hits == 0
    assert len(no_cache.tracks) == 0
    assert any(row[0] == "shp-1" for row in cached)
    assert len([row for row in cached if len(row) == 3]) == 4  # LATE + RECOVERED each
    assert cached == uncached
