"""Estimated time of arrival from a vehicle's recent positions, and delay conditions.

Pure and I/O-free. See docs/eta.md for the model, its parameters and its measured
accuracy. In short:

* Positions are cleaned (:func:`~shared.domain.geo.clean_track`: sorted by time, exact
  duplicates and isolated jumps above ``max_jump_mps`` dropped), so the estimate is the
  same for any order of the same fixes, and a late, older fix never moves the vehicle
  back: progress is measured at the newest fix.
* **route** method, when a route is given and the vehicle is on it: remaining distance
  along the route from the newest fix's projection to the destination's projection,
  travelled at learned historical paces (per grid cell, heading and hour of week; see
  :mod:`shared.domain.speeds`), scaled by how much faster or slower than history the
  vehicle progressed along the route over the last ``window_s``. That ratio is clamped
  (a stopped vehicle keeps a finite ETA), shrunk toward 1 by how long it was observed,
  and fades out over ``persist_m`` ahead (today's delay is local). Dwell of the stops
  still ahead is added.
* **great_circle** method, without a route or when off route (``off_route_confirm``
  fixes beyond ``off_route_m``; back on only within ``back_on_route_m``: hysteresis):
  great-circle distance × ``detour_factor`` at the same blended speeds.
* The arrival is anchored at the newest fix's time and never before ``now``; the
  interval widens with remaining travel time, with the position's age, for the
  great-circle method and when nothing was observed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from weakref import WeakKeyDictionary

import numpy as np

from bench.eta_reference.geo import (
    Fix,
    LatLon,
    Route,
    RoutePosition,
    RouteSamples,
    bearing_deg,
    check_lat_lon,
    clean_track,
    haversine_m,
)
from bench.eta_reference.speeds import CellKey, HistoricalSpeeds, hour_of_week


class EtaMethod(StrEnum):
    ROUTE = "route"
    GREAT_CIRCLE = "great_circle"


@dataclass(frozen=True, slots=True)
class Stop:
    """An intermediate stop on the route: where it is along the route and its dwell."""

    distance_along_m: float
    dwell_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.distance_along_m) and self.distance_along_m >= 0):
            raise ValueError("Stop.distance_along_m must be finite and >= 0")
        if not (math.isfinite(self.dwell_s) and self.dwell_s >= 0):
            raise ValueError("Stop.dwell_s must be finite and >= 0")


@dataclass(frozen=True, slots=True)
class EtaParams:
    """Every knob of :class:`EtaModel`; the defaults are the documented ones."""

    off_route_m: float = 150.0
    back_on_route_m: float = 75.0
    off_route_confirm: int = 2
    detour_factor: float = 1.3
    window_s: float = 600.0
    min_span_s: float = 60.0
    obs_tau_s: float = 300.0
    ratio_min: float = 0.5
    ratio_max: float = 2.0
    persist_m: float = 1000.0
    reported_speed_weight: float = 0.2
    max_jump_mps: float = 60.0
    arrive_radius_m: float = 50.0
    stop_radius_m: float = 50.0
    step_m: float = 100.0
    future_tolerance_s: float = 300.0
    base_spread_s: float = 120.0
    rel_spread_route: float = 0.25
    rel_spread_great_circle: float = 0.4
    rel_spread_unobserved: float = 0.1
    age_spread: float = 0.5
    early_share: float = 0.6
    confidence_horizon_s: float = 600.0

    def __post_init__(self) -> None:
        for name in EtaParams.__dataclass_fields__:
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"EtaParams.{name} must be finite and >= 0, got {v!r}")
        if self.back_on_route_m > self.off_route_m:
            raise ValueError("back_on_route_m must not exceed off_route_m (hysteresis)")
        if not 0 < self.ratio_min <= 1 <= self.ratio_max:
            raise ValueError("need 0 < ratio_min <= 1 <= ratio_max")
        if self.detour_factor < 1 or self.step_m <= 0 or self.persist_m <= 0:
            raise ValueError("need detour_factor >= 1, step_m > 0, persist_m > 0")
        if self.off_route_confirm < 1:
            raise ValueError("off_route_confirm must be >= 1")


@dataclass(frozen=True, slots=True)
class EtaEstimate:
    """One ETA. Times are UTC; ``earliest <= arrival <= latest``; ``now <= earliest``.

    ``remaining_m`` is along the route (method ``route``) or great-circle × detour
    (``great_circle``). ``speed_ratio`` is the blended observed/historical speed ratio
    applied next to the vehicle (1 = as history). ``distance_along_m``/``offset_m`` are
    the newest fix's projection when a route was given (also when off route).
    """

    arrival: datetime
    earliest: datetime
    latest: datetime
    confidence: float
    method: EtaMethod
    remaining_m: float
    position_age_s: float
    position_at: datetime
    travel_s: float
    dwell_s: float
    observed_speed_mps: float | None
    speed_ratio: float
    off_route: bool
    distance_along_m: float | None
    offset_m: float | None


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _check_aware(name: str, value: datetime) -> float:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value.timestamp()


@dataclass(frozen=True, slots=True)
class _Ratio:
    """The log of the observed/historical speed ratio next to the vehicle, fading to
    0 (history as is) over ``persist_m`` ahead; with ``fade=False`` it never fades."""

    log: float = 0.0
    persist_m: float = 1.0
    fade: bool = True

    def pace_factor(self, x: float) -> float:
        """Multiplier on the historical pace ``x`` metres ahead of the vehicle."""
        if not self.fade:
            return math.exp(-self.log)
        return math.exp(-self.log * math.exp(-x / self.persist_m))

    @property
    def neutral(self) -> bool:
        return self.log == 0.0


class EtaModel:
    """Computes :class:`EtaEstimate` values; holds learned speeds and parameters.

    ``estimate`` is a pure function of its arguments (a per-route cache of grid-cell
    keys is the only internal state and never changes a result).
    """

    def __init__(
        self, speeds: HistoricalSpeeds | None = None, params: EtaParams | None = None
    ) -> None:
        self.speeds = speeds or HistoricalSpeeds.empty()
        self.params = params or EtaParams()
        self._informative = self.speeds.observed_m > 0
        self._route_keys: WeakKeyDictionary[Route, list[tuple[CellKey, int]]] = WeakKeyDictionary()

    # -- public ---------------------------------------------------------------------

    def estimate(
        self,
        *,
        now: datetime,
        destination: LatLon,
        positions: Sequence[Fix],
        route: Route | None = None,
        stops: Sequence[Stop] = (),
        previous: EtaEstimate | None = None,
    ) -> EtaEstimate | None:
        """The ETA at ``now`` to ``destination``, or ``None`` without a usable position.

        ``positions`` are the vehicle's recent fixes in any order; only the last
        ``window_s`` before the newest matter, and fixes more than
        ``future_tolerance_s`` after ``now`` are ignored. ``route`` is the planned
        route (the destination is projected onto it; it may extend past it). ``stops``
        are intermediate stops along ``route`` (ignored without one); a stop at or past
        the destination adds nothing. ``previous`` (the last estimate for the same
        shipment, if any) carries the off-route state and the position along the route.
        Raises ``ValueError`` for a naive ``now`` or an invalid destination.
        """
        p = self.params
        t_now = _check_aware("now", now)
        check_lat_lon(*destination)
        usable = [f for f in positions if f.t <= t_now + p.future_tolerance_s]
        track = clean_track(usable, p.max_jump_mps)
        if not track:
            return None
        newest = track[-1]
        window = [f for f in track if f.t >= newest.t - p.window_s]
        anchor = min(newest.t, t_now)
        if route is not None:
            return self._along_route(t_now, anchor, destination, window, route, stops, previous)
        return self._great_circle(t_now, anchor, destination, window, None, 0.0)

    # -- route ----------------------------------------------------------------------

    def _along_route(
        self,
        t_now: float,
        anchor: float,
        dest: LatLon,
        window: list[Fix],
        route: Route,
        stops: Sequence[Stop],
        previous: EtaEstimate | None,
    ) -> EtaEstimate:
        p = self.params
        newest = window[-1]
        hint = previous.distance_along_m if previous is not None else None
        positions = route.project_track(
            [f.lat for f in window], [f.lon for f in window], near_m=hint
        )
        projected: list[tuple[Fix, RoutePosition]] = list(zip(window, positions, strict=True))
        off = previous.off_route if previous is not None else False
        streak = 0
        for _, rp in projected:
            if off:
                if rp.offset_m <= p.back_on_route_m:
                    off, streak = False, 0
            elif rp.offset_m > p.off_route_m:
                streak += 1
                if streak >= p.off_route_confirm:
                    off = True
            else:
                streak = 0
        if previous is None and streak == len(projected):
            off = True  # every fix we have is far from the route
        rp_n = projected[-1][1]
        dest_rp = route.project(*dest)
        dest_along = dest_rp.distance_along_m
        if off:
            dwell = self._stops_ahead(stops, rp_n.distance_along_m, dest_along, projected)
            return self._great_circle(t_now, anchor, dest, window, rp_n, dwell)

        along_n = rp_n.distance_along_m
        samples = route.samples(p.step_m)
        keys = self._keys_for(route)
        off_s = self.speeds.utc_offset_s(anchor)

        # Observed progress: earliest on-route fix of the window to the newest.
        ln_r, v_obs, observed = 0.0, None, False
        first = next(((f, rp) for f, rp in projected if rp.offset_m <= p.off_route_m), None)
        if first is not None and newest.t - first[0].t >= p.min_span_s:
            f0, along0 = first[0], first[1].distance_along_m
            span = newest.t - f0.t
            progress = max(0.0, along_n - along0)
            if progress / span <= p.max_jump_mps:
                v_obs = progress / span
                hist = self._route_time(samples, keys, along0, along_n, f0.t, off_s, _Ratio())
                ln_r = self._blend(hist / span if progress > 0 else 0.0, span)
                observed = True
        if not observed:
            ln_r = self._reported(window, None)
        ratio = _Ratio(ln_r, p.persist_m, self._informative)

        if along_n < dest_along:
            remaining = dest_along - along_n + dest_rp.offset_m
        else:
            remaining = haversine_m(newest.lat, newest.lon, *dest)
        if remaining <= p.arrive_radius_m:
            travel = 0.0
        else:
            travel = self._route_time(samples, keys, along_n, dest_along, anchor, off_s, ratio)
            travel += dest_rp.offset_m * self.speeds.global_pace
        dwell = self._stops_ahead(stops, along_n, dest_along, projected)
        return self._finish(
            t_now, anchor, newest, EtaMethod.ROUTE, remaining, travel, dwell,
            v_obs, ln_r, observed, False, rp_n,
        )  # fmt: skip

    def _keys_for(self, route: Route) -> list[tuple[CellKey, int]]:
        keys = self._route_keys.get(route)
        if keys is None:
            s = route.samples(self.params.step_m)
            keys = self.speeds.piece_keys(s.lat, s.lon, s.heading_deg)
            self._route_keys[route] = keys
        return keys

    def _route_time(
        self,
        samples: RouteSamples,
        keys: list[tuple[CellKey, int]],
        a: float,
        b: float,
        t0: float,
        off_s: float,
        ratio: _Ratio,
    ) -> float:
        """Seconds to travel the route from ``a`` to ``b`` (metres along) from ``t0``."""
        if b <= a:
            return 0.0
        step = samples.step_m
        n = len(keys)
        i0 = min(int(a // step), n - 1)
        i1 = min(int(b // step), n - 1)
        t = t0
        # The pieces' bounds as Python floats in one conversion (indexing numpy arrays
        # one scalar at a time cost more than the arithmetic); same values, same order.
        starts = samples.start_m[i0 : i1 + 1]
        ends = (starts + samples.length_m[i0 : i1 + 1]).tolist()
        pace_of = self.speeds.pace
        neutral = ratio.neutral
        for i, start, end in zip(range(i0, i1 + 1), starts.tolist(), ends, strict=True):
            s = max(a, start)
            e = min(b, end)
            if e <= s:
                continue
            cell, sector = keys[i]
            pace = pace_of(cell, sector, hour_of_week(t, off_s))
            if not neutral:
                pace *= ratio.pace_factor((s + e) / 2 - a)
            t += (e - s) * pace
        return t - t0

    def _blend(self, ratio: float, span: float) -> float:
        """Log of an observed/historical speed ratio, clamped and shrunk toward 1.

        Without learned history the default speed is only a guess, so the observation
        is trusted fully, within the plausible speed range.
        """
        p = self.params
        if self._informative:
            r = min(max(ratio, p.ratio_min), p.ratio_max)
            return span / (span + p.obs_tau_s) * math.log(r)
        sp = self.speeds.params
        lo = max(self.params.ratio_min, sp.min_speed_mps * self.speeds.global_pace)
        hi = sp.max_speed_mps * self.speeds.global_pace
        return math.log(min(max(ratio, lo), hi))

    def _reported(self, window: list[Fix], hist_pace: float | None) -> float:
        """Weak ratio from device-reported speeds when progress could not be observed."""
        speeds = [f.speed_mps for f in window if f.speed_mps is not None]
        if not speeds:
            return 0.0
        p = self.params
        pace = hist_pace if hist_pace is not None else self.speeds.global_pace
        r = min(max(float(np.mean(speeds)) * pace, p.ratio_min), p.ratio_max)
        return p.reported_speed_weight * math.log(r)

    def _stops_ahead(
        self,
        stops: Sequence[Stop],
        along: float,
        dest_along: float,
        projected: list[tuple[Fix, RoutePosition]],
    ) -> float:
        radius = self.params.stop_radius_m
        total = 0.0
        newest_t = projected[-1][0].t
        for s in stops:
            if s.distance_along_m >= dest_along - radius:
                continue
            if s.distance_along_m > along + radius:
                total += s.dwell_s
            elif abs(s.distance_along_m - along) <= radius:
                # At the stop now: only what is left of its dwell.
                since = newest_t
                for f, rp in reversed(projected):
                    if abs(rp.distance_along_m - s.distance_along_m) > radius:
                        break
                    since = f.t
                total += max(0.0, s.dwell_s - (newest_t - since))
        return total

    # -- great circle ---------------------------------------------------------------

    def _great_circle(
        self,
        t_now: float,
        anchor: float,
        dest: LatLon,
        window: list[Fix],
        rp_n: RoutePosition | None,
        dwell: float,
    ) -> EtaEstimate:
        p = self.params
        newest = window[-1]
        d_gc = haversine_m(newest.lat, newest.lon, *dest)
        remaining = d_gc * p.detour_factor if d_gc > p.arrive_radius_m else d_gc
        off_s = self.speeds.utc_offset_s(anchor)
        base = self._line_time(newest, dest, remaining, anchor, off_s, _Ratio())
        hist_pace = base / remaining if remaining > 0 else self.speeds.global_pace

        # Observed closing speed toward the destination, detour-scaled like remaining.
        ln_r, v_obs, observed = 0.0, None, False
        first = window[0]
        span = newest.t - first.t
        if span >= p.min_span_s:
            closing = (haversine_m(first.lat, first.lon, *dest) - d_gc) * p.detour_factor
            if closing / span <= p.max_jump_mps * p.detour_factor:
                v_obs = max(0.0, closing) / span
                ln_r = self._blend(v_obs * hist_pace, span)
                observed = True
        if not observed:
            ln_r = self._reported(window, hist_pace)
        ratio = _Ratio(ln_r, p.persist_m, self._informative)
        if d_gc <= p.arrive_radius_m:
            travel = 0.0
        elif ratio.neutral:
            travel = base
        else:
            travel = self._line_time(newest, dest, remaining, anchor, off_s, ratio)
        return self._finish(
            t_now, anchor, newest, EtaMethod.GREAT_CIRCLE, remaining, travel, dwell,
            v_obs, ln_r, observed, rp_n is not None, rp_n,
        )  # fmt: skip

    def _line_time(
        self, start: Fix, dest: LatLon, length: float, t0: float, off_s: float, ratio: _Ratio
    ) -> float:
        """Seconds to travel ``length`` metres on the straight line start → dest."""
        if length <= 0:
            return 0.0
        step = self.params.step_m
        n = max(1, math.ceil(length / step))
        f = (np.arange(n, dtype=np.float64) + 0.5) / n
        lats = start.lat + (dest[0] - start.lat) * f
        lons = start.lon + (dest[1] - start.lon) * f
        heading = bearing_deg(start.lat, start.lon, *dest)
        keys = self.speeds.piece_keys(lats, lons, np.full(n, heading))
        piece = length / n
        t = t0
        for i, (cell, sector) in enumerate(keys):
            pace = self.speeds.pace(cell, sector, hour_of_week(t, off_s))
            if not ratio.neutral:
                pace *= ratio.pace_factor((i + 0.5) * piece)
            t += piece * pace
        return t - t0

    # -- common ---------------------------------------------------------------------

    def _finish(
        self,
        t_now: float,
        anchor: float,
        newest: Fix,
        method: EtaMethod,
        remaining: float,
        travel: float,
        dwell: float,
        v_obs: float | None,
        ln_r: float,
        observed: bool,
        off_route: bool,
        rp: RoutePosition | None,
    ) -> EtaEstimate:
        p = self.params
        age = max(0.0, t_now - newest.t)
        total = travel + dwell
        arrival = max(t_now, anchor + total)
        rel = p.rel_spread_route if method is EtaMethod.ROUTE else p.rel_spread_great_circle
        if not observed:
            rel += p.rel_spread_unobserved
        spread = p.base_spread_s + rel * total + p.age_spread * age
        earliest = max(t_now, arrival - p.early_share * spread)
        latest = arrival + spread
        horizon = max(total, p.confidence_horizon_s)
        return EtaEstimate(
            arrival=_utc(arrival),
            earliest=_utc(earliest),
            latest=_utc(latest),
            confidence=horizon / (horizon + spread),
            method=method,
            remaining_m=remaining,
            position_age_s=age,
            position_at=newest.at.astimezone(UTC),
            travel_s=travel,
            dwell_s=dwell,
            observed_speed_mps=v_obs,
            speed_ratio=math.exp(ln_r),
            off_route=off_route,
            distance_along_m=None if rp is None else rp.distance_along_m,
            offset_m=None if rp is None else rp.offset_m,
        )
