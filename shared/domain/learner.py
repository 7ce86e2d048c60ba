"""The speed learner's pure fold: ``fold(state, points) -> (state, snapshot)``, per tenant.

What it learns is what :class:`~shared.domain.speeds.SpeedLearner` learns (pace as
total time over total distance per grid cell, heading sector and hour of week, with
the same levels and shrinkage, see :func:`build_speeds`), but as a stream, with two
differences: old traffic fades, and memory is bounded.

Determinism (a rebuild from the log gives the same model, to the bit):

* Points wait in a *pending* buffer until the tenant's clock (the newest event time
  seen) has passed them by ``settle_s``; then they are learned in one canonical order:
  by (time, vehicle, lat, lon), duplicates dropped. A point older than the last fix
  its vehicle already learned is *late*: it is counted and not learned. So the state
  depends only on the set of points folded, never on how they were cut into batches
  or ordered within them, provided every point arrives before its tenant's clock has
  passed it by ``settle_s``. A point that arrives later (say a partition that lags
  the others during a replay) is still learned, in its vehicle's time order, but
  after points of other vehicles that are newer: the sums then differ from the
  canonical order's in their rounding (relative 1e-15 per addition), and a version
  cut meanwhile may miss it.
* Decay is by event time, never the wall clock: a pair learned at time ``t`` has
  weight ``2 ** ((t - T) / half_life_s)`` when the model is built at time ``T``. The
  sums are kept relative to an anchor that moves by whole half-lives, so rescaling
  multiplies by an exact power of two (no rounding).
* Snapshots are cut at event-time boundaries (multiples of ``snapshot_every_s``):
  version ``v`` is the model of every point before ``v`` (epoch seconds), built at
  time ``v``. A fold that crosses several boundaries publishes only the last one;
  the version numbers published are therefore the same on every replay that gets
  that far, and the latest is always published.

Memory: at most ``max_cells`` grid cells per tenant; each holds at most ``sectors``
direction and ``sectors x 168`` direction-and-hour accumulators (16 bytes each as
stored). When a point adds a cell beyond the cap, the cells with the least decayed
distance (ties: the smallest cell key) are evicted until ``evict_to`` x ``max_cells``
remain. The pending buffer holds the points of the last ``settle_s``; vehicle trails
(the last accepted fix of each vehicle) are dropped once ``max_gap_s`` old, as they
can pair with nothing later.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from zoneinfo import ZoneInfo

from shared.domain.geo import Fix, bearing_deg, haversine_m
from shared.domain.speeds import (
    CellKey,
    HistoricalSpeeds,
    SpeedParams,
    _cell,
    _sector,
    area_of,
    area_paces,
    hour_of_week,
    utc_offset_s,
)

#: (distance m, time s), weighted by decay relative to the state's anchor.
Acc = tuple[float, float]
_ZERO: Acc = (0.0, 0.0)
#: (t, vehicle id, lat, lon): a point waiting to be learned.
Pending = tuple[float, str, float, float]


@dataclass(frozen=True, slots=True)
class LearnerParams:
    """How the learner decays, bounds memory and cuts snapshots."""

    speeds: SpeedParams = field(default_factory=SpeedParams)
    #: Event time after which a pair's weight has halved.
    half_life_s: float = 14 * 86400.0
    #: How long a point may wait for earlier points of its tenant (see module doc).
    settle_s: float = 120.0
    max_cells: int = 50_000
    #: Eviction brings the cell count down to this share of ``max_cells``.
    evict_to: float = 0.9
    #: Event time between two snapshots (version boundaries).
    snapshot_every_s: float = 600.0
    #: Stationary time learned per stop: a vehicle still for longer is parked or laying
    #: over, not held up by traffic, and the rest of the stop is not learned.
    max_stop_s: float = 180.0

    def __post_init__(self) -> None:
        for name in ("half_life_s", "snapshot_every_s", "max_stop_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"LearnerParams.{name} must be a positive number, got {v!r}")
        if not (math.isfinite(self.settle_s) and self.settle_s >= 0):
            raise ValueError("LearnerParams.settle_s must be finite and >= 0")
        if self.max_cells < 1:
            raise ValueError("LearnerParams.max_cells must be >= 1")
        if not 0 < self.evict_to <= 1:
            raise ValueError("LearnerParams.evict_to must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class CellStats:
    """One grid cell's accumulators: the cell, per sector, per (sector, hour of week)."""

    acc: Acc = _ZERO
    by_dir: Mapping[int, Acc] = field(default_factory=dict)
    by_dir_how: Mapping[tuple[int, int], Acc] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Accumulators held (the cell's own counts as one)."""
        return 1 + len(self.by_dir) + len(self.by_dir_how)


@dataclass(frozen=True, slots=True)
class Trail:
    """A vehicle's last accepted fix, the heading it last moved at, and a suspect jump."""

    t: float
    lat: float
    lon: float
    sector: int | None = None
    #: A fix implausibly far from the last one, kept until the next fix confirms or
    #: refutes it (the rule of :func:`~shared.domain.geo.clean_track`): (t, lat, lon).
    suspect: tuple[float, float, float] | None = None
    #: How long the vehicle has been stationary up to ``t``.
    still_s: float = 0.0


@dataclass(frozen=True, slots=True)
class LearnerState:
    """One tenant's learner state. Immutable: :func:`fold` returns a new one."""

    #: The newest event time seen (None: nothing seen).
    clock: float | None = None
    #: The event time the accumulators are weighted relative to.
    anchor: float = 0.0
    total: Acc = _ZERO
    how: Mapping[int, Acc] = field(default_factory=dict)
    cells: Mapping[CellKey, CellStats] = field(default_factory=dict)
    trails: Mapping[str, Trail] = field(default_factory=dict)
    pending: tuple[Pending, ...] = ()
    #: Event time up to which points were learned (the last point learned).
    learned_until: float | None = None
    learned_from: float | None = None
    points_learned: int = 0
    late_points: int = 0
    evicted_cells: int = 0
    #: The last version published (0: none).
    version: int = 0

    @property
    def size(self) -> int:
        """Accumulators held: the memory that ``max_cells`` bounds."""
        return sum(c.size for c in self.cells.values()) + len(self.how)


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """A published model: version ``v`` learned every point before ``v`` (epoch s)."""

    version: int
    trained_from: float | None
    trained_until: float
    points: int
    speeds: HistoricalSpeeds


def fold(
    state: LearnerState, points: Iterable[tuple[str, Fix]], params: LearnerParams
) -> tuple[LearnerState, ModelSnapshot | None]:
    """Learn one tenant's ``points`` ((vehicle id, fix) pairs, any order).

    Pure. Returns the new state and the snapshot of the last version boundary the
    learning crossed (``None``: none crossed). See the module docstring for the
    guarantees about order, decay and memory.
    """
    fresh = list(points)
    if not fresh and not state.pending:
        return state, None
    clock = state.clock
    late = 0
    pending = list(state.pending)
    trails = state.trails
    for vehicle, fix in fresh:
        trail = trails.get(vehicle)
        if trail is not None and fix.t <= trail.t:
            late += 1  # older than what its vehicle already learned
            continue
        pending.append((fix.t, vehicle, fix.lat, fix.lon))
        if clock is None or fix.t > clock:
            clock = fix.t
    assert clock is not None
    watermark = clock - params.settle_s
    pending.sort()
    n_due = 0
    while n_due < len(pending) and pending[n_due][0] <= watermark:
        n_due += 1
    due, rest = pending[:n_due], pending[n_due:]
    work = _Work(state, params)
    snapshot: ModelSnapshot | None = None
    if due:
        every = params.snapshot_every_s
        boundary = math.floor(due[-1][0] / every) * every
        version = int(boundary)
        previous: tuple[float, str, float, float] | None = None
        # Only a boundary past what was learned, with something learned before it.
        cut = version > state.version and (
            state.learned_until < boundary
            if state.learned_until is not None
            else due[0][0] < boundary
        )
        for point in due:
            if point == previous:
                continue  # an exact duplicate
            previous = point
            if cut and point[0] >= boundary:
                snapshot = work.snapshot(version, boundary)
                cut = False
            work.learn(*point)
        if cut:  # every due point is before the boundary (it fell exactly on the last)
            snapshot = work.snapshot(version, boundary)
        work.expire(watermark)
    return (
        work.finish(clock, tuple(rest), late, snapshot.version if snapshot else state.version),
        snapshot,
    )


class _Work:
    """The mutable working copy of a state during one fold (copy on write: the
    state passed in is never changed)."""

    def __init__(self, state: LearnerState, params: LearnerParams) -> None:
        self.state = state
        self.params = params
        self.sp = params.speeds
        self.zone = ZoneInfo(self.sp.timezone)
        self.anchor = state.anchor
        self.total = state.total
        self.how = dict(state.how)
        self.cells = dict(state.cells)
        self.trails = dict(state.trails)
        # Cells already copied in this fold: their dicts may be changed in place.
        self.own: dict[CellKey, tuple[list[float], dict[int, Acc], dict[tuple[int, int], Acc]]]
        self.own = {}
        self.learned_from = state.learned_from
        self.learned_until = state.learned_until
        self.points = state.points_learned
        self.evicted = state.evicted_cells

    # -- learning -----------------------------------------------------------------------

    def learn(self, t: float, vehicle: str, lat: float, lon: float) -> None:
        sp = self.sp
        if self.learned_from is None:
            self.learned_from = t
            self.anchor = math.floor(t / self.params.half_life_s) * self.params.half_life_s
        if self.learned_until is None or t > self.learned_until:
            self.learned_until = t
        self.points += 1
        trail = self.trails.get(vehicle)
        if trail is None:
            self.trails[vehicle] = Trail(t, lat, lon)
            return
        if t <= trail.t:
            return  # not newer than what the vehicle already learned
        if t - trail.t > sp.max_gap_s:
            # Checked first, so a trail forgotten by `expire` behaves exactly the same.
            self.trails[vehicle] = Trail(t, lat, lon)
            return
        if not self._plausible(trail.t, trail.lat, trail.lon, t, lat, lon):
            s = trail.suspect
            if s is not None and self._plausible(s[0], s[1], s[2], t, lat, lon):
                # Two agreeing fixes: a genuine relocation. Restart the chain at the
                # suspect, then learn from it to this fix.
                trail = Trail(s[0], s[1], s[2])
            else:
                self.trails[vehicle] = replace(trail, suspect=(t, lat, lon))
                return
        dt = t - trail.t
        if dt > sp.max_gap_s:
            self.trails[vehicle] = Trail(t, lat, lon)
            return
        self._rebase(t)
        d = haversine_m(trail.lat, trail.lon, lat, lon)
        tm = (trail.t + t) / 2
        how = hour_of_week(tm, utc_offset_s(tm, self.zone))
        w = math.pow(2.0, (tm - self.anchor) / self.params.half_life_s)
        sector = trail.sector
        if d < sp.stationary_m:
            still = min(dt, max(0.0, self.params.max_stop_s - trail.still_s))
            if still > 0:
                mid_lat, mid_lon = (trail.lat + lat) / 2, (trail.lon + lon) / 2
                self._add(mid_lat, mid_lon, sector, how, d * w, still * w)
            self.trails[vehicle] = Trail(t, lat, lon, sector, still_s=trail.still_s + dt)
            return
        else:
            sector = _sector(bearing_deg(trail.lat, trail.lon, lat, lon), sp.sectors)
            n = max(1, math.ceil(d / (sp.cell_m / 2)))
            for k in range(n):
                f = (k + 0.5) / n
                self._add(
                    trail.lat + (lat - trail.lat) * f,
                    trail.lon + (lon - trail.lon) * f,
                    sector,
                    how,
                    d * w / n,
                    dt * w / n,
                )
        self.trails[vehicle] = Trail(t, lat, lon, sector)

    def _plausible(
        self, t0: float, la0: float, lo0: float, t1: float, la1: float, lo1: float
    ) -> bool:
        dt = max(t1 - t0, 1.0)
        return haversine_m(la0, lo0, la1, lo1) <= self.sp.max_jump_mps * dt

    def _rebase(self, t: float) -> None:
        """Move the anchor forward by whole half-lives once ``t`` is 64 of them past it:
        every sum is multiplied by an exact power of two, so nothing is rounded."""
        h = self.params.half_life_s
        steps = math.floor((t - self.anchor) / h) - 32
        if steps < 32:
            return
        f = math.ldexp(1.0, -steps)
        self.anchor += steps * h

        def scaled(a: Acc) -> Acc:
            return (a[0] * f, a[1] * f)

        self.total = scaled(self.total)
        self.how = {k: scaled(v) for k, v in self.how.items()}
        for key in list(self.cells):
            own = self._own(key)
            own[0][0] *= f
            own[0][1] *= f
            for s, v in own[1].items():
                own[1][s] = scaled(v)
            for k2, v in own[2].items():
                own[2][k2] = scaled(v)

    def _own(self, key: CellKey) -> tuple[list[float], dict[int, Acc], dict[tuple[int, int], Acc]]:
        own = self.own.get(key)
        if own is None:
            c = self.cells.get(key)
            if c is None:
                own = ([0.0, 0.0], {}, {})
            else:
                own = ([c.acc[0], c.acc[1]], dict(c.by_dir), dict(c.by_dir_how))
            self.own[key] = own
            self.cells[key] = _PLACEHOLDER
        return own

    def _add(
        self, lat: float, lon: float, sector: int | None, how: int, d: float, t: float
    ) -> None:
        key = _cell(lat, lon, self.sp.cell_m)
        new_cell = key not in self.cells
        own = self._own(key)
        self.total = (self.total[0] + d, self.total[1] + t)
        a = self.how.get(how, _ZERO)
        self.how[how] = (a[0] + d, a[1] + t)
        own[0][0] += d
        own[0][1] += t
        if sector is not None:
            a = own[1].get(sector, _ZERO)
            own[1][sector] = (a[0] + d, a[1] + t)
            a = own[2].get((sector, how), _ZERO)
            own[2][(sector, how)] = (a[0] + d, a[1] + t)
        if new_cell and len(self.cells) > self.params.max_cells:
            self._evict(keep=key)

    def _evict(self, keep: CellKey) -> None:
        """Drop the cells with the least decayed distance (ties: smallest key), never
        ``keep`` (the cell being added), down to ``evict_to`` x ``max_cells``."""
        target = max(1, math.floor(self.params.max_cells * self.params.evict_to))

        def weight(key: CellKey) -> tuple[float, CellKey]:
            own = self.own.get(key)
            d = own[0][0] if own is not None else self.cells[key].acc[0]
            return d, key

        ranked = sorted((k for k in self.cells if k != keep), key=weight)
        for key in ranked[: len(self.cells) - target]:
            del self.cells[key]
            self.own.pop(key, None)
            self.evicted += 1

    def expire(self, watermark: float) -> None:
        """Forget trails that can pair with nothing any more."""
        limit = watermark - self.sp.max_gap_s
        for vehicle in [v for v, tr in self.trails.items() if tr.t < limit]:
            del self.trails[vehicle]

    # -- output -------------------------------------------------------------------------

    def _frozen_cells(self) -> dict[CellKey, CellStats]:
        cells = self.cells
        for key, (acc, by_dir, by_dir_how) in self.own.items():
            cells[key] = CellStats((acc[0], acc[1]), by_dir, by_dir_how)
        self.own = {}  # the frozen cells now share these dicts: copy again on write
        return cells

    def snapshot(self, version: int, at: float) -> ModelSnapshot:
        cells = self._frozen_cells()
        speeds = build_speeds(self.sp, self.params.half_life_s, self.anchor, at, self.total,
                              self.how, cells)  # fmt: skip
        assert self.learned_until is not None
        return ModelSnapshot(version, self.learned_from, at, self.points, speeds)

    def finish(
        self, clock: float, pending: tuple[Pending, ...], late: int, version: int
    ) -> LearnerState:
        cells = self._frozen_cells()
        return LearnerState(
            clock=clock,
            anchor=self.anchor,
            total=self.total,
            how=self.how,
            cells=dict(cells),
            trails=self.trails,
            pending=pending,
            learned_until=self.learned_until,
            learned_from=self.learned_from,
            points_learned=self.points,
            late_points=self.state.late_points + late,
            evicted_cells=self.evicted,
            version=version,
        )


_PLACEHOLDER = CellStats()


def build_speeds(
    params: SpeedParams,
    half_life_s: float,
    anchor: float,
    at: float,
    total: Acc,
    how: Mapping[int, Acc],
    cells: Mapping[CellKey, CellStats],
) -> HistoricalSpeeds:
    """The model of decayed sums as of event time ``at``: each sum is scaled to weight
    1 at ``at``, then shrunk level by level exactly as :meth:`SpeedLearner.build`
    does (same priors, same clamps)."""
    decay = math.pow(2.0, (anchor - at) / half_life_s)
    p = params
    lo, hi = 1.0 / p.max_speed_mps, 1.0 / p.min_speed_mps

    def shrink(acc: Acc, prior: float, k: float) -> float:
        d, t = acc[0] * decay, acc[1] * decay
        return min(max((t + k * prior) / (d + k), lo), hi)

    g = shrink(total, 1.0 / p.default_speed_mps, p.global_prior_m)
    how_factor = {h: shrink(a, g, p.global_prior_m) / g for h, a in sorted(how.items())}
    cell_pace: dict[CellKey, float] = {}
    cell_dir: dict[tuple[int, int, int], float] = {}
    cell_dir_how: dict[tuple[int, int, int, int], float] = {}
    area = area_paces(
        ((key, c.acc[0] * decay, c.acc[1] * decay) for key, c in sorted(cells.items())), p, g
    )
    for key in sorted(cells):
        c = cells[key]
        prior = area[area_of(key, p.area_cells)] if area else g
        base = cell_pace[key] = shrink(c.acc, prior, p.prior_m)
        for sector in sorted(c.by_dir):
            cell_dir[(key[0], key[1], sector)] = shrink(c.by_dir[sector], base, p.prior_m)
        for sector, h in sorted(c.by_dir_how):
            prior = cell_dir[(key[0], key[1], sector)] * how_factor[h]
            cell_dir_how[(key[0], key[1], sector, h)] = shrink(
                c.by_dir_how[(sector, h)], prior, p.prior_m
            )
    return HistoricalSpeeds(
        p, g, how_factor, cell_pace, cell_dir, cell_dir_how,
        total[0] * decay, total[1] * decay, area,
    )  # fmt: skip


def build(state: LearnerState, params: LearnerParams, at: float | None = None) -> HistoricalSpeeds:
    """The model of ``state`` as of event time ``at`` (default: its clock)."""
    when = at if at is not None else (state.clock or 0.0)
    return build_speeds(
        params.speeds, params.half_life_s, state.anchor, when, state.total, state.how, state.cells
    )


# -- persistence --------------------------------------------------------------------------


def state_to_dict(state: LearnerState) -> dict[str, Any]:
    """A JSON-serialisable form; :func:`state_from_dict` restores an equal state."""
    return {
        "clock": state.clock,
        "anchor": state.anchor,
        "total": list(state.total),
        "how": [[k, *v] for k, v in sorted(state.how.items())],
        "cells": [
            [
                key[0],
                key[1],
                *c.acc,
                [[s, *v] for s, v in sorted(c.by_dir.items())],
                [[s, h, *v] for (s, h), v in sorted(c.by_dir_how.items())],
            ]
            for key, c in sorted(state.cells.items())
        ],
        "trails": [
            [
                v,
                tr.t,
                tr.lat,
                tr.lon,
                tr.sector,
                list(tr.suspect) if tr.suspect else None,
                tr.still_s,
            ]
            for v, tr in sorted(state.trails.items())
        ],
        "pending": [list(p) for p in state.pending],
        "learned_until": state.learned_until,
        "learned_from": state.learned_from,
        "points_learned": state.points_learned,
        "late_points": state.late_points,
        "evicted_cells": state.evicted_cells,
        "version": state.version,
    }


def state_from_dict(data: Mapping[str, Any]) -> LearnerState:
    """Inverse of :func:`state_to_dict`. Raises ``KeyError``/``ValueError``/``TypeError``
    for a malformed document."""

    def acc(a: Any, b: Any) -> Acc:
        return (float(a), float(b))

    cells: dict[CellKey, CellStats] = {}
    for row, col, d, t, by_dir, by_dir_how in data["cells"]:
        cells[(int(row), int(col))] = CellStats(
            acc(d, t),
            {int(s): acc(a, b) for s, a, b in by_dir},
            {(int(s), int(h)): acc(a, b) for s, h, a, b in by_dir_how},
        )
    return LearnerState(
        clock=None if data["clock"] is None else float(data["clock"]),
        anchor=float(data["anchor"]),
        total=acc(*data["total"]),
        how={int(k): acc(a, b) for k, a, b in data["how"]},
        cells=cells,
        trails={
            str(v): Trail(
                float(t),
                float(la),
                float(lo),
                None if s is None else int(s),
                None if sus is None else (float(sus[0]), float(sus[1]), float(sus[2])),
                float(still),
            )
            for v, t, la, lo, s, sus, still in data["trails"]
        },
        pending=tuple((float(t), str(v), float(la), float(lo)) for t, v, la, lo in data["pending"]),
        learned_until=None if data["learned_until"] is None else float(data["learned_until"]),
        learned_from=None if data["learned_from"] is None else float(data["learned_from"]),
        points_learned=int(data["points_learned"]),
        late_points=int(data["late_points"]),
        evicted_cells=int(data["evicted_cells"]),
        version=int(data["version"]),
    )


# -- the model a snapshot carries ----------------------------------------------------------


def encode_speeds(speeds: HistoricalSpeeds) -> bytes:
    """A snapshot's payload: the model's :meth:`HistoricalSpeeds.to_dict`, as compact
    JSON, zlib-compressed. Deterministic: the same model gives the same bytes."""
    text = json.dumps(speeds.to_dict(), separators=(",", ":"), sort_keys=True)
    return zlib.compress(text.encode(), 6)


def decode_speeds(payload: bytes) -> HistoricalSpeeds:
    """Inverse of :func:`encode_speeds`: the very model every reader of a snapshot
    uses (the projector and ``cargotrack eta-eval``). Raises ``ValueError`` for a
    payload that is not one."""
    try:
        return HistoricalSpeeds.from_dict(json.loads(zlib.decompress(payload)))
    except (zlib.error, KeyError, TypeError) as error:
        raise ValueError(f"not a speed model payload: {error!r}") from error


def fleet_average(state: LearnerState, params: LearnerParams) -> HistoricalSpeeds | None:
    """The fallback before a first version: only the tenant's decayed space-mean speed
    over everything learned (no cells, no hours), as of its clock; None before any pair
    was learned."""
    if state.total[0] <= 0 or state.clock is None:
        return None
    full = build_speeds(params.speeds, params.half_life_s, state.anchor, state.clock,
                        state.total, {}, {})  # fmt: skip
    return HistoricalSpeeds(
        params.speeds, full.global_pace, {}, {}, {}, {}, full.observed_m, full.observed_s
    )
