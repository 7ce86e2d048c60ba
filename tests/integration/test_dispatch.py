"""DispatchService.SubscribeDelays against a real Kafka, the server started in-process.

Each test writes alerts straight to its own alerts topic (as the projector's
outbox relay does: an Envelope keyed by shipment id) and reads them through real
gRPC streams. Waiting is on stream messages with timeouts; a test that needs to
know that nothing else arrives writes a sentinel alert last and reads up to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.devstack.ports import free_ports
from devtools.devstack.process import ChildProcess
from devtools.launcher import wait_serving
from services.dispatch import tokens
from services.dispatch.app import SERVICE_NAME, DispatchServer
from services.dispatch.hub import DEFAULT_BUFFER_SIZE
from shared.auth import Role
from shared.config import Settings
from shared.envelopes import encode, timestamp
from shared.pb import alerts_pb2, common_pb2, dispatch_pb2, dispatch_pb2_grpc, envelope_pb2
from shared.rpc import field_violations
from tests.ingest_helpers import Metadata, bearer, service_settings, wait_health
from tests.projection_helpers import T0, producer_for

pytestmark = pytest.mark.timeout(120)

LATE = alerts_pb2.ALERT_KIND_LATE
AT_RISK = alerts_pb2.ALERT_KIND_AT_RISK
RECOVERED = alerts_pb2.ALERT_KIND_RECOVERED
OFF_ROUTE = alerts_pb2.ALERT_KIND_OFF_ROUTE
SEVERITY: dict[alerts_pb2.AlertKind.ValueType, alerts_pb2.Severity.ValueType] = {
    LATE: alerts_pb2.SEVERITY_CRITICAL,
    AT_RISK: alerts_pb2.SEVERITY_WARNING,
    RECOVERED: alerts_pb2.SEVERITY_INFO,
    OFF_ROUTE: alerts_pb2.SEVERITY_WARNING,
}
#: Liverpool city centre, and a point well outside the test region around it.
INSIDE = (53.405, -2.985)
OUTSIDE = (53.48, -2.24)
REGION = [(53.38, -3.02), (53.38, -2.95), (53.43, -2.95), (53.43, -3.02)]

_sequence = itertools.count(1)


# --- helpers (also used by test_alerts_pipeline) ----------------------------------------


def alert_envelope(
    shipment_id: str,
    kind: alerts_pb2.AlertKind.ValueType = LATE,
    *,
    tenant: str = "tenant-a",
    severity: alerts_pb2.Severity.ValueType | None = None,
    location: tuple[float, float] | None = INSIDE,
    message: str = "",
) -> envelope_pb2.Envelope:
    """An alert record as the outbox relay writes it (event id = alert id)."""
    alert = alerts_pb2.Alert(
        alert_id=str(uuid.uuid4()),
        shipment_id=shipment_id,
        vehicle_id="veh-1",
        kind=kind,
        severity=SEVERITY.get(kind, alerts_pb2.SEVERITY_WARNING) if severity is None else severity,
        message=message or f"alert {next(_sequence)}",
    )
    alert.detected_at.CopyFrom(timestamp(T0))
    if location is not None:
        alert.last_location.CopyFrom(common_pb2.LatLng(latitude=location[0], longitude=location[1]))
    envelope = envelope_pb2.Envelope(
        event_id=alert.alert_id, tenant_id=tenant, principal="projector", alert=alert
    )
    envelope.occurred_at.CopyFrom(timestamp(T0))
    envelope.recorded_at.CopyFrom(timestamp(T0))
    return envelope


async def publish(
    producer: AIOKafkaProducer, settings: Settings, envelopes: Iterable[envelope_pb2.Envelope]
) -> list[str]:
    """Write alert envelopes keyed by shipment id; wait for every ack; return their ids."""
    futures = []
    ids = []
    for envelope in envelopes:
        record = encode(envelope, envelope.alert.shipment_id)
        ids.append(envelope.alert.alert_id)
        futures.append(
            await producer.send(
                settings.topics.shipment_alerts,
                record.value,
                key=record.key,
                headers=record.headers,
            )
        )
    await asyncio.gather(*futures)
    return ids


@dataclass
class Subscriber:
    """One SubscribeDelays stream, read by the test."""

    call: grpc.aio.UnaryStreamCall
    received: list[dispatch_pb2.SubscribeDelaysResponse] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [r.alert.alert_id for r in self.received]

    @property
    def last_token(self) -> str:
        return self.received[-1].resume_token

    async def subscribed(self, timeout_s: float = 30.0) -> str:
        """Wait until the server has registered the subscription; return its phase."""
        async with asyncio.timeout(timeout_s):
            metadata = await self.call.initial_metadata()
        return str(dict(metadata).get("cargotrack-subscription", ""))

    async def next(self, timeout_s: float = 30.0) -> dispatch_pb2.SubscribeDelaysResponse:
        async with asyncio.timeout(timeout_s):
            response = await self.call.read()
        if response is grpc.aio.EOF:
            raise AssertionError("the stream ended")
        assert isinstance(response, dispatch_pb2.SubscribeDelaysResponse)
        self.received.append(response)
        return response

    async def read_until(self, alert_id: str, timeout_s: float = 30.0) -> list[str]:
        """Read until the alert with this id arrived; return every id read meanwhile."""
        start = len(self.received)
        async with asyncio.timeout(timeout_s):
            while not self.received[start:] or self.received[-1].alert.alert_id != alert_id:
                await self.next(timeout_s)
        return self.ids[start:]

    async def read(self, count: int, timeout_s: float = 30.0) -> list[str]:
        start = len(self.received)
        async with asyncio.timeout(timeout_s):
            while len(self.received) - start < count:
                await self.next(timeout_s)
        return self.ids[start:]

    def cancel(self) -> None:
        self.call.cancel()


def subscribe(
    channel: grpc.aio.Channel,
    metadata: Metadata | None,
    *,
    filter: dispatch_pb2.AlertFilter | None = None,
    resume_token: str = "",
    from_beginning: bool = False,
) -> Subscriber:
    stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
    request = dispatch_pb2.SubscribeDelaysRequest(
        filter=filter, resume_token=resume_token, from_beginning=from_beginning
    )
    return Subscriber(stub.SubscribeDelays(request, metadata=metadata))


async def expect_error(subscriber: Subscriber, timeout_s: float = 30.0) -> grpc.aio.AioRpcError:
    """Read until the stream fails; return its error (AssertionError if it ends OK)."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                await subscriber.next(timeout_s)
    except grpc.aio.AioRpcError as error:
        return error


@dataclass
class RunningDispatch:
    server: DispatchServer
    settings: Settings
    channel: grpc.aio.Channel

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@contextlib.asynccontextmanager
async def running_dispatch(
    settings: Settings, *, buffer_size: int = DEFAULT_BUFFER_SIZE
) -> AsyncIterator[RunningDispatch]:
    """The dispatch service in-process, SERVING, with a channel to it; stopped after."""
    async with (
        DispatchServer(settings, buffer_size=buffer_size, readiness_interval_s=0.2) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await wait_health(channel)
        yield RunningDispatch(server, settings, channel)


def dispatcher(tenant: str = "tenant-a") -> Metadata:
    return bearer(Role.DISPATCHER, tenant=tenant)


def region(points: Sequence[tuple[float, float]]) -> common_pb2.Polygon:
    return common_pb2.Polygon(
        ring=[common_pb2.LatLng(latitude=lat, longitude=lon) for lat, lon in points]
    )


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str) -> Settings:
    return service_settings(kafka_bootstrap, topic_prefix)


@pytest.fixture
async def dispatch(settings: Settings) -> AsyncIterator[RunningDispatch]:
    async with running_dispatch(settings) as running:
        yield running


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    async with producer_for(settings) as started:
        yield started


# --- filters and tenants ----------------------------------------------------------------


async def test_each_filter_gets_exactly_the_alerts_it_asks_for(
    dispatch: RunningDispatch, settings: Settings, producer: AIOKafkaProducer
) -> None:
    filters = {
        "all": dispatch_pb2.AlertFilter(),
        "critical": dispatch_pb2.AlertFilter(min_severity=alerts_pb2.SEVERITY_CRITICAL),
        "kinds": dispatch_pb2.AlertFilter(kinds=[OFF_ROUTE, RECOVERED]),
        "shipments": dispatch_pb2.AlertFilter(shipment_ids=["s2", "s3"]),
        "region": dispatch_pb2.AlertFilter(region=region(REGION)),
        "combined": dispatch_pb2.AlertFilter(
            min_severity=alerts_pb2.SEVERITY_WARNING, kinds=[OFF_ROUTE], region=region(REGION)
        ),
    }
    subscribers = {
        name: subscribe(dispatch.channel, dispatcher(), filter=f) for name, f in filters.items()
    }
    for subscriber in subscribers.values():
        assert await subscriber.subscribed() == "live"
    log = [
        alert_envelope("s1", LATE, location=INSIDE),
        alert_envelope("s2", AT_RISK, location=OUTSIDE),
        alert_envelope("s3", RECOVERED, location=INSIDE),
        alert_envelope("s4", OFF_ROUTE, location=OUTSIDE),
        alert_envelope("s1", OFF_ROUTE, location=INSIDE),
        alert_envelope("s5", LATE, location=None),
        # On the region's boundary: counts as inside.
        alert_envelope("s6", AT_RISK, location=(53.38, -2.99)),
    ]
    ids = await publish(producer, settings, log)
    # Matches every filter, written last: reading up to it shows all that came before.
    sentinel = alert_envelope("s2", OFF_ROUTE, severity=alerts_pb2.SEVERITY_CRITICAL)
    [sentinel_id] = await publish(producer, settings, [sentinel])
    expected = {
        "all": set(ids),
        "critical": {ids[0], ids[5]},
        "kinds": {ids[2], ids[3], ids[4]},
        "shipments": {ids[1], ids[2]},
        "region": {ids[0], ids[2], ids[4], ids[6]},
        "combined": {ids[4]},
    }
    for name, subscriber in subscribers.items():
        got = await subscriber.read_until(sentinel_id)
        assert got[-1] == sentinel_id
        assert len(got) == len(set(got)), name
        assert set(got[:-1]) == expected[name], name
        subscriber.cancel()


async def test_a_tenant_never_sees_another_tenants_alerts(
    dispatch: RunningDispatch, settings: Settings, producer: AIOKafkaProducer
) -> None:
    a = subscribe(dispatch.channel, dispatcher("tenant-a"))
    b = subscribe(dispatch.channel, bearer(Role.OPS, tenant="tenant-b"))
    await a.subscribed()
    await b.subscribed()
    # The same shipment ids in both tenants, interleaved on the same partitions.
    log = [
        alert_envelope(f"s{i % 3}", LATE, tenant="tenant-a" if i % 2 else "tenant-b")
        for i in range(20)
    ]
    ids = await publish(producer, settings, log)
    end_a, end_b = await publish(
        producer,
        settings,
        [
            alert_envelope("end", LATE, tenant="tenant-a"),
            alert_envelope("end", LATE, tenant="tenant-b"),
        ],
    )
    got_a = await a.read_until(end_a)
    got_b = await b.read_until(end_b)
    assert set(got_a[:-1]) == {ids[i] for i in range(20) if i % 2}
    assert set(got_b[:-1]) == {ids[i] for i in range(20) if not i % 2}
    assert not set(got_a) & set(got_b)
    # Every alert a tenant sees carries its own tenant's data only.
    assert all(r.alert.alert_id not in got_b for r in a.received)
    a.cancel()
    b.cancel()


# --- requests refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "not a token!",
        "abc",
        tokens.encode([0, 0, 0])[:-2],  # truncated
        tokens.encode([0, 0, 0])[:-1] + "A",  # altered
        tokens.encode([0, 0, 0, 0, 0, 0, 0]),  # another topic (7 partitions)
        tokens.encode([10**12, 0, 0]),  # past the end
    ],
    ids=["alphabet", "short", "truncated", "altered", "partitions", "past-end"],
)
async def test_a_malformed_resume_token_is_invalid_argument(
    dispatch: RunningDispatch, token: str
) -> None:
    subscriber = subscribe(dispatch.channel, dispatcher(), resume_token=token)
    error = await expect_error(subscriber)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(error)] == ["resume_token"]


@pytest.mark.parametrize(
    ("alert_filter", "field_name"),
    [
        (dispatch_pb2.AlertFilter(region=region([(53.0, -3.0), (53.1, -3.0)])), "filter.region"),
        (
            # A bow tie: self-intersecting.
            dispatch_pb2.AlertFilter(
                region=region([(53.0, -3.0), (53.1, -2.9), (53.1, -3.0), (53.0, -2.9)])
            ),
            "filter.region",
        ),
        (
            dispatch_pb2.AlertFilter(region=region([(95.0, -3.0), (53.1, -2.9), (53.1, -3.0)])),
            "filter.region",
        ),
        (dispatch_pb2.AlertFilter(kinds=[0]), "filter.kinds[0]"),  # type: ignore[list-item]
        (dispatch_pb2.AlertFilter(min_severity=42), "filter.min_severity"),  # type: ignore[arg-type]
    ],
    ids=["two-points", "bow-tie", "latitude", "unspecified-kind", "unknown-severity"],
)
async def test_an_invalid_filter_is_invalid_argument(
    dispatch: RunningDispatch, alert_filter: dispatch_pb2.AlertFilter, field_name: str
) -> None:
    subscriber = subscribe(dispatch.channel, dispatcher(), filter=alert_filter)
    error = await expect_error(subscriber)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(error)] == [field_name]


async def test_without_a_token_the_caller_is_unauthenticated(dispatch: RunningDispatch) -> None:
    error = await expect_error(subscribe(dispatch.channel, None))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "metadata",
    [
        bearer(Role.DRIVER, vehicle_id="veh-1"),
        bearer(Role.CUSTOMER, customer_id="cust-1"),
        bearer(Role.SHIPPER),
    ],
    ids=["driver", "customer", "shipper"],
)
async def test_other_roles_are_permission_denied(
    dispatch: RunningDispatch, metadata: Metadata
) -> None:
    error = await expect_error(subscribe(dispatch.channel, metadata))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


# --- slow subscribers -------------------------------------------------------------------


async def test_a_slow_subscriber_is_cut_off_while_a_fast_one_continues(
    settings: Settings, producer: AIOKafkaProducer
) -> None:
    batches, per_batch = 12, 50
    # Without BDP probing the slow client's HTTP/2 window stays at 64 KiB, so the
    # server's writes to it block soon and its buffer behind them fills.
    async with (
        running_dispatch(settings, buffer_size=200) as dispatch,
        grpc.aio.insecure_channel(
            dispatch.target, options=[("grpc.http2.bdp_probe", 0)]
        ) as slow_channel,
    ):
        fast = subscribe(dispatch.channel, dispatcher())
        slow = subscribe(slow_channel, dispatcher())
        await fast.subscribed()
        await slow.subscribed()
        padding = "x" * 4000
        ids: list[str] = []
        # The fast one keeps up (reads each batch as it comes); the slow one reads nothing.
        for batch in range(batches):
            log = [
                alert_envelope(f"s{i % 7}", LATE, message=f"{batch}.{i} {padding}")
                for i in range(per_batch)
            ]
            written = await publish(producer, settings, log)
            ids.extend(written)
            assert sorted(await fast.read(per_batch)) == sorted(written)
        assert dispatch.server.hub.subscriber_count == 1  # the slow one was cut off
        # The slow one reads what had reached it, then learns it must resume.
        error = await expect_error(slow, timeout_s=60)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "resume_token" in (error.details() or "")
        assert 0 < len(slow.received) < len(ids)
        assert set(slow.ids) < set(ids)
        # Resuming with its last token gets exactly the rest: no gap, no repeat.
        resumed = subscribe(dispatch.channel, dispatcher(), resume_token=slow.last_token)
        assert await resumed.subscribed() == "catching-up"
        rest = await resumed.read(len(ids) - len(slow.received), timeout_s=60)
        assert sorted(slow.ids + rest) == sorted(ids)
        # Both streams are live.
        [later] = await publish(producer, settings, [alert_envelope("s1", LATE)])
        assert await fast.read_until(later) == [later]
        assert await resumed.read_until(later) == [later]
        fast.cancel()
        resumed.cancel()


# --- positions: from now, from the beginning, resume ------------------------------------


async def test_from_now_from_the_beginning_and_resume_across_the_handover(
    dispatch: RunningDispatch, settings: Settings, producer: AIOKafkaProducer
) -> None:
    before = await publish(producer, settings, [alert_envelope(f"s{i}", LATE) for i in range(9)])
    live = subscribe(dispatch.channel, dispatcher())
    everything = subscribe(dispatch.channel, dispatcher(), from_beginning=True)
    await live.subscribed()
    await everything.subscribed()
    first = await publish(producer, settings, [alert_envelope(f"s{i}", AT_RISK) for i in range(9)])
    assert sorted(await live.read(9)) == sorted(first)
    assert sorted(await everything.read(18)) == sorted(before + first)

    # A client that disconnects and resumes again and again, while alerts keep coming,
    # ends up with every alert exactly once (it always resumes from its last token).
    batches, per_batch = 20, 10
    written: list[str] = []

    async def keep_writing() -> None:
        for batch in range(batches):
            log = [alert_envelope(f"s{(batch + i) % 5}", LATE) for i in range(per_batch)]
            written.extend(await publish(producer, settings, log))

    writer = asyncio.create_task(keep_writing())
    seen = list(live.ids)
    token = live.last_token
    live.cancel()
    phases = set()
    try:
        while len(seen) < len(first) + batches * per_batch:
            resumed = subscribe(dispatch.channel, dispatcher(), resume_token=token)
            phases.add(await resumed.subscribed())
            wanted = min(7, len(first) + batches * per_batch - len(seen))
            seen.extend(await resumed.read(wanted))
            token = resumed.last_token
            resumed.cancel()
    finally:
        await writer
    assert len(seen) == len(set(seen)), "an alert was delivered twice"
    assert set(seen) == set(first) | set(written)
    assert phases == {"live", "catching-up"} or phases == {"catching-up"}
    everything.cancel()


async def test_without_kafka_it_is_not_serving_and_subscribers_get_unavailable(
    topic_prefix: str,
) -> None:
    [closed_port] = free_ports(1)
    settings = service_settings(
        f"127.0.0.1:{closed_port}", topic_prefix, CARGOTRACK_KAFKA_TIMEOUT_S=1.5
    )
    async with (
        DispatchServer(settings, readiness_interval_s=0.2) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        for name in ["", SERVICE_NAME]:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING, name
        error = await expect_error(subscribe(channel, dispatcher()), timeout_s=10)
        assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_shutdown_ends_streams_with_unavailable_at_once(
    kafka_bootstrap: str, topic_prefix: str, producer: AIOKafkaProducer
) -> None:
    """The server ends its streams itself when it stops: a client gets UNAVAILABLE with
    its resume token long before the (here one-minute) shutdown grace would end them."""
    grace_s = 60
    settings = service_settings(kafka_bootstrap, topic_prefix, CARGOTRACK_SHUTDOWN_GRACE_S=grace_s)
    async with running_dispatch(settings) as dispatch:
        subscriber = subscribe(dispatch.channel, dispatcher())
        await subscriber.subscribed()
        [alert_id] = await publish(producer, settings, [alert_envelope("s1", LATE)])
        assert await subscriber.read(1) == [alert_id]
        stopping = asyncio.create_task(dispatch.server.stop())
        # A third of the grace: only a server that ends the stream itself gets there.
        error = await expect_error(subscriber, timeout_s=grace_s / 3)
        await stopping
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "resume_token" in (error.details() or "")


async def test_as_a_process_sigterm_ends_streams_and_exits_cleanly(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, producer: AIOKafkaProducer
) -> None:
    """`cargotrack serve dispatch`, as a container runs it."""
    [port] = free_ports(1)
    settings = service_settings(kafka_bootstrap, topic_prefix)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_TOPIC_PREFIX": topic_prefix,
        "CARGOTRACK_TOPIC_PARTITIONS": "3",
        "CARGOTRACK_GRPC_PORT": str(port),
        "CARGOTRACK_SHUTDOWN_GRACE_S": "5",
        "DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused",
    }
    process = ChildProcess.spawn(
        [sys.executable, "-c", "from services.cli import main; main()", "serve", "dispatch"],
        name="dispatch",
        log_path=tmp_path / "dispatch.log",
        append_log=False,
        env=env,
    )
    try:
        await wait_serving(port, process, timeout_s=60)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            subscriber = subscribe(channel, dispatcher())
            await subscriber.subscribed()
            [alert_id] = await publish(producer, settings, [alert_envelope("s1", LATE)])
            assert await subscriber.read(1) == [alert_id]
            process.send_signal(signal.SIGTERM)
            error = await expect_error(subscriber, timeout_s=4)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await process.terminate(signal.SIGTERM, 15)
    assert process.returncode == 0, (tmp_path / "dispatch.log").read_text()
