"""The projector's in-memory recent tracks (services/projector/track_cache.py), without I/O.

A cached track must answer exactly what the history query would: the rows after
an instant, in (recorded_at, latitude, longitude) order, with each GPS record's
newest fix as its instant. The integration test in test_alerts_pipeline.py checks
the whole projector against reading tracks back from PostgreSQL.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from services.projector.track_cache import CachedTrack, TrackCache
from shared.domain.geo import Fix
from shared.domain.tracking import gps_positions
from shared.pb import gps_pb2

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def position(second: float, lat: float = 53.4, speed: float = 5.0) -> Fix:
    return Fix(
        at=T0 + timedelta(seconds=second),
        lat=lat,
        lon=-2.9 + second / 10_000,
        speed_mps=speed,
    )


def history_order(rows: list[tuple[str, Fix]]) -> list[tuple[datetime, float, float, str]]:
    """What `ORDER BY recorded_at, latitude, longitude` returns for these rows."""
    return sorted((p.at, p.lat, p.lon, e) for e, p in rows)


def empty(covered_from: datetime = T0 - timedelta(hours=1)) -> CachedTrack:
    return CachedTrack(covered_from, (), ())


uploads = st.lists(
    st.lists(st.integers(min_value=0, max_value=3_600), min_size=1, max_size=20),
    min_size=1,
    max_size=8,
)


@given(uploads)
def test_a_track_holds_every_upload_in_history_order(batches: list[list[int]]) -> None:
    track = empty()
    rows: list[tuple[str, Fix]] = []
    for n, seconds in enumerate(batches):
        batch = [(f"rec-{n}", position(s)) for s in seconds]
        rows.extend(batch)
        track = track.with_points(batch)
    assert [(f.at, f.lat, f.lon, e) for f, e in zip(track.fixes, track.events, strict=True)] == (
        history_order(rows)
    )


@given(uploads, st.integers(min_value=0, max_value=3_600))
def test_a_view_is_what_the_history_query_returns_after_an_instant(
    batches: list[list[int]], after_s: int
) -> None:
    track = empty()
    rows: list[tuple[str, Fix]] = []
    for n, seconds in enumerate(batches):
        batch = [(f"rec-{n}", position(s)) for s in seconds]
        rows.extend(batch)
        track = track.with_points(batch)
    after = T0 + timedelta(seconds=after_s)
    view = track.view(after)
    expected = [row for row in history_order(rows) if row[0] > after]
    assert [(f.at, f.lat, f.lon) for f in view.fixes] == [row[:3] for row in expected]
    assert view.times == [row[0] for row in expected]
    newest: dict[str, datetime] = {}
    for at, _, _, event_id in expected:
        newest[event_id] = max(newest.get(event_id, at), at)
    assert view.records == sorted(set(newest.values()))


def test_trimming_moves_the_covered_instant_forward_only() -> None:
    track = empty(T0).with_points([("r", position(s)) for s in range(0, 100, 10)])
    trimmed = track.after(T0 + timedelta(seconds=35))
    assert trimmed.covered_from == T0 + timedelta(seconds=35)
    assert [f.at for f in trimmed.fixes] == [T0 + timedelta(seconds=s) for s in range(40, 100, 10)]
    assert trimmed.covers(T0 + timedelta(seconds=35))
    assert not trimmed.covers(T0 + timedelta(seconds=34))
    assert trimmed.after(T0) is trimmed  # never widens what it claims to hold


def test_a_fix_is_what_reading_the_row_back_gives() -> None:
    # The cache keeps the fold's decoded fixes as they are; a point's unknown speed
    # (0 on the wire) is None there, as reading its row back gives (0 in the table).
    batch = gps_pb2.GpsBatch(
        points=[
            gps_pb2.GpsPoint(
                recorded_at=Timestamp(seconds=int(T0.timestamp()) + 5),
                latitude=53.4,
                longitude=-2.9 + 5 / 10_000,
                speed_mps=0.0,
            )
        ]
    )
    [decoded] = gps_positions(batch)
    track = empty().with_points([("r1", decoded)])
    assert track.fixes == (Fix(T0 + timedelta(seconds=5), 53.4, -2.9 + 5 / 10_000, None),)
    assert track.fixes[0] is decoded  # one object per point
    assert track.events == ("r1",)  # speed 0 (unknown) reads back as None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def track_of(n: int) -> CachedTrack:
    return empty().with_points([("r", position(s)) for s in range(n)])


def test_a_full_cache_keeps_its_busy_vehicles_and_refuses_newcomers() -> None:
    """A cycle over more vehicles than fit must not evict each one just before its
    next turn (plain LRU would miss every time): the held ones stay."""
    clock = Clock()
    cache = TrackCache(max_fixes=25, idle_s=60, clock=clock)
    cache.apply({("t", "v1"): track_of(10), ("t", "v2"): track_of(10)})
    assert cache.fixes == 20
    clock.now = 30
    cache.apply({("t", "v3"): track_of(10)})  # no room, nobody idle: not admitted
    assert cache.get(("t", "v3")) is None
    assert cache.get(("t", "v1")) is not None
    assert cache.get(("t", "v2")) is not None
    assert cache.fixes == 20


def test_vehicles_idle_for_a_while_make_room_for_newcomers() -> None:
    clock = Clock()
    cache = TrackCache(max_fixes=25, idle_s=60, clock=clock)
    cache.apply({("t", "v1"): track_of(10), ("t", "v2"): track_of(10)})
    clock.now = 50
    cache.apply({("t", "v1"): track_of(10)})  # v1 busy, v2 idle from t=0
    clock.now = 70
    cache.apply({("t", "v3"): track_of(10)})
    assert cache.get(("t", "v2")) is None  # idle 70 s: evicted
    assert cache.get(("t", "v1")) is not None  # used 20 s ago: kept
    assert cache.get(("t", "v3")) is not None
    assert cache.fixes == 20


def test_held_tracks_that_grow_past_the_budget_evict_the_least_recently_used() -> None:
    clock = Clock()
    cache = TrackCache(max_fixes=25, clock=clock)
    cache.apply({("t", "v1"): track_of(10), ("t", "v2"): track_of(10)})
    cache.apply({("t", "v2"): track_of(13), ("t", "v1"): track_of(13)})  # v2 used first
    assert cache.get(("t", "v2")) is None
    assert cache.fixes == 13
    cache.apply({("t", "v1"): None})
    assert cache.get(("t", "v1")) is None
    assert cache.fixes == 0
    cache.apply({("t", "v1"): track_of(3)})
    cache.clear()
    assert len(cache) == 0
    assert cache.fixes == 0


def test_lookups_count_hits_and_misses_by_coverage() -> None:
    cache = TrackCache(max_fixes=100)
    held = CachedTrack(T0, (), ())
    cache.apply({("t", "v1"): held})
    assert cache.lookup(("t", "v1"), T0 + timedelta(seconds=1)) is held
    assert cache.lookup(("t", "v1"), T0 - timedelta(seconds=1)) is None  # not that far back
    assert cache.lookup(("t", "v2"), T0) is None
    staged = CachedTrack(T0 - timedelta(hours=1), (), ())
    assert cache.lookup(("t", "v1"), T0 - timedelta(seconds=1), staged) is staged
    assert (cache.hits, cache.misses) == (2, 2)


def test_a_cache_without_budget_keeps_nothing() -> None:
    cache = TrackCache(max_fixes=0)
    cache.apply({("t", "v1"): empty().with_points([("r", position(1))])})
    assert len(cache) == 0
    assert cache.fixes == 0


def test_out_of_order_uploads_keep_bisection_valid() -> None:
    rng = random.Random(7)
    seconds = list(range(0, 600, 3))
    rng.shuffle(seconds)
    track = empty()
    for k in range(0, len(seconds), 17):
        track = track.with_points([(f"r{k}", position(s)) for s in seconds[k : k + 17]])
    times = [f.at for f in track.fixes]
    assert times == sorted(times)
    assert len(track.after(T0 + timedelta(seconds=300)).fixes) == len(range(303, 600, 3))
