"""The optimised ETA model gives exactly the estimates of the reference implementation.

``bench/eta_reference`` is the model as it was before its hot path was optimised
(projection memo on the fixes, closed-form travel time, compact per-route tables).
Seeded random scenarios (routes that bend, double back on themselves or cross
themselves; noisy, jumping, shuffled, off-route and partly future tracks; learned
speeds in several time zones; varied parameters, stops and destinations) run through
both models with each model's previous estimate fed back, the same ``Fix`` objects
passed again as the window slides with the vehicle's ``TrackMemo``, as the projector
does. Every field of every
estimate must be equal, bit for bit: the new code does the same floating-point
operations in the same order (see ``EtaModel._travel``), so no tolerance is needed.
"""

from __future__ import annotations

import dataclasses
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from bench.eta_reference import eta as ref_eta
from bench.eta_reference import geo as ref_geo
from bench.eta_reference import speeds as ref_speeds
from shared.domain.eta import EtaModel, EtaParams, Stop
from shared.domain.geo import Fix, LatLon, LocalProjection, Route, TrackMemo
from shared.domain.speeds import HistoricalSpeeds, SpeedParams, learn_speeds

PROJ = LocalProjection(51.5, -0.1)
T0 = datetime(2026, 3, 6, 22, 17, 31, tzinfo=UTC)  # a Friday night: hours and days turn


#: The reference estimate's fields: every one is compared. (The production estimate
#: also says which model version produced it, `model_version`, which the reference
#: predates; it is 0 here, as for any model built without a version.)
_REFERENCE_FIELDS = tuple(f.name for f in dataclasses.fields(ref_eta.EtaEstimate))


def _plain(estimate: Any) -> tuple[Any, ...] | None:
    """An estimate's reference fields as plain values (the two models' classes differ)."""
    if estimate is None:
        return None
    return tuple(
        v.value if hasattr(v, "value") else v
        for v in (getattr(estimate, name) for name in _REFERENCE_FIELDS)
    )


def _route_xy(rng: random.Random) -> list[tuple[float, float]]:
    """Route vertices in local metres: straight, bent, out-and-back or self-crossing."""
    kind = rng.choice(["straight", "walk", "back", "cross"])
    x, y = rng.uniform(-3000, 3000), rng.uniform(-3000, 3000)
    if kind == "straight":
        h = rng.uniform(0, 2 * math.pi)
        d = rng.uniform(2000, 40_000)
        return [(x, y), (x + d * math.sin(h), y + d * math.cos(h))]
    if kind == "back":
        # Along a street and back on the other carriageway (or the same line).
        d, gap = rng.uniform(1500, 8000), rng.choice([0.0, 12.0, 40.0])
        return [(x, y), (x + d, y), (x + d, y + gap), (x, y + gap)]
    pts = [(x, y)]
    h = rng.uniform(0, 2 * math.pi)
    turn = 2.6 if kind == "cross" else 0.9
    for _ in range(rng.randint(3, 25)):
        h += rng.uniform(-turn, turn)
        d = rng.uniform(150, 3000)
        x, y = x + d * math.sin(h), y + d * math.cos(h)
        pts.append((x, y))
    return pts


def _latlon(xy: tuple[float, float]) -> LatLon:
    return PROJ.to_latlon(*xy)


def _trip(rng: random.Random, route: Route, start: datetime) -> list[Fix]:
    """A vehicle's fixes along ``route`` (time order), with noise, jumps and detours."""
    every = rng.choice([1.0, 1.0, 5.0, 15.0, 30.0])
    speed = rng.uniform(0.3, 25.0)
    noise = rng.choice([0.0, 3.0, 10.0, 40.0])
    along = rng.uniform(-200.0, route.length_m * 0.7)
    detour_from = rng.randint(0, 200) if rng.random() < 0.3 else -1
    detour_len = rng.randint(1, 40)
    count = rng.randint(2, 160)
    fixes = []
    for i in range(count):
        along += speed * every * rng.uniform(0.0, 2.0)
        lat, lon = route.point_at(along)
        x, y = PROJ.to_xy(lat, lon)
        x += rng.gauss(0, noise)
        y += rng.gauss(0, noise)
        if detour_from <= i < detour_from + detour_len:
            y += rng.choice([80.0, 200.0, 600.0])
        if rng.random() < 0.03:
            x += rng.uniform(-5000, 5000)  # a GPS jump
        at = start + timedelta(seconds=i * every + rng.choice([0.0, 0.0, 0.25]))
        reported = rng.choice([None, speed, speed * rng.uniform(0.0, 3.0)])
        fixes.append(Fix(at, *_latlon((x, y)), reported))
        if rng.random() < 0.02:
            fixes.append(Fix(at, *_latlon((x + 1.0, y)), None))  # same time, elsewhere
    return fixes


def _speeds(rng: random.Random, routes: list[Route]) -> HistoricalSpeeds:
    kind = rng.choice(["empty", "learned", "learned_tz"])
    if kind == "empty":
        return HistoricalSpeeds.empty(SpeedParams(default_speed_mps=rng.choice([8.0, 12.0])))
    zone = "UTC" if kind == "learned" else rng.choice(["Asia/Kolkata", "America/New_York"])
    params = SpeedParams(
        timezone=zone,
        cell_m=rng.choice([150.0, 300.0]),
        sectors=rng.choice([4, 8]),
        area_cells=0,  # the reference predates the area level
    )
    traces = []
    for route in routes:
        for h in range(rng.randint(1, 4)):
            traces.append(_trip(rng, route, T0 - timedelta(hours=h * rng.uniform(1, 30))))
    return learn_speeds(traces, params)


def reference_speeds(speeds: HistoricalSpeeds) -> ref_speeds.HistoricalSpeeds:
    """The same speeds for the reference, which predates the area level: only
    models without areas can be compared."""
    data = speeds.to_dict()
    assert not data.pop("area_pace"), "the reference has no area level"
    data["params"] = {
        k: v for k, v in data["params"].items() if k in ref_speeds.SpeedParams.__dataclass_fields__
    }
    return ref_speeds.HistoricalSpeeds.from_dict(data)


def _params(rng: random.Random) -> EtaParams:
    return EtaParams(
        step_m=rng.choice([50.0, 100.0, 100.0, 333.0]),
        persist_m=rng.choice([300.0, 1000.0, 5000.0]),
        window_s=rng.choice([300.0, 600.0]),
        off_route_confirm=rng.choice([1, 2, 3]),
        min_span_s=rng.choice([30.0, 60.0]),
        # The reference predates these two: the great circle whenever off route, and the
        # destination's nearest point on the route whatever the vehicle's position.
        route_eta_max_offset_m=0.0,
        destination_ahead=False,
    )


def _scenario(seed: int) -> int:
    """Runs one scenario; returns how many estimates were compared."""
    rng = random.Random(seed)
    xys = [_route_xy(rng) for _ in range(2)]
    new_routes = [Route([_latlon(p) for p in xy]) for xy in xys]
    ref_routes = [ref_geo.Route([_latlon(p) for p in xy]) for xy in xys]
    speeds = _speeds(rng, new_routes)
    params = _params(rng)
    new_model = EtaModel(speeds, params)
    ref_model = ref_eta.EtaModel(
        reference_speeds(speeds),
        ref_eta.EtaParams(
            **{f: getattr(params, f) for f in ref_eta.EtaParams.__dataclass_fields__}
        ),
    )
    fixes = _trip(rng, new_routes[0], T0)
    dest_route = rng.randrange(2)
    d = new_routes[dest_route].length_m * rng.uniform(0.3, 1.1)
    dx, dy = PROJ.to_xy(*new_routes[dest_route].point_at(d))
    destination = _latlon((dx + rng.choice([0.0, 20.0, 300.0]), dy))
    stops = [
        Stop(rng.uniform(0, new_routes[0].length_m), rng.choice([0.0, 60.0, 900.0]))
        for _ in range(rng.randint(0, 3))
    ]
    ref_stops = [ref_eta.Stop(s.distance_along_m, s.dwell_s) for s in stops]
    new_prev: Any = None
    ref_prev: Any = None
    # The vehicle's memo, kept across calls and trimmed to the track as the projector's
    # track cache does: it must never change an estimate.
    memo = TrackMemo()
    compared = 0
    hi = 0
    while hi < len(fixes):
        hi = min(len(fixes), hi + rng.randint(1, 60))  # the window slides
        newest = fixes[hi - 1]
        lo = 0
        while fixes[lo].t < newest.t - params.window_s - rng.choice([0.0, 30.0]):
            lo += 1
        window = fixes[lo : hi + rng.choice([0, 0, 0, 3])]  # sometimes fixes from later
        if rng.random() < 0.2:
            window = rng.sample(window, len(window))  # any order
        if rng.random() < 0.1:
            window = window + window[: rng.randint(0, 3)]  # duplicates
        now = newest.at + timedelta(seconds=rng.choice([0.0, 0.0, 5.0, 400.0]))
        which = 0 if rng.random() < 0.85 else 1  # another route for the same fixes
        use_route = rng.random() < 0.9
        kw: dict[str, Any] = {"now": now, "destination": destination, "positions": window}
        new = new_model.estimate(
            **kw,
            route=new_routes[which] if use_route else None,
            stops=stops,
            previous=new_prev,
            memo=memo,
        )
        memo.retain(fixes[lo:hi])
        ref = ref_model.estimate(
            **kw,
            route=ref_routes[which] if use_route else None,
            stops=ref_stops,
            previous=ref_prev,
        )
        assert _plain(new) == _plain(ref), f"seed {seed}, call {compared}"
        compared += 1
        if new is not None:
            new_prev, ref_prev = new, ref
    return compared


@pytest.mark.parametrize("block", range(4))
def test_estimates_equal_the_reference_implementation(block: int) -> None:
    compared = sum(_scenario(seed) for seed in range(block * 40, block * 40 + 40))
    assert compared > 40


def test_project_fixes_equals_project_track_with_any_hint() -> None:
    rng = random.Random(5)
    for _ in range(150):
        xy = _route_xy(rng)
        new = Route([_latlon(p) for p in xy])
        ref = ref_geo.Route([_latlon(p) for p in xy])
        fixes = _trip(rng, new, T0)
        memo = TrackMemo()
        for _ in range(3):
            lo = rng.randrange(len(fixes))
            part = fixes[lo : lo + rng.randint(1, 80)]
            hint = rng.choice([None, rng.uniform(-100, new.length_m + 100)])
            want = ref.project_track([f.lat for f in part], [f.lon for f in part], near_m=hint)
            alongs, offsets = new.project_fixes(part, near_m=hint, memo=memo)
            assert alongs == [p.distance_along_m for p in want]
            assert offsets == [p.offset_m for p in want]


def test_cumsum_is_the_sequential_sum() -> None:
    """`EtaModel._travel` relies on numpy's cumulative sum adding strictly in order."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        terms = rng.uniform(0, 100, rng.integers(1, 3000)) * rng.uniform(0.01, 2)
        t = 1.77e9 + rng.uniform(0, 1e6)
        running = np.cumsum(np.concatenate([[t], terms])).tolist()
        expected = [t]
        for term in terms.tolist():
            t += term
            expected.append(t)
        assert running == expected
