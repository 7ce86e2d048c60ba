"""tracking-query's response cache against real PostgreSQL (and Kafka for the projector):
never a state older than one committed and notified.

"Notified" is made exact by a barrier: the test sends a NOTIFY of its own after the
change's commit and waits for the service's feed to take it. PostgreSQL delivers
notifications in commit order, so by then the feed has taken the change's too.
States are written with tracking_store.save_shipments (the projector's write path,
so its triggers notify), or projected from Kafka where the projector must run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from prometheus_client import REGISTRY

from services.tracking_query.app import QueryServer
from services.tracking_query.watch import ChangeFeed
from shared import tracking_store as store
from shared.auth import Role
from shared.config import Settings
from shared.domain import polyline
from shared.domain.tracking import ShipmentState
from shared.pb import tracking_pb2, tracking_pb2_grpc
from tests.ingest_helpers import bearer, wait_health
from tests.integration.test_tracking_query import (
    OPS,
    OTHER_TENANT,
    READ_TIMEOUT_S,
    TENANT,
    moving,
    project,
    query_settings,
    save,
    shipment_log,
    tracking_row,
)
from tests.projection_helpers import T0, fold_log, prepare

pytestmark = pytest.mark.timeout(180)

CUSTOMER_1 = bearer(Role.CUSTOMER, tenant=TENANT, customer_id="cust-1")
CUSTOMER_2 = bearer(Role.CUSTOMER, tenant=TENANT, customer_id="cust-2")


@dataclasses.dataclass
class Service:
    server: QueryServer
    stub: Any  # tracking_pb2_grpc.TrackingServiceStub

    async def get(self, shipment_id: str, metadata: Any = OPS) -> tracking_pb2.Shipment:
        reply = await self.stub.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id=shipment_id), metadata=metadata, timeout=10
        )
        shipment: tracking_pb2.Shipment = reply.shipment
        return shipment

    async def track(self, token: str) -> tracking_pb2.PublicShipment:
        reply = await self.stub.TrackByToken(
            tracking_pb2.TrackByTokenRequest(tracking_token=token), timeout=10
        )
        shipment: tracking_pb2.PublicShipment = reply.shipment
        return shipment

    async def notified(self, pool: asyncpg.Pool) -> None:
        """Return once the feed has taken every notification committed before the call."""
        marker = f"barrier-{uuid.uuid4().hex}"
        feed = self.server.feed
        with feed.subscribe(TENANT, marker) as barrier:
            await pool.execute(
                "SELECT pg_notify($1, $2)", feed.channel, ChangeFeed.key(TENANT, marker)
            )
            assert await asyncio.wait_for(barrier.changed(), READ_TIMEOUT_S)


@contextlib.asynccontextmanager
async def serving(settings: Settings, feed: ChangeFeed | None = None) -> AsyncIterator[Service]:
    """The service in-process (as tests.ingest_helpers.running_service, with our feed),
    SERVING and listening."""
    async with (
        QueryServer(settings, feed=feed) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await wait_health(channel)
        await server.feed.wait_listening()
        yield Service(server, tracking_pb2_grpc.TrackingServiceStub(channel))


@pytest.fixture
async def settings(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> Settings:
    settings = query_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    return settings


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    async with serving(settings) as running:
        yield running


def lookups(outcome: str) -> float:
    sample = REGISTRY.get_sample_value("cargotrack_query_cache_lookups_total", {"outcome": outcome})
    return sample or 0.0


def in_transit(tenant: str, shipment_id: str, customer: str = "cust-1") -> ShipmentState:
    """A shipment in transit (with a tracking token) folded from its log, plus a
    planned route (only staff see it whole)."""
    folded, _ = fold_log(shipment_log(tenant, shipment_id, customer=customer))
    route = polyline.encode([(53.40, -2.99), (53.42, -2.95), (53.43, -2.90)])
    return dataclasses.replace(folded[(tenant, shipment_id)], planned_route=route)


def version(reference: str) -> int:
    return int(reference.rpartition("-")[2])


# --- a committed and notified change is seen -----------------------------------------


async def test_a_change_committed_and_notified_is_seen_by_the_next_read(
    service: Service, db_pool: asyncpg.Pool
) -> None:
    """Forty changes of one shipment; between them each reader (staff, customer,
    public) reads twice (the second from the cache), and two readers read
    continuously all along: a read that starts after a change was notified never
    shows an older version."""
    state = dataclasses.replace(in_transit(TENANT, "s1"), reference="ref-0")
    await save(db_pool, [state])
    await service.notified(db_pool)
    token = state.tracking_token
    readers: list[Callable[[], Awaitable[str]]] = [
        lambda: reference_of(service.get("s1")),
        lambda: reference_of(service.get("s1", CUSTOMER_1)),
        lambda: reference_of(service.track(token)),
    ]
    notified_version = 0
    done = asyncio.Event()
    continuous_reads = 0

    async def read_continuously(read: Callable[[], Awaitable[str]]) -> None:
        nonlocal continuous_reads
        while not done.is_set():
            floor = notified_version
            seen = version(await read())
            assert seen >= floor, f"read v{seen} after v{floor} was notified"
            continuous_reads += 1

    hits_before = lookups("hit")
    background = [asyncio.create_task(read_continuously(readers[n])) for n in (0, 2)]
    try:
        for n in range(1, 41):
            for read in readers:
                assert [version(await read()) for _ in range(2)] == [n - 1, n - 1]
            await save(db_pool, [dataclasses.replace(state, reference=f"ref-{n}")])
            await service.notified(db_pool)
            notified_version = n
            for read in readers:
                assert version(await read()) == n
    finally:
        done.set()
        await asyncio.gather(*background)
    assert continuous_reads > 0
    # The cache was in play: at least the second read of each reader in each round hit.
    assert lookups("hit") - hits_before >= 40 * len(readers)


async def reference_of(
    reply: Awaitable[tracking_pb2.Shipment] | Awaitable[tracking_pb2.PublicShipment],
) -> str:
    shipment = await reply
    return shipment.reference


async def test_a_vehicle_position_change_is_seen_once_notified(
    settings: Settings, service: Service, db_pool: asyncpg.Pool
) -> None:
    """Projected (Kafka → projector → PostgreSQL): GetShipment shows the vehicle's
    position (shipment_tracking); the projector's write of a new position notifies,
    so the cached answer without a position is not served after it."""
    log = shipment_log(TENANT, "s1", vehicle="v1")
    await project(settings, log)
    await service.notified(db_pool)
    hits = lookups("hit")
    before = [await service.get("s1") for _ in range(2)]
    assert lookups("hit") == hits + 1
    assert not before[1].HasField("last_position")
    await project(settings, [moving(TENANT, "v1", 1, T0 + timedelta(minutes=10))])
    await service.notified(db_pool)
    after = await service.get("s1")
    live = await tracking_row(db_pool, TENANT, "s1")
    assert live is not None
    assert live["position"] is not None
    folded, _ = fold_log(log)  # GPS changes the tracking row, not the folded state
    assert after == store.shipment_message(folded[(TENANT, "s1")], live)
    assert after.HasField("last_position")
    public = await service.track(after.tracking_token)
    assert public.last_position == after.last_position


# --- the race: a read in flight when the change is notified -------------------------------


@pytest.mark.parametrize("reader", ["staff", "customer", "public"])
async def test_a_read_that_started_before_a_notification_stores_nothing(
    service: Service, db_pool: asyncpg.Pool, reader: str
) -> None:
    """A cache miss reads version 1; before it stores its answer (held by the test
    hook), version 2 is committed and notified. Its answer (version 1) is fine for
    that call, which started before, but must not be stored: the next read shows
    version 2."""
    state = dataclasses.replace(in_transit(TENANT, "s1"), reference="ref-1")
    await save(db_pool, [state])
    await service.notified(db_pool)
    reads: dict[str, Callable[[], Awaitable[str]]] = {
        "staff": lambda: reference_of(service.get("s1")),
        "customer": lambda: reference_of(service.get("s1", CUSTOMER_1)),
        "public": lambda: reference_of(service.track(state.tracking_token)),
    }
    read = reads[reader]
    held = 0

    async def change_meanwhile() -> None:
        nonlocal held
        held += 1
        await save(db_pool, [dataclasses.replace(state, reference="ref-2")])
        await service.notified(db_pool)

    servicer = service.server.servicer
    assert servicer is not None
    servicer.after_read = change_meanwhile
    try:
        assert await read() == "ref-1"
    finally:
        servicer.after_read = None
    assert held == 1, "the read did not miss the cache"
    assert await read() == "ref-2"
    hits = lookups("hit")
    assert await read() == "ref-2"  # now stored, and right
    assert lookups("hit") == hits + 1


# --- losing the LISTEN connection ----------------------------------------------------------


async def test_losing_the_listen_connection_empties_and_bypasses_the_cache(
    settings: Settings, database_url: str, db_pool: asyncpg.Pool
) -> None:
    """The feed's reconnection waits for a gate. While it waits, nothing is served
    from memory nor stored, so changes committed meanwhile (notifying nobody) are
    seen at once; once LISTEN is back, the cache fills again."""
    gate, reconnecting = asyncio.Event(), asyncio.Event()
    attempts = 0
    name = f"cache-feed-{uuid.uuid4().hex[:8]}"

    async def connect() -> asyncpg.Connection[Any]:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            reconnecting.set()
            await gate.wait()
        return await asyncpg.connect(database_url, server_settings={"application_name": name})

    state = dataclasses.replace(in_transit(TENANT, "s1"), reference="ref-1")
    await save(db_pool, [state])
    async with serving(settings, ChangeFeed(settings.database, connect=connect)) as service:
        cache = service.server.cache
        assert [(await service.get("s1")).reference for _ in range(2)] == ["ref-1"] * 2
        assert len(cache) == 1
        killed = await db_pool.fetchval(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            name,
        )
        assert killed
        await asyncio.wait_for(reconnecting.wait(), READ_TIMEOUT_S)
        assert not cache.serving
        assert len(cache) == 0
        bypassed = lookups("bypass")
        for n in (2, 3):
            await save(db_pool, [dataclasses.replace(state, reference=f"ref-{n}")])  # unheard
            assert [(await service.get("s1")).reference for _ in range(2)] == [f"ref-{n}"] * 2
            assert len(cache) == 0
        assert lookups("bypass") == bypassed + 4
        gate.set()
        await service.server.feed.wait_listening(connections=2)
        assert cache.serving
        assert [(await service.get("s1")).reference for _ in range(2)] == ["ref-3"] * 2
        assert len(cache) == 1


# --- isolation -------------------------------------------------------------------------------


async def test_cached_answers_never_cross_tenants_customers_or_views(
    service: Service, db_pool: asyncpg.Pool
) -> None:
    """Two tenants each have a shipment s1 of a customer cust-1; acme's cust-2 owns
    none. Each caller reads twice (the second from the cache when one is kept) and
    gets its own answer, in whatever order the others filled the cache."""
    acme = dataclasses.replace(in_transit(TENANT, "s1"), reference="acme-1")
    globex = dataclasses.replace(in_transit(OTHER_TENANT, "s1"), reference="globex-1")
    await save(db_pool, [acme, globex])
    await service.notified(db_pool)
    globex_ops = bearer(Role.OPS, tenant=OTHER_TENANT)
    globex_customer = bearer(Role.CUSTOMER, tenant=OTHER_TENANT, customer_id="cust-1")
    hits = lookups("hit")
    for _ in range(2):
        staff = await service.get("s1", OPS)
        assert (staff.reference, staff.customer_id) == ("acme-1", "cust-1")
        assert staff.planned_route, "staff see the planned route"
        customer = await service.get("s1", CUSTOMER_1)
        assert customer.reference == "acme-1"
        assert not customer.planned_route, "customers never see the planned route"
        assert (await service.get("s1", globex_ops)).reference == "globex-1"
        assert (await service.get("s1", globex_customer)).reference == "globex-1"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await service.get("s1", CUSTOMER_2)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        public = await service.track(acme.tracking_token)
        assert public.reference == "acme-1"
        assert (await service.track(globex.tracking_token)).reference == "globex-1"
    # Six answers kept (NOT_FOUND is not), and each served once from memory.
    assert len(service.server.cache) == 6
    assert lookups("hit") == hits + 6


# --- the bound --------------------------------------------------------------------------------


async def test_the_cache_stays_within_its_bound(settings: Settings, db_pool: asyncpg.Pool) -> None:
    """1 MiB and 2,000 shipments read once each: far more than fits. Every answer is
    right, the memory counted stays within the bound, and the gauge says the same."""
    states = [in_transit(TENANT, f"s{n:04d}", customer=f"cust-{n % 7}") for n in range(2000)]
    await save(db_pool, states)
    bounded = dataclasses.replace(settings, query_cache_mb=1)
    async with serving(bounded) as service:
        cache = service.server.cache
        for start in range(0, len(states), 50):
            chunk = states[start : start + 50]
            answers = await asyncio.gather(*(service.get(s.shipment_id) for s in chunk))
            assert [a.shipment_id for a in answers] == [s.shipment_id for s in chunk]
            assert 0 < cache.size_bytes <= 1 << 20
        assert 100 < len(cache) < len(states)
        gauge = REGISTRY.get_sample_value("cargotrack_query_cache_bytes")
        assert gauge == cache.size_bytes


async def test_zero_turns_the_cache_off(settings: Settings, db_pool: asyncpg.Pool) -> None:
    await save(db_pool, [in_transit(TENANT, "s1")])
    off = dataclasses.replace(settings, query_cache_mb=0)
    async with serving(off) as service:
        bypassed = lookups("bypass")
        assert [(await service.get("s1")).shipment_id for _ in range(3)] == ["s1"] * 3
        assert lookups("bypass") == bypassed + 3
        assert len(service.server.cache) == 0
