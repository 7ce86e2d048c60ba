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
  fixes beyond ``off_route_m``; back on only within ``back_on_route_m``: hysteresis)
  and the newest fix is more than ``route_eta_max_offset_m`` from the route:
  great-circle distance × ``detour_factor`` at the same blended speeds. Closer than
  that, an off-route vehicle (``off_route`` is set) keeps the route method.
* The arrival is anchored at the newest fix's time and never before ``now``; the
  interval widens with remaining travel time, with the position's age, for the
  great-circle method and when nothing was observed.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from operator import attrgetter
from statistics import NormalDist
from weakref import WeakKeyDictionary

import numpy as np
import numpy.typing as npt

from shared.domain.geo import (
    Fix,
    FloatArray,
    LatLon,
    Route,
    RoutePosition,
    TrackMemo,
    bearing_deg,
    check_lat_lon,
    clean_track,
    haversine_m,
)
from shared.domain.speeds import HistoricalSpeeds, PiecePaces, hour_of_week

#: How far from the destination a vehicle past the destination's nearest point on the
#: route must be before a later pass of the route is taken as the destination (see
#: `EtaParams.destination_ahead`): the geofence's exit radius (`geofence.py`).
LEFT_DESTINATION_M = 200.0


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
    #: While off route, the ETA still follows the route as long as the newest fix is
    #: within this distance of it (a parallel street, a route variant); the great
    #: circle only beyond it. 0 (or anything up to back_on_route_m): the great circle
    #: whenever off route. Chosen on eta-eval's validation split (docs/eta.md).
    route_eta_max_offset_m: float = 600.0
    #: When the vehicle is already past the destination's nearest point on the route
    #: and the route passes the destination again ahead, aim for that pass (False:
    #: always the nearest point, as before). Chosen on eta-eval's validation split.
    destination_ahead: bool = True
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
    #: The version of the learned speed model that produced it (0: no learned version:
    #: the fleet average, or the default speed). See docs/eta.md, "The learner".
    model_version: int = 0


_T: Callable[[Fix], float] = attrgetter("t")


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

    ``estimate`` is a pure function of its arguments. Memos never change a result:

    * per route, with learned per-cell speeds, the route pieces' paces
      (:class:`~shared.domain.speeds.PiecePaces`: at most 56 bytes a ``step_m``
      piece, 56 KB for a 100 km route in 100 m pieces), held weakly: dropped with the
      route (``route_from_polyline`` keeps at most 4096). Without per-cell speeds (the
      default, as the projector runs) nothing is kept per route;
    * in the caller's :class:`~shared.domain.geo.TrackMemo`, when one is passed: each
      fix's projection onto the routes it was projected onto, and whether the next fix
      of its track was checked plausible (the caller bounds it);
    * on each route, the projections of the last 16 destinations.
    """

    def __init__(
        self,
        speeds: HistoricalSpeeds | None = None,
        params: EtaParams | None = None,
        *,
        version: int = 0,
    ) -> None:
        self.speeds = speeds or HistoricalSpeeds.empty()
        self.params = params or EtaParams()
        #: Copied into every estimate (`EtaEstimate.model_version`).
        self.version = version
        self._informative = self.speeds.observed_m > 0
        self._route_paces: WeakKeyDictionary[Route, PiecePaces] = WeakKeyDictionary()

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
        memo: TrackMemo | None = None,
    ) -> EtaEstimate | None:
        """The ETA at ``now`` to ``destination``, or ``None`` without a usable position.

        ``positions`` are the vehicle's recent fixes in any order; only the last
        ``window_s`` before the newest matter, and fixes more than
        ``future_tolerance_s`` after ``now`` are ignored. ``route`` is the planned
        route (the destination is projected onto it; it may extend past it). ``stops``
        are intermediate stops along ``route`` (ignored without one); a stop at or past
        the destination adds nothing. ``previous`` (the last estimate for the same
        shipment, if any) carries the off-route state and the position along the route.
        ``memo`` is what earlier calls worked out about the same fix objects (the
        vehicle's :class:`~shared.domain.geo.TrackMemo`, kept by the caller): it saves
        work and never changes the estimate. Raises ``ValueError`` for a naive ``now``
        or an invalid destination.
        """
        p = self.params
        t_now = _check_aware("now", now)
        check_lat_lon(*destination)
        limit = t_now + p.future_tolerance_s
        if positions and max(map(_T, positions)) <= limit:
            usable = list(positions)  # the usual case: nothing from the future
        else:
            usable = [f for f in positions if f.t <= limit]
        if memo is None:
            memo = TrackMemo()  # for this call only: the route projection reuses it
        track = clean_track(usable, p.max_jump_mps, memo)
        if not track:
            return None
        newest = track[-1]
        # The track is in time order: the window is its tail.
        window = track[bisect.bisect_left(track, newest.t - p.window_s, key=_T) :]
        anchor = min(newest.t, t_now)
        if route is not None:
            return self._along_route(
                t_now, anchor, destination, window, route, stops, previous, memo
            )
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
        memo: TrackMemo,
    ) -> EtaEstimate:
        p = self.params
        newest = window[-1]
        hint = previous.distance_along_m if previous is not None else None
        alongs, offsets = route.project_fixes(window, near_m=hint, memo=memo)
        off = previous.off_route if previous is not None else False
        streak = 0
        if off or max(offsets) > p.off_route_m:
            for o in offsets:
                if off:
                    if o <= p.back_on_route_m:
                        off, streak = False, 0
                elif o > p.off_route_m:
                    streak += 1
                    if streak >= p.off_route_confirm:
                        off = True
                else:
                    streak = 0
        # else: on route all along; the loop would only reset the streak to 0.
        if previous is None and streak == len(offsets):
            off = True  # every fix we have is far from the route
        rp_n = RoutePosition(alongs[-1], offsets[-1], offsets[-1] <= route.on_route_threshold_m)
        dest_rp = route.project(*dest)
        dest_along = dest_rp.distance_along_m
        if off and rp_n.offset_m > p.route_eta_max_offset_m:
            dwell = self._stops_ahead(stops, rp_n.distance_along_m, dest_along, window, alongs)
            return self._great_circle(t_now, anchor, dest, window, rp_n, dwell)

        along_n = rp_n.distance_along_m
        if (
            p.destination_ahead
            and along_n > dest_rp.distance_along_m + p.arrive_radius_m
            and haversine_m(newest.lat, newest.lon, *dest) > LEFT_DESTINATION_M
        ):
            # Past the destination's nearest point and away from it: when the route
            # passes the destination again ahead (a loop, a round trip), that pass is
            # the one the vehicle is heading for (within `project`'s 30 m slack of the
            # nearest). Closer, the vehicle may be at the destination, overshooting.
            ahead = route.project(*dest, near_m=along_n, back_m=0.0, ahead_m=route.length_m)
            if ahead.distance_along_m > along_n:
                dest_rp = ahead
        dest_along = dest_rp.distance_along_m
        off_s = self.speeds.utc_offset_s(anchor)

        # Observed progress: earliest on-route fix of the window to the newest.
        ln_r, v_obs, observed = 0.0, None, False
        first = next((i for i, o in enumerate(offsets) if o <= p.off_route_m), None)
        if first is not None and newest.t - window[first].t >= p.min_span_s:
            f0, along0 = window[first], alongs[first]
            span = newest.t - f0.t
            progress = max(0.0, along_n - along0)
            if progress / span <= p.max_jump_mps:
                v_obs = progress / span
                hist = self._route_time(route, along0, along_n, f0.t, off_s, _Ratio())
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
            travel = self._route_time(route, along_n, dest_along, anchor, off_s, ratio)
            travel += dest_rp.offset_m * self.speeds.global_pace
        dwell = self._stops_ahead(stops, along_n, dest_along, window, alongs)
        return self._finish(
            t_now, anchor, newest, EtaMethod.ROUTE, remaining, travel, dwell,
            v_obs, ln_r, observed, off, rp_n,
        )  # fmt: skip

    def _paces_for(self, route: Route) -> PiecePaces:
        paces = self._route_paces.get(route)
        if paces is None:
            s = route.cut(self.params.step_m)  # not cached on the route: only this is kept
            paces = self.speeds.piece_paces(s.lat, s.lon, s.heading_deg)
            self._route_paces[route] = paces
        return paces

    def _route_time(
        self, route: Route, a: float, b: float, t0: float, off_s: float, ratio: _Ratio
    ) -> float:
        """Seconds to travel the route from ``a`` to ``b`` (metres along) from ``t0``.

        Each ``step_m`` piece of the route (clipped to ``[a, b]``) takes its length ×
        its pace, looked up for the hour of week at which it is reached. Computed like
        a loop over the pieces would, with the same floating-point operations in the
        same order (see `_travel`), so to the last bit.
        """
        if b <= a:
            return 0.0
        step = self.params.step_m
        length = route.length_m
        n = max(1, math.ceil(length / step))
        i0 = min(int(a // step), n - 1)
        i1 = min(int(b // step), n - 1)
        # The pieces' bounds as `Route.samples` computes them (start, then length as
        # end - start, then end as start + length), elementwise: the same values.
        starts = np.arange(i0, i1 + 1, dtype=np.float64) * step
        ends = starts + (np.minimum(starts + step, length) - starts)
        s = np.maximum(starts, a)
        e = np.minimum(ends, b)
        used = e > s  # a piece ending where `a` starts or starting where `b` ends
        pieces: slice | npt.NDArray[np.intp] = slice(i0, i1 + 1)
        if not used.all():
            s, e = s[used], e[used]
            pieces = np.flatnonzero(used) + i0
        x = ((s + e) / 2 - a) if ratio.fade and not ratio.neutral else None
        if self.speeds.uniform:
            return self._travel(e - s, x, None, t0, off_s, ratio)
        table = self._paces_for(route)

        def paces(how: int) -> FloatArray:
            return table.at_hour(how)[pieces]

        return self._travel(e - s, x, paces, t0, off_s, ratio)

    def _travel(
        self,
        lengths: FloatArray,
        x: FloatArray | None,
        paces: Callable[[int], FloatArray] | None,
        t0: float,
        off_s: float,
        ratio: _Ratio,
    ) -> float:
        """Seconds to travel pieces of ``lengths`` metres in turn from ``t0``: the
        closed form of ``for i: t += lengths[i] * pace_i(hour_of_week(t)) * factor_i``.

        ``paces(how)`` gives the pieces' paces in an hour (``None``: the uniform
        :meth:`HistoricalSpeeds.hour_pace`); ``x`` is each piece's midpoint ahead of the
        vehicle, for a fading ratio. Exactly the loop's result, not an approximation:

        * the running time is a cumulative sum, which numpy evaluates strictly left to
          right (``np.cumsum`` is ``np.add.accumulate``, no pairwise summation), so each
          partial sum is the loop's ``t`` to the bit; elementwise products are IEEE
          operations, the same in numpy as in Python;
        * the hour of week changes only where the running time crosses an hour
          boundary of local time: the first piece reached at or after it is found by a
          binary search on the partial sums (non-decreasing, as every term is >= 0),
          and the sum restarts there with that hour's paces;
        * the ratio's factor uses ``math.exp`` (numpy's ``exp`` may differ in the last
          bit), piece by piece only where it is not exactly 1.
        """
        speeds = self.speeds
        if ratio.neutral:
            factor: FloatArray | float | None = None
        elif not ratio.fade:
            factor = math.exp(-ratio.log)
        else:
            assert x is not None
            factor = self._fade_factors(ratio, x)
        hour_free = paces is None and not speeds.how_factor
        t = t0
        done = 0
        total = len(lengths)
        while True:
            how = hour_of_week(t, off_s)
            rest = lengths[done:] if done else lengths
            if paces is None:
                pace = speeds.hour_pace(how)
                if isinstance(factor, float):
                    terms = rest * (pace * factor)
                elif factor is not None:
                    terms = rest * (pace * factor[done:])
                else:
                    terms = rest * pace
            else:
                piece_paces = paces(how)[done:]
                if isinstance(factor, float):
                    terms = rest * (piece_paces * factor)
                elif factor is not None:
                    terms = rest * (piece_paces * factor[done:])
                else:
                    terms = rest * piece_paces
            running = np.cumsum(np.concatenate([[t], terms]))
            if hour_free:
                return float(running[-1]) - t0
            # `hour_of_week` floors (t + off_s) / 3600: the hour changes at the first
            # partial sum with t + off_s >= the next multiple of 3600 (exact in floats).
            boundary = ((t + off_s) // 3600 + 1) * 3600
            k = int(np.searchsorted(running[:-1] + off_s, boundary, side="left"))
            if k >= len(terms):
                return float(running[-1]) - t0
            t = float(running[k])
            done += k
            assert done < total

    @staticmethod
    def _fade_factors(ratio: _Ratio, x: FloatArray) -> FloatArray:
        """`_Ratio.pace_factor` of each ``x``, with ``math.exp`` as it does.

        Past ``x_one`` the inner term ``log * exp(-x/persist)`` is below 2**-54 in
        magnitude, where ``exp`` returns exactly 1.0 (its result rounds to 1), so only
        the pieces before it are computed one by one (``x`` is increasing).
        """
        out = np.ones(len(x))
        x_one = ratio.persist_m * (math.log(abs(ratio.log)) + 54 * math.log(2) + 1)
        count = int(np.searchsorted(x, x_one, side="right"))
        if count:
            exp, lg, pm = math.exp, ratio.log, ratio.persist_m
            out[:count] = [exp(-lg * exp(-xi / pm)) for xi in x[:count].tolist()]
        return out

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
        window: list[Fix],
        alongs: list[float],
    ) -> float:
        radius = self.params.stop_radius_m
        total = 0.0
        newest_t = window[-1].t
        for s in stops:
            if s.distance_along_m >= dest_along - radius:
                continue
            if s.distance_along_m > along + radius:
                total += s.dwell_s
            elif abs(s.distance_along_m - along) <= radius:
                # At the stop now: only what is left of its dwell.
                since = newest_t
                for f, f_along in zip(reversed(window), reversed(alongs), strict=True):
                    if abs(f_along - s.distance_along_m) > radius:
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
        piece = length / n
        x = (np.arange(n, dtype=np.float64) + 0.5) * piece if ratio.fade else None
        lengths = np.full(n, piece)
        if self.speeds.uniform:
            return self._travel(lengths, x, None, t0, off_s, ratio)
        f = (np.arange(n, dtype=np.float64) + 0.5) / n
        lats = start.lat + (dest[0] - start.lat) * f
        lons = start.lon + (dest[1] - start.lon) * f
        heading = bearing_deg(start.lat, start.lon, *dest)
        table = self.speeds.piece_paces(lats, lons, np.full(n, heading))
        return self._travel(lengths, x, table.at_hour, t0, off_s, ratio)

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
            model_version=self.version,
        )


# -- delay conditions -------------------------------------------------------------------


class DelayCondition(StrEnum):
    ON_TIME = "on_time"
    AT_RISK = "at_risk"
    LATE = "late"


@dataclass(frozen=True, slots=True)
class DelayMargins:
    """The delay rule's knobs; see :func:`classify_delay` and docs/alerts.md.

    ``late_probability`` / ``at_risk_probability``: the chance of arriving after the
    window end (:func:`late_probability`) from which a shipment is LATE / AT_RISK.
    ``late_after_s`` / ``at_risk_within_s``: point-estimate backstops (LATE when the
    ETA is more than ``late_after_s`` past the window end, AT_RISK when it is later
    than ``at_risk_within_s`` before it), whatever the spread. ``interval_coverage``:
    the probability the estimate's [earliest, latest] interval is taken to hold.
    """

    late_after_s: float = 600.0
    at_risk_within_s: float = 300.0
    late_probability: float = 0.8
    at_risk_probability: float = 0.3
    interval_coverage: float = 0.8

    def __post_init__(self) -> None:
        for v in (self.late_after_s, self.at_risk_within_s):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError("DelayMargins values must be finite and >= 0")
        if not 0 < self.at_risk_probability <= self.late_probability <= 1:
            raise ValueError("need 0 < at_risk_probability <= late_probability <= 1")
        if not 0 < self.interval_coverage < 1:
            raise ValueError("interval_coverage must be between 0 and 1")


_STANDARD_NORMAL = NormalDist()


def late_probability(estimate: EtaEstimate, window_end: datetime, coverage: float = 0.8) -> float:
    """The probability that the arrival comes after ``window_end``, in [0, 1].

    The arrival time is modelled as a two-piece normal: its median is the point
    estimate, and each side has the spread that puts ``earliest`` / ``latest`` at the
    central ``coverage`` interval's ends (``coverage`` 0.8: the 10th and 90th
    percentiles). The model's interval is asymmetric (it widens more toward late), and
    so is this. Non-decreasing as the whole estimate moves later; a wider spread moves
    it toward 0.5 (less sure either way). A side without spread is a step: 0 when the
    point estimate is at or before the end, 1 when after it. Raises ``ValueError`` for
    a naive ``window_end`` or a ``coverage`` outside (0, 1).
    """
    if not 0 < coverage < 1:
        raise ValueError("coverage must be between 0 and 1")
    end = _check_aware("window_end", window_end)
    arrival = estimate.arrival.timestamp()
    z = _STANDARD_NORMAL.inv_cdf(0.5 + coverage / 2)
    if end >= arrival:
        sigma_late = (estimate.latest.timestamp() - arrival) / z
        if sigma_late <= 0:
            return 0.0
        return 1.0 - _STANDARD_NORMAL.cdf((end - arrival) / sigma_late)
    sigma_early = (arrival - estimate.earliest.timestamp()) / z
    if sigma_early <= 0:
        return 1.0
    return _STANDARD_NORMAL.cdf((arrival - end) / sigma_early)


def classify_delay(
    estimate: EtaEstimate, window_end: datetime, margins: DelayMargins | None = None
) -> DelayCondition:
    """The delay condition of one estimate against the promised window's end.

    With ``p`` = :func:`late_probability`: LATE when ``p >= late_probability`` or the
    point estimate is more than ``late_after_s`` past the end; else AT_RISK when
    ``p >= at_risk_probability`` or the point estimate is later than
    ``at_risk_within_s`` before the end; else ON_TIME. Moving the estimate later never
    lowers the condition; a wider spread never lowers it while the point estimate is
    on time, and never raises it while the point estimate is past the end.

    Pure and stateless: debouncing (one alert per change) belongs to the caller.
    Raises ``ValueError`` for a naive ``window_end``.
    """
    m = margins or DelayMargins()
    end = _check_aware("window_end", window_end)
    eta = estimate.arrival.timestamp()
    p = late_probability(estimate, window_end, m.interval_coverage)
    if p >= m.late_probability or eta > end + m.late_after_s:
        return DelayCondition.LATE
    if p >= m.at_risk_probability or eta > end - m.at_risk_within_s:
        return DelayCondition.AT_RISK
    return DelayCondition.ON_TIME
