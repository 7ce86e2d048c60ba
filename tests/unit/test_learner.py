"""The learner's pure fold: order, batching, decay, memory bound, persistence (no I/O)."""

from __future__ import annotations

import itertools
import math
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.domain.geo import Fix, LocalProjection
from shared.domain.learner import (
    LearnerParams,
    LearnerState,
    build,
    fold,
    state_from_dict,
    state_to_dict,
)
from shared.domain.speeds import SpeedParams, learn_speeds

PROJ = LocalProjection(53.4, -2.98)
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def _drive(
    rng: random.Random, vehicle: str, start_s: float, n: int, step_s: float = 20.0
) -> list[tuple[str, Fix]]:
    """A vehicle wandering north-east at 5-12 m/s, one fix every `step_s`."""
    x, y = rng.uniform(-3000, 3000), rng.uniform(-3000, 3000)
    out = []
    for i in range(n):
        v = rng.uniform(5, 12)
        x += v * step_s * rng.uniform(0.2, 1.0)
        y += v * step_s * rng.uniform(-0.3, 0.8)
        at = T0 + timedelta(seconds=start_s + i * step_s + rng.uniform(-2, 2))
        out.append((vehicle, Fix(at, *PROJ.to_latlon(x, y))))
    return out


def _fleet(seed: int, vehicles: int = 4, n: int = 40) -> list[tuple[str, Fix]]:
    rng = random.Random(seed)
    points: list[tuple[str, Fix]] = []
    for k in range(vehicles):
        points.extend(_drive(rng, f"v{k}", rng.uniform(0, 600), n))
    return points


def _fold_all(
    batches: list[list[tuple[str, Fix]]], params: LearnerParams
) -> tuple[LearnerState, list[int]]:
    state = LearnerState()
    versions = []
    for batch in batches:
        state, snap = fold(state, batch, params)
        if snap is not None:
            versions.append(snap.version)
            assert snap.version == state.version
    return state, versions


def test_without_decay_it_learns_what_speed_learner_learns() -> None:
    points = _fleet(1)
    params = LearnerParams(half_life_s=1e15, settle_s=0.0, max_stop_s=1e9)
    state, _ = fold(LearnerState(), points, params)
    streamed = build(state, params)
    by_vehicle: dict[str, list[Fix]] = {}
    for vehicle, fix in points:
        by_vehicle.setdefault(vehicle, []).append(fix)
    offline = learn_speeds(by_vehicle.values(), SpeedParams())
    assert streamed.global_pace == pytest.approx(offline.global_pace, rel=1e-9)
    assert streamed.cell_dir_how_pace.keys() == offline.cell_dir_how_pace.keys()
    for key, pace in offline.cell_dir_how_pace.items():
        assert streamed.cell_dir_how_pace[key] == pytest.approx(pace, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(0, 160), max_size=6))
def test_batching_and_order_never_change_the_state(seed: int, cuts: list[int]) -> None:
    """Any split into batches, each shuffled, gives the identical state, as long as no
    point arrives after its tenant's clock passed it by settle_s."""
    points = sorted(_fleet(seed), key=lambda p: p[1].t)
    params = LearnerParams(settle_s=300.0, snapshot_every_s=300.0)
    whole, _ = _fold_all([points], params)
    rng = random.Random(seed)
    bounds = sorted({0, len(points), *(min(c, len(points)) for c in cuts)})
    batches = [points[a:b] for a, b in itertools.pairwise(bounds)]
    for batch in batches:
        rng.shuffle(batch)
    pieces, versions = _fold_all(batches, params)
    # A final empty fold flushes nothing more: both have learned up to the watermark.
    assert state_to_dict(pieces) == state_to_dict(whole)
    assert pieces.late_points == 0
    assert versions == sorted(set(versions))  # versions only advance


def test_late_points_are_counted_not_learned() -> None:
    params = LearnerParams(settle_s=60.0)
    points = sorted(_fleet(3, vehicles=1), key=lambda p: p[1].t)
    state, _ = fold(LearnerState(), points[10:], params)
    again, _ = fold(state, points[:2], params)
    assert again.late_points == 2
    assert again.points_learned == state.points_learned


def test_snapshot_version_is_the_boundary_and_learns_only_before_it() -> None:
    params = LearnerParams(settle_s=0.0, snapshot_every_s=300.0)
    points = sorted(_fleet(4), key=lambda p: p[1].t)
    state, snapshot = fold(LearnerState(), points, params)
    assert snapshot is not None
    assert snapshot.version % 300 == 0
    assert snapshot.trained_until == snapshot.version
    before = [p for p in points if p[1].t < snapshot.version]
    only, _ = fold(LearnerState(), before, params)
    expected = build(only, params, at=snapshot.version)
    assert snapshot.speeds.to_dict() == expected.to_dict()
    assert state.version == snapshot.version


def test_decay_halves_the_evidence_every_half_life() -> None:
    params = LearnerParams(half_life_s=3600.0, settle_s=0.0)
    state, _ = fold(LearnerState(), _fleet(5), params)
    assert state.clock is not None
    now = build(state, params, at=state.clock)
    later = build(state, params, at=state.clock + 3600.0)
    much_later = build(state, params, at=state.clock + 3 * 3600.0)
    assert later.observed_m == pytest.approx(now.observed_m / 2, rel=1e-12)
    assert much_later.observed_s == pytest.approx(now.observed_s / 8, rel=1e-12)


def test_recent_traffic_outweighs_old_traffic_by_the_half_life() -> None:
    """The same street driven slowly, then fast one half-life later: the learned pace
    is the space-mean of the two with the old run's weight halved."""
    speeds = SpeedParams(prior_m=1e-9, global_prior_m=1e-9)
    params = LearnerParams(half_life_s=86400.0, settle_s=0.0, speeds=speeds)

    def run(start_s: float, speed: float) -> list[tuple[str, Fix]]:
        return [
            ("v", Fix(T0 + timedelta(seconds=start_s + 10 * i), *PROJ.to_latlon(speed * 10 * i, 0)))
            for i in range(4)
        ]

    slow, fast = run(0, 4.0), run(86400.0, 8.0)
    state, _ = fold(LearnerState(), slow + fast, params)
    learned = build(state, params)
    # Each run lasts 30 s; the slow one covers 120 m with weight 1/2, the fast one 240 m.
    want = (0.5 * 30 + 30) / (0.5 * 120 + 240)
    assert learned.global_pace == pytest.approx(want, rel=1e-3)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), cap=st.integers(1, 30))
def test_memory_is_bounded_and_eviction_deterministic(seed: int, cap: int) -> None:
    params = LearnerParams(max_cells=cap, settle_s=0.0, speeds=SpeedParams(cell_m=100.0))
    points = _fleet(seed, vehicles=3, n=60)
    state = LearnerState()
    for k in range(0, len(points), 25):
        state, _ = fold(state, points[k : k + 25], params)
        assert len(state.cells) <= cap
        assert state.size <= cap * (1 + 8 + 8 * 168) + 168
    again = LearnerState()
    for k in range(0, len(points), 25):
        again, _ = fold(again, points[k : k + 25], params)
    assert state_to_dict(again) == state_to_dict(state)
    if cap < 10:
        assert state.evicted_cells > 0


def test_state_round_trips_through_its_dict() -> None:
    params = LearnerParams(settle_s=200.0)
    state, _ = fold(LearnerState(), _fleet(7), params)
    assert state.pending
    assert state.trails
    assert state_from_dict(state_to_dict(state)) == state


def test_fold_never_changes_the_state_it_was_given() -> None:
    params = LearnerParams(settle_s=0.0)
    points = sorted(_fleet(8), key=lambda p: p[1].t)
    state, _ = fold(LearnerState(), points[:80], params)
    frozen = state_to_dict(state)
    fold(state, points[80:], params)
    assert state_to_dict(state) == frozen


def test_many_half_lives_stay_finite() -> None:
    params = LearnerParams(half_life_s=60.0, settle_s=0.0)
    state = LearnerState()
    for day in range(3):  # 4320 half-lives: the anchor is rebased many times
        state, _ = fold(state, _drive(random.Random(day), "v", day * 86400.0, 20), params)
    speeds = build(state, params)
    assert math.isfinite(speeds.global_pace)
    assert speeds.observed_m > 0
