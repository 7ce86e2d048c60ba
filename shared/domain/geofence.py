"""Arrival detection around a destination: a pure, debounced geofence state machine.

``step(state, fix) -> (state, transition | None)``; the state is an immutable value, so
it can be stored with the shipment and replayed.

* Hysteresis: a vehicle *enters* within ``enter_radius_m`` and counts as inside until
  it is beyond the larger ``exit_radius_m``. Noise around either circle cannot flap:
  re-entering needs the vehicle back within the inner circle.
* Exit needs ``exit_confirm_points`` consecutive fixes beyond ``exit_radius_m``, so a
  single stray fix never exits.
* Fixes implying more than ``max_jump_mps`` from the last accepted fix are set aside;
  one is accepted only when the next fix agrees with it (then the old reference was
  the bad one). A lone jump changes nothing.
* ``ARRIVED`` needs both ``min_dwell_s`` since entering and ``min_points`` accepted
  fixes inside (a drive-by at speed is never an arrival).
* Fixes not newer than the last accepted one (late, out of order, duplicates) are
  ignored: the geofence follows the live position only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum

from shared.domain.geo import Fix, check_lat_lon, haversine_m


class GeofencePhase(StrEnum):
    OUTSIDE = "outside"
    INSIDE = "inside"  # entered, arrival not yet confirmed
    ARRIVED = "arrived"


class GeofenceTransition(StrEnum):
    ENTERED = "entered"
    ARRIVED = "arrived"
    LEFT = "left"  # exited before arrival was confirmed (a drive-by)
    DEPARTED = "departed"  # exited after arrival


@dataclass(frozen=True, slots=True)
class GeofenceConfig:
    """The destination and the thresholds; validated on construction."""

    lat: float
    lon: float
    enter_radius_m: float = 100.0
    exit_radius_m: float = 200.0
    min_dwell_s: float = 60.0
    min_points: int = 2
    exit_confirm_points: int = 2
    max_jump_mps: float = 60.0

    def __post_init__(self) -> None:
        check_lat_lon(self.lat, self.lon)
        if not (math.isfinite(self.enter_radius_m) and self.enter_radius_m > 0):
            raise ValueError("enter_radius_m must be a positive number")
        if not (math.isfinite(self.exit_radius_m) and self.exit_radius_m >= self.enter_radius_m):
            raise ValueError("exit_radius_m must be >= enter_radius_m (hysteresis)")
        if not (math.isfinite(self.min_dwell_s) and self.min_dwell_s >= 0):
            raise ValueError("min_dwell_s must be finite and >= 0")
        if self.min_points < 1 or self.exit_confirm_points < 1:
            raise ValueError("min_points and exit_confirm_points must be >= 1")
        if not (math.isfinite(self.max_jump_mps) and self.max_jump_mps > 0):
            raise ValueError("max_jump_mps must be a positive number")


_Point = tuple[float, float, float]  # (epoch seconds, lat, lon)


@dataclass(frozen=True, slots=True)
class GeofenceState:
    """Where the vehicle stands relative to one destination.

    ``entered_at`` (epoch seconds) is when the vehicle came within the enter radius —
    the arrival time once ``ARRIVED``; ``arrived_at`` is when the arrival was
    confirmed. Build the first state with :meth:`initial`.
    """

    config: GeofenceConfig
    phase: GeofencePhase = GeofencePhase.OUTSIDE
    entered_at: float | None = None
    arrived_at: float | None = None
    inside_points: int = 0
    outside_streak: int = 0
    last: _Point | None = None
    set_aside: _Point | None = None

    @classmethod
    def initial(cls, config: GeofenceConfig) -> GeofenceState:
        return cls(config)


def _plausible(a: _Point, b: _Point, max_mps: float) -> bool:
    dt = max(b[0] - a[0], 1.0)
    return haversine_m(a[1], a[2], b[1], b[2]) <= max_mps * dt


def step(state: GeofenceState, fix: Fix) -> tuple[GeofenceState, GeofenceTransition | None]:
    """Feed one fix; returns the new state and the transition it caused, if any.

    Total and pure: never raises for a valid ``Fix``, never mutates ``state``.
    """
    cfg = state.config
    point: _Point = (fix.t, fix.lat, fix.lon)
    if state.last is not None:
        if point[0] <= state.last[0]:
            return state, None
        if not _plausible(state.last, point, cfg.max_jump_mps):
            agrees = state.set_aside is not None and _plausible(
                state.set_aside, point, cfg.max_jump_mps
            )
            if not agrees:
                return replace(state, set_aside=point), None
    s = replace(state, last=point, set_aside=None)
    d = haversine_m(cfg.lat, cfg.lon, fix.lat, fix.lon)

    if s.phase is GeofencePhase.OUTSIDE:
        if d > cfg.enter_radius_m:
            return s, None
        s = replace(
            s, phase=GeofencePhase.INSIDE, entered_at=point[0], inside_points=1, outside_streak=0
        )
        arrived = _maybe_arrive(s, point[0])
        return (arrived, GeofenceTransition.ARRIVED) if arrived else (s, GeofenceTransition.ENTERED)

    if d <= cfg.exit_radius_m:
        s = replace(s, outside_streak=0, inside_points=s.inside_points + 1)
        if s.phase is GeofencePhase.INSIDE:
            arrived = _maybe_arrive(s, point[0])
            if arrived:
                return arrived, GeofenceTransition.ARRIVED
        return s, None

    streak = s.outside_streak + 1
    if streak < cfg.exit_confirm_points:
        return replace(s, outside_streak=streak), None
    transition = (
        GeofenceTransition.DEPARTED if s.phase is GeofencePhase.ARRIVED else GeofenceTransition.LEFT
    )
    return (
        replace(
            s,
            phase=GeofencePhase.OUTSIDE,
            entered_at=None,
            arrived_at=None,
            inside_points=0,
            outside_streak=0,
        ),
        transition,
    )


def _maybe_arrive(s: GeofenceState, t: float) -> GeofenceState | None:
    cfg = s.config
    assert s.entered_at is not None
    if t - s.entered_at >= cfg.min_dwell_s and s.inside_points >= cfg.min_points:
        return replace(s, phase=GeofencePhase.ARRIVED, arrived_at=t)
    return None
