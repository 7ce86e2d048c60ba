"""Geofence arrival detection: hysteresis, dwell, jumps, noise (pure, no I/O)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.domain.geo import Fix, LocalProjection
from shared.domain.geofence import (
    GeofenceConfig,
    GeofencePhase,
    GeofenceState,
    GeofenceTransition,
    step,
)

PROJ = LocalProjection(30.27, -97.74)
T0 = datetime(2016, 11, 24, 12, 0, tzinfo=UTC)
CFG = GeofenceConfig(30.27, -97.74)  # enter 100 m, exit 200 m, 60 s and 2 fixes


def fix(s: float, x: float, y: float = 0.0) -> Fix:
    return Fix(T0 + timedelta(seconds=s), *PROJ.to_latlon(x, y))


def run(
    fixes: Iterable[Fix], state: GeofenceState | None = None
) -> tuple[GeofenceState, list[GeofenceTransition]]:
    s = state or GeofenceState.initial(CFG)
    seen = []
    for f in fixes:
        s, tr = step(s, f)
        if tr is not None:
            seen.append(tr)
    return s, seen


def approach_and_park(park_s: float = 300, every: float = 10) -> list[Fix]:
    """Drive in from 1 km west at 10 m/s, then stand at the centre."""
    drive = [fix(i * every, -1000 + 10 * i * every) for i in range(int(100 / every) + 1)]
    t = drive[-1].t - T0.timestamp()
    return drive + [fix(t + every * i, 0) for i in range(1, int(park_s / every) + 1)]


def test_arrival_only_after_minimum_dwell() -> None:
    s = GeofenceState.initial(CFG)
    fixes = approach_and_park()
    transitions = []
    for f in fixes:
        s, tr = step(s, f)
        if tr is GeofenceTransition.ENTERED:
            entered = f.t
        if tr is GeofenceTransition.ARRIVED:
            assert f.t - entered >= CFG.min_dwell_s
        if tr is not None:
            transitions.append(tr)
    assert transitions == [GeofenceTransition.ENTERED, GeofenceTransition.ARRIVED]
    assert s.phase is GeofencePhase.ARRIVED
    assert s.entered_at == pytest.approx(entered)


def test_a_drive_through_is_not_an_arrival() -> None:
    through = [fix(5 * i, -1000 + 15 * 5 * i) for i in range(30)]  # 15 m/s straight through
    state, transitions = run(through)
    assert transitions == [GeofenceTransition.ENTERED, GeofenceTransition.LEFT]
    assert state.phase is GeofencePhase.OUTSIDE


def test_sparse_sampling_needs_two_fixes_inside() -> None:
    state, transitions = run([fix(0, -2000), fix(240, 30)])
    assert transitions == [GeofenceTransition.ENTERED]
    state, transitions = run([fix(480, 10)], state)
    assert transitions == [GeofenceTransition.ARRIVED]


def test_no_flapping_with_noise_at_the_enter_boundary() -> None:
    rng = random.Random(3)
    noisy = [fix(10 * i, 100 + rng.uniform(-25, 25), rng.uniform(-25, 25)) for i in range(200)]
    _, transitions = run(noisy)
    assert transitions == [GeofenceTransition.ENTERED, GeofenceTransition.ARRIVED]


def test_no_flapping_with_noise_at_the_exit_boundary() -> None:
    rng = random.Random(4)
    arrived, _ = run(approach_and_park())
    t = arrived.last[0] - T0.timestamp() if arrived.last else 0.0
    hovering = [
        fix(t + 10 * i, 200 + rng.uniform(-25, 25), rng.uniform(-10, 10)) for i in range(1, 200)
    ]
    _, transitions = run(hovering, arrived)
    assert transitions in ([], [GeofenceTransition.DEPARTED])


def test_a_single_jump_does_not_exit() -> None:
    arrived, _ = run(approach_and_park())
    assert arrived.phase is GeofencePhase.ARRIVED
    t = arrived.last[0] - T0.timestamp() if arrived.last else 0.0
    # A 5 km jump (implausible speed), then back: nothing happens.
    _, transitions = run([fix(t + 10, 5000), fix(t + 20, 5)], arrived)
    assert transitions == []
    # A plausible single stray fix beyond the exit radius: still nothing.
    _, transitions = run([fix(t + 30, 300), fix(t + 40, 0)], arrived)
    assert transitions == []
    # Two consecutive fixes beyond it: departed.
    _, transitions = run([fix(t + 30, 300), fix(t + 60, 600)], arrived)
    assert transitions == [GeofenceTransition.DEPARTED]


def test_a_jump_confirmed_by_the_next_fix_is_accepted() -> None:
    state, _ = run([fix(0, -3000)])
    state, transitions = run([fix(10, 0), fix(20, 5)], state)  # 300 m/s, then agreeing
    assert transitions == [GeofenceTransition.ENTERED]


def test_out_of_order_and_duplicate_fixes_are_ignored() -> None:
    fixes = approach_and_park()
    state, _ = run(fixes)
    late = fix(50, 5000)
    assert step(state, late) == (state, None)
    assert step(state, fixes[-1]) == (state, None)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 400), st.floats(-30, 30)), min_size=1, max_size=60))
def test_transitions_always_follow_the_state_machine(path: list[tuple[float, float]]) -> None:
    allowed = {
        GeofencePhase.OUTSIDE: {GeofenceTransition.ENTERED, GeofenceTransition.ARRIVED},
        GeofencePhase.INSIDE: {GeofenceTransition.ARRIVED, GeofenceTransition.LEFT},
        GeofencePhase.ARRIVED: {GeofenceTransition.DEPARTED},
    }
    s = GeofenceState.initial(CFG)
    for i, (x, y) in enumerate(path):
        before = s.phase
        s, tr = step(s, fix(15 * i, x, y))
        if tr is not None:
            assert tr in allowed[before]
        if s.phase is GeofencePhase.ARRIVED:
            assert s.entered_at is not None
            assert s.arrived_at is not None
            assert s.arrived_at - s.entered_at >= CFG.min_dwell_s


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        GeofenceConfig(0, 0, enter_radius_m=200, exit_radius_m=100)
    with pytest.raises(ValueError, match="min_points"):
        GeofenceConfig(0, 0, min_points=0)
    with pytest.raises(ValueError, match="latitude"):
        GeofenceConfig(91, 0)
