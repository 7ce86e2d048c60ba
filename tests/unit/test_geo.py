"""Geodesy, routes, track cleaning and encoded polylines (pure, no I/O)."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.eta_reference.geo import clean_track as reference_clean_track
from shared.domain import _accel
from shared.domain.geo import (
    EARTH_RADIUS_M,
    Fix,
    LocalProjection,
    Route,
    TrackMemo,
    bearing_deg,
    clean_track,
    haversine_m,
    route_from_polyline,
)
from shared.domain.polyline import PolylineError, decode, encode

PROJ = LocalProjection(53.4, -2.9)
T0 = datetime(2026, 1, 26, 12, 0, tzinfo=UTC)


def at(x: float, y: float) -> tuple[float, float]:
    return PROJ.to_latlon(x, y)


def fix(s: float, x: float, y: float) -> Fix:
    return Fix(T0 + timedelta(seconds=s), *at(x, y))


# -- distances and projection ------------------------------------------------------------


def test_haversine_known_values() -> None:
    assert haversine_m(0, 0, 1, 0) == pytest.approx(math.pi * EARTH_RADIUS_M / 180, rel=1e-12)
    # London (Trafalgar Sq.) to Paris (Notre-Dame) is about 341 km on the sphere.
    assert haversine_m(51.508, -0.128, 48.853, 2.350) == pytest.approx(341_000, rel=0.01)
    assert haversine_m(10, 20, 10, 20) == 0.0


def test_bearing_cardinal_directions() -> None:
    assert bearing_deg(0, 0, 1, 0) == pytest.approx(0.0)
    assert bearing_deg(0, 0, 0, 1) == pytest.approx(90.0)
    assert bearing_deg(0, 0, -1, 0) == pytest.approx(180.0)
    assert bearing_deg(0, 0, 0, -1) == pytest.approx(270.0)


@given(
    st.floats(-60, 60), st.floats(-170, 170), st.floats(-30_000, 30_000), st.floats(-30_000, 30_000)
)
def test_projection_roundtrip_and_exact_centre_distance(
    lat0: float, lon0: float, x: float, y: float
) -> None:
    proj = LocalProjection(lat0, lon0)
    lat, lon = proj.to_latlon(x, y)
    x2, y2 = proj.to_xy(lat, lon)
    assert math.hypot(x2 - x, y2 - y) < 1e-3
    # Azimuthal equidistant: distance from the centre is the great-circle distance.
    assert math.hypot(x, y) == pytest.approx(haversine_m(lat0, lon0, lat, lon), rel=1e-9, abs=1e-6)


def test_projection_distorts_city_scale_distances_by_under_a_thousandth_of_a_percent() -> None:
    rng = np.random.default_rng(7)
    pts = rng.uniform(-20_000, 20_000, size=(200, 2))
    for (x1, y1), (x2, y2) in zip(pts[::2], pts[1::2], strict=True):
        planar = math.hypot(x2 - x1, y2 - y1)
        sphere = haversine_m(*at(x1, y1), *at(x2, y2))
        assert planar == pytest.approx(sphere, rel=1e-5)


# -- routes ---------------------------------------------------------------------------------

STRAIGHT = Route([at(0, 0), at(5000, 0), at(10_000, 0)])
L_SHAPED = Route([at(0, 0), at(4000, 0), at(4000, 3000)])


def test_straight_route_projection() -> None:
    assert STRAIGHT.length_m == pytest.approx(10_000, abs=0.5)
    p = STRAIGHT.project(*at(1000, 30))
    assert p.distance_along_m == pytest.approx(1000, abs=0.5)
    assert p.offset_m == pytest.approx(30, abs=0.5)
    assert p.on_route
    far = STRAIGHT.project(*at(1000, 200))
    assert not far.on_route
    assert STRAIGHT.project(*at(-500, 0)).distance_along_m == 0.0
    assert STRAIGHT.project(*at(12_000, 0)).distance_along_m == pytest.approx(STRAIGHT.length_m)
    assert STRAIGHT.remaining_m(2500) == pytest.approx(7500, abs=0.5)
    assert STRAIGHT.remaining_m(-10) == pytest.approx(STRAIGHT.length_m)
    assert STRAIGHT.remaining_m(1e9) == 0.0


def test_l_shaped_route_measures_along_both_legs() -> None:
    assert L_SHAPED.length_m == pytest.approx(7000, abs=0.5)
    second_leg = L_SHAPED.project(*at(3980, 1000))
    assert second_leg.distance_along_m == pytest.approx(5000, abs=0.5)
    assert second_leg.offset_m == pytest.approx(20, abs=0.5)
    lat, lon = L_SHAPED.point_at(5500)
    assert haversine_m(lat, lon, *at(4000, 1500)) < 0.5


def test_samples_cover_the_route_with_headings() -> None:
    s = L_SHAPED.samples(100)
    assert s.length_m.sum() == pytest.approx(L_SHAPED.length_m)
    assert s.heading_deg[0] == pytest.approx(90, abs=0.5)  # east
    assert s.heading_deg[-1] == pytest.approx(0, abs=0.5)  # north
    assert L_SHAPED.samples(100) is s  # cached


def test_hint_keeps_progress_on_the_leg_the_vehicle_is_on() -> None:
    # Out and back along the same street, 10 m apart.
    out_and_back = Route([at(0, 0), at(3000, 0), at(3000, 10), at(0, 10)])
    point = at(1000, 4)  # nearer the outbound leg
    assert out_and_back.project(*point).distance_along_m == pytest.approx(1000, abs=1)
    on_return = out_and_back.project(*point, near_m=4800)
    assert on_return.distance_along_m == pytest.approx(3010 + 2000, abs=1)
    vectorised, _ = out_and_back.project_many(np.array([point[0]]), np.array([point[1]]))
    assert vectorised[0] == pytest.approx(1000, abs=1)


def test_route_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="two"):
        Route([at(0, 0)])
    with pytest.raises(ValueError, match="distinct"):
        Route([at(0, 0), at(0.1, 0)])
    with pytest.raises(ValueError, match="latitude"):
        Route([(91.0, 0.0), (0.0, 0.0)])
    with pytest.raises(ValueError, match="latitude"):
        STRAIGHT.project(math.nan, 0.0)


def test_route_from_polyline_is_cached() -> None:
    encoded = encode([at(0, 0), at(1000, 0), at(1000, 1000)])
    r = route_from_polyline(encoded)
    assert route_from_polyline(encoded) is r
    assert r.length_m == pytest.approx(2000, abs=2)


# -- track cleaning -------------------------------------------------------------------------


def test_clean_track_drops_a_single_jump_anywhere() -> None:
    good = [fix(30 * i, 300 * i, 0) for i in range(6)]
    middle_spike = [*good[:3], fix(75, 5000, 5000), *good[3:]]
    assert clean_track(middle_spike) == good
    first_spike = [fix(-30, 9000, 9000), *good]
    assert clean_track(first_spike) == good
    last_spike = [*good, fix(175, -9000, 0)]
    assert clean_track(last_spike) == good


def test_clean_track_accepts_a_confirmed_relocation() -> None:
    track = [fix(0, 0, 0), fix(30, 300, 0), fix(60, 9000, 0), fix(90, 9300, 0)]
    assert clean_track(track)[-2:] == track[-2:]


@given(st.permutations([fix(20 * i, 150 * i, (i % 3) * 10) for i in range(8)]))
def test_clean_track_ignores_input_order(fixes: list[Fix]) -> None:
    assert clean_track(fixes) == sorted(set(fixes), key=lambda f: f.t)


def test_clean_track_rechecks_pairs_checked_at_a_higher_speed() -> None:
    track = [fix(10 * i, 300 * i, 0) for i in range(5)]  # 30 m/s
    memo = TrackMemo()
    assert clean_track(track, 60.0, memo) == track  # remembers the pairs as plausible at 60
    fresh = [fix(10 * i, 300 * i, 0) for i in range(5)]
    assert clean_track(track, 20.0, memo) == clean_track(fresh, 20.0) != track


def test_clean_track_decides_borderline_speeds_exactly() -> None:
    # Steps within a few ulps of 60 m/s, northwards: numpy's haversine cannot tell
    # which side they fall on, so the exact scalar check must.
    rng = random.Random(4)
    for _ in range(20):
        lat, fixes = 10.0, [Fix(T0, 10.0, 20.0)]
        for i in range(1, 40):
            eps = rng.choice([0.0, 1e-15, -1e-15, 3e-15, -3e-15, 1e-12, -1e-12, -1e-6])
            lat += math.degrees(60.0 * 10.0 / EARTH_RADIUS_M * (1 + eps))
            fixes.append(Fix(T0 + timedelta(seconds=10 * i), lat, 20.0))
        fresh = [Fix(f.at, f.lat, f.lon) for f in fixes]
        memo = TrackMemo()
        assert clean_track(fixes, memo=memo) == reference_clean_track(fresh)
        assert clean_track(fixes, memo=memo) == reference_clean_track(fresh)  # memoised


# -- memos -----------------------------------------------------------------------------------


def test_a_fix_is_a_plain_value() -> None:
    f, g = fix(0, 100, 20), fix(0, 100, 20)
    memo = TrackMemo()
    STRAIGHT.project_fixes([f], memo=memo)
    clean_track([f, fix(10, 150, 20)], memo=memo)
    assert len(memo) == 1  # the memo, not the fix, holds what was worked out
    assert f == g
    assert hash(f) == hash(g)
    assert repr(f) == repr(g)
    assert [x.name for x in dataclasses.fields(f)] == [
        "at",
        "lat",
        "lon",
        "speed_mps",
        "heading_deg",
        "accuracy_m",
        "t",
    ]
    for clone in (pickle.loads(pickle.dumps(f)), copy.deepcopy(f), dataclasses.replace(f)):
        assert clone == f
        assert clone.t == f.t


def test_a_memo_is_keyed_by_identity_and_trimmed_by_its_owner() -> None:
    track = [fix(i, 10 * i, 0) for i in range(50)]
    memo = TrackMemo()
    assert clean_track(track, memo=memo) == track  # links each fix to the next
    STRAIGHT.project_fixes(track, memo=memo)
    assert len(memo) == 50
    # An equal fix that is another object is worked out again, with the same result.
    twin = [Fix(f.at, f.lat, f.lon) for f in track]
    assert STRAIGHT.project_fixes(twin, memo=memo) == STRAIGHT.project_fixes(track)
    assert len(memo) == 100
    memo.retain(track[40:])
    assert len(memo) == 10
    assert clean_track(track[40:], memo=memo) == track[40:]
    assert STRAIGHT.project_fixes(track[40:], memo=memo) == STRAIGHT.project_fixes(track[40:])


def test_a_memo_follows_a_sliding_window_and_stays_bounded_otherwise() -> None:
    track = [fix(i, 10 * i, 0) for i in range(400)]
    window = 100
    memo = TrackMemo()
    sizes = []
    for hi in range(window, len(track) + 1, 7):
        fixes = track[hi - window : hi]
        STRAIGHT.project_fixes(fixes, memo=memo)
        memo.retain(fixes)
        sizes.append(len(memo))
    assert set(sizes) == {window}  # what slid out is forgotten at once
    # Fixes given in another order, and entries of fixes not given, wait for a full
    # pass; the memo stays within its spare meanwhile.
    memo = TrackMemo()
    bound = window + TrackMemo.SPARE_MIN + window * TrackMemo.SPARE
    sizes = []
    for hi in range(window, len(track) + 1, 7):
        fixes = track[hi - window : hi][::-1]
        STRAIGHT.project_fixes(fixes, memo=memo)
        STRAIGHT.project_fixes([Fix(f.at, f.lat, f.lon) for f in fixes[:30]], memo=memo)
        memo.retain(fixes)
        sizes.append(len(memo))
    assert max(sizes) <= bound
    # What it still holds is right for the window it is asked about.
    assert STRAIGHT.project_fixes(track[-window:], memo=memo) == STRAIGHT.project_fixes(
        track[-window:]
    )


def test_a_memo_remembers_a_few_routes() -> None:
    fixes = [fix(i, 100 * i, 30) for i in range(10)]
    memo = TrackMemo()
    routes = [Route([at(0, 500 * k), at(2000, 500 * k)]) for k in range(TrackMemo.ROUTES + 2)]
    for route in routes:
        route.project_fixes(fixes, memo=memo)
    assert len(memo._routes) == TrackMemo.ROUTES
    assert list(memo._routes) == routes[-TrackMemo.ROUTES :]  # the most recent ones


def test_project_fixes_follows_the_route_asked_for() -> None:
    fixes = [fix(i, 100 * i, 30) for i in range(10)]
    other = Route([at(0, 500), at(2000, 500)])
    memo = TrackMemo()
    for route in (STRAIGHT, other, STRAIGHT):
        alongs, offsets = route.project_fixes(fixes, memo=memo)
        fresh = route.project_track([f.lat for f in fixes], [f.lon for f in fixes])
        assert alongs == [p.distance_along_m for p in fresh]
        assert offsets == [p.offset_m for p in fresh]


def test_the_accelerators_use_the_models_earth() -> None:
    assert _accel.EARTH_RADIUS_M == EARTH_RADIUS_M


def test_single_point_projections_are_memoised_boundedly() -> None:
    route = Route([at(0, 0), at(5000, 0)])
    first = route.project(*at(100, 10))
    for x in range(100):
        route.project(*at(10 * x, 50))
    assert len(route._point_memo) == 16
    assert route.project(*at(100, 10)) == first


def test_route_points_are_the_merged_vertices() -> None:
    pts = [at(0, 0), at(0.2, 0), at(1000, 0)]
    assert Route(pts).points == (pts[0], pts[2])
    assert all(type(v) is float for p in Route(pts).points for v in p)


def test_fix_requires_aware_time() -> None:
    with pytest.raises(ValueError, match="timezone"):
        Fix(datetime(2026, 1, 1), 0.0, 0.0)
    with pytest.raises(ValueError, match="speed"):
        Fix(T0, 0.0, 0.0, -1.0)


# -- encoded polylines ----------------------------------------------------------------------


def test_polyline_googles_documented_example() -> None:
    points = [(38.5, -120.2), (40.7, -120.95), (43.252, -126.453)]
    assert encode(points) == "_p~iF~ps|U_ulLnnqC_mqNvxq`@"
    assert decode("_p~iF~ps|U_ulLnnqC_mqNvxq`@") == points
    assert encode([]) == ""
    assert decode("") == []


coords = st.tuples(st.floats(-90, 90, allow_nan=False), st.floats(-180, 180, allow_nan=False))


@settings(max_examples=300)
@given(st.lists(coords, max_size=30), st.sampled_from([5, 6]))
def test_polyline_roundtrip(points: list[tuple[float, float]], precision: int) -> None:
    encoded = encode(points, precision)
    decoded = decode(encoded, precision)
    assert len(decoded) == len(points)
    tol = 0.5 / 10**precision + 1e-9
    for (lat, lon), (dlat, dlon) in zip(points, decoded, strict=True):
        assert abs(lat - dlat) <= tol
        assert abs(lon - dlon) <= tol
    assert encode(decoded, precision) == encoded


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("_p~iF~ps|U_ulLnnqC_mqNvxq`", "truncated"),
        ("_p~iF", "odd number"),
        ("_p~iF ps|U", "invalid character ' ' at offset 5"),
        ("~~~~~~~~?", "too long"),
        ("_gsia@?", "out of range"),
    ],
)
def test_polyline_rejects_malformed_strings(bad: str, message: str) -> None:
    with pytest.raises(PolylineError, match=message):
        decode(bad)


def test_polyline_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="precision"):
        encode([(0.0, 0.0)], precision=9)
    with pytest.raises(ValueError, match="latitude"):
        encode([(95.0, 0.0)])


@given(
    st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(2100, 1, 1),
        timezones=st.just(UTC),
    ),
    st.floats(-90, 90),
    st.floats(-180, 180),
    st.one_of(st.none(), st.floats(0, 100)),
)
def test_a_trusted_fix_is_the_checked_fix(
    at: datetime, lat: float, lon: float, speed: float | None
) -> None:
    trusted = Fix.trusted(at, lat, lon, speed)
    checked = Fix(at, lat, lon, speed)
    assert trusted == checked
    assert trusted.t == checked.t
    assert repr(trusted) == repr(checked)
    assert copy.copy(trusted) == checked
