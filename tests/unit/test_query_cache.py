"""The response cache of tracking-query as a data structure, and how the change feed
tells it (no database: the feed's callbacks are called as asyncpg would call them).

The integration side (real PostgreSQL, NOTIFY, the gRPC service) is
tests/integration/test_query_cache.py.
"""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest
from prometheus_client import REGISTRY

from services.tracking_query.cache import ENTRY_OVERHEAD_BYTES, ResponseCache
from services.tracking_query.queries import Scope
from services.tracking_query.watch import ChangeFeed
from shared.config import ConfigError, DatabaseSettings, load_settings

A, B = "acme:s1", "acme:s2"


def serving(max_bytes: int = 1 << 20, **options: int) -> ResponseCache:
    cache = ResponseCache(max_bytes, **options)
    cache.listening()
    return cache


def store(cache: ResponseCache, key: object, shipment: str, value: bytes) -> bool:
    return cache.put(key, shipment, value, cache.ticket())


def lookups(outcome: str) -> float:
    value = REGISTRY.get_sample_value("cargotrack_query_cache_lookups_total", {"outcome": outcome})
    return value or 0.0


def test_it_serves_nothing_until_the_feed_listens() -> None:
    cache = ResponseCache(1 << 20)
    assert not cache.serving
    assert not store(cache, "k", A, b"state")
    bypassed = lookups("bypass")
    assert cache.get("k") is None
    assert lookups("bypass") == bypassed + 1
    cache.listening()
    assert store(cache, "k", A, b"state")
    hits = lookups("hit")
    assert cache.get("k") == b"state"
    assert lookups("hit") == hits + 1


def test_a_change_drops_every_answer_about_that_shipment_and_no_other() -> None:
    cache = serving()
    staff = ("get", Scope("acme"), "s1")
    customer = ("get", Scope("acme", "c1"), "s1")
    public = ("token", "tok-1")
    for key in (staff, customer, public):
        assert store(cache, key, A, b"s1 " + repr(key).encode())
    assert store(cache, ("get", Scope("acme"), "s2"), B, b"s2")
    cache.changed(A)
    assert [cache.get(key) for key in (staff, customer, public)] == [None, None, None]
    assert cache.get(("get", Scope("acme"), "s2")) == b"s2"
    assert len(cache) == 1


def test_keys_of_other_scopes_are_other_answers() -> None:
    """Scope is part of the key: equal tenants and customers are equal keys, any
    difference is a different key (so one tenant's or customer's answer is never
    another's)."""
    cache = serving()
    assert store(cache, ("get", Scope("acme", "c1"), "s1"), A, b"c1's view")
    assert cache.get(("get", Scope("acme", "c1"), "s1")) == b"c1's view"
    for other in (Scope("acme"), Scope("acme", "c2"), Scope("globex", "c1")):
        assert cache.get(("get", other, "s1")) is None


def test_a_read_that_started_before_a_change_cannot_store_its_answer() -> None:
    cache = serving()
    before = cache.ticket()
    cache.changed(A)  # notified while the read was in flight
    assert not cache.put("k", A, b"maybe stale", before)
    assert cache.get("k") is None
    assert cache.put("k", A, b"fresh", cache.ticket())
    # A change of another shipment does not refuse it.
    before = cache.ticket()
    cache.changed(B)
    assert cache.put("k2", A, b"fresh too", before)


def test_losing_the_feed_empties_the_cache_and_bypasses_it_until_listening_again() -> None:
    cache = serving()
    assert store(cache, "k", A, b"state")
    in_flight = cache.ticket()
    cache.lost()
    assert not cache.serving
    assert len(cache) == 0
    assert cache.size_bytes == 0
    assert cache.get("k") is None
    assert not store(cache, "k", A, b"read while nobody listened")
    cache.listening()
    # A read from before LISTEN came back may have missed a change: refused.
    assert not cache.put("k", A, b"read before listening", in_flight)
    assert store(cache, "k", A, b"read after listening")
    assert cache.get("k") == b"read after listening"


def test_everything_changed_empties_and_refuses_reads_in_flight_but_stays_on() -> None:
    cache = serving()
    assert store(cache, "k", A, b"state")
    in_flight = cache.ticket()
    cache.everything_changed()
    assert len(cache) == 0
    assert not cache.put("k", A, b"old", in_flight)
    assert store(cache, "k", A, b"new")


def test_forgotten_changes_refuse_older_reads_never_allow_them() -> None:
    cache = serving(recent_changes=2)
    before = cache.ticket()
    for shipment in ("acme:a", "acme:b", "acme:c"):  # acme:a's change is forgotten
        cache.changed(shipment)
    assert not cache.put("k", "acme:a", b"stale", before)
    # Even a shipment that never changed is refused for a read older than the
    # forgotten change: the cache cannot tell any more.
    assert not cache.put("k", "acme:never", b"?", before)
    assert cache.put("k", "acme:never", b"fresh", cache.ticket())


def test_the_bound_holds_and_the_least_recently_used_go_first() -> None:
    answer = b"x" * 400
    per_entry = len(answer) + ENTRY_OVERHEAD_BYTES
    cache = serving(max_bytes=10 * per_entry)
    for n in range(10):
        assert store(cache, n, f"acme:s{n}", answer)
    assert cache.size_bytes == 10 * per_entry
    assert cache.get(0) == answer  # 0 is now the most recently used; 1 the least
    assert store(cache, 10, "acme:s10", answer)
    assert cache.get(0) == answer
    assert cache.get(1) is None
    for n in range(11, 40):
        assert store(cache, n, f"acme:s{n}", answer)
        assert cache.size_bytes <= cache.max_bytes
    assert len(cache) == 10
    # Evicted entries leave nothing behind in the shipment index.
    cache.changed("acme:s1")
    assert len(cache) == 10
    # An answer larger than the whole bound is not stored (and evicts nothing).
    assert not store(cache, "huge", "acme:h", b"x" * (10 * per_entry))
    assert len(cache) == 10


def test_replacing_an_answer_counts_its_size_once() -> None:
    cache = serving()
    assert store(cache, "k", A, b"one")
    assert store(cache, "k", A, b"three")
    assert cache.size_bytes == len(b"three") + ENTRY_OVERHEAD_BYTES
    cache.changed(A)
    assert cache.size_bytes == 0


def test_the_overhead_estimate_covers_what_an_entry_really_costs() -> None:
    """The bound counts ENTRY_OVERHEAD_BYTES per entry besides the answer: measure what
    Python allocates for entries shaped like the service's (key with a customer scope,
    shipment key, 300-byte answer) and check the estimate is not below it."""
    count = 2000
    cache = serving(max_bytes=1 << 30)
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        for n in range(count):
            key = ("GetShipment", Scope("tenant-000001", f"customer-{n:06d}"), f"shp-{n:08d}")
            assert cache.put(key, f"tenant-000001:shp-{n:08d}", bytes(300), cache.ticket())
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (used - start) <= cache.size_bytes, (used - start) / count - 300


def test_off_means_off() -> None:
    cache = serving(max_bytes=0)
    assert not cache.serving
    assert not store(cache, "k", A, b"state")
    before = cache.ticket()
    cache.changed(A)  # nothing remembered either
    assert cache.ticket() == before


# --- the change feed tells the cache -----------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def changed(self, key: str) -> None:
        self.calls.append(f"changed {key}")

    def everything_changed(self) -> None:
        self.calls.append("everything")

    def lost(self) -> None:
        self.calls.append("lost")

    def listening(self) -> None:
        self.calls.append("listening")


def feed() -> ChangeFeed:
    return ChangeFeed(DatabaseSettings(url="postgresql://unused@127.0.0.1:1/x", schema="s"))


async def test_the_feed_tells_observers_before_it_wakes_watchers() -> None:
    changes = feed()
    recorder = Recorder()
    changes.observe(recorder)
    with changes.subscribe("acme", "s1") as subscription:
        original = subscription._wake

        def wake() -> None:
            recorder.calls.append("woken")
            original()

        subscription._wake = wake  # type: ignore[method-assign]
        changes._on_notification(None, 0, changes.channel, "acme:s1")
        changes._on_notification(None, 0, changes.channel, "acme:s2")
        assert recorder.calls == ["changed acme:s1", "woken", "changed acme:s2"]
        assert await asyncio.wait_for(subscription.changed(), 1)


async def test_the_everything_payload_empties_the_cache_and_wakes_every_watcher() -> None:
    changes = feed()
    cache = serving()
    changes.observe(cache)
    assert store(cache, "k", A, b"state")
    with changes.subscribe("acme", "s1") as one, changes.subscribe("globex", "s9") as other:
        changes._on_notification(None, 0, changes.channel, "*")
        assert len(cache) == 0
        assert await asyncio.wait_for(one.changed(), 1)
        assert await asyncio.wait_for(other.changed(), 1)


# --- the setting -----------------------------------------------------------------------

BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "CARGOTRACK_JWT_SECRET": "unit-test-hs256-secret-0123456789abcdef",
}


def test_the_setting_counts_mib_and_zero_turns_the_cache_off() -> None:
    assert load_settings(BASE).query_cache_mb == 64
    assert load_settings({**BASE, "CARGOTRACK_QUERY_CACHE_MB": "0"}).query_cache_mb == 0


@pytest.mark.parametrize("value", ["-1", "lots", "67108864"])
def test_a_bad_cache_size_is_named(value: str) -> None:
    with pytest.raises(ConfigError, match="CARGOTRACK_QUERY_CACHE_MB"):
        load_settings({**BASE, "CARGOTRACK_QUERY_CACHE_MB": value})
