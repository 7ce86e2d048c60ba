"""Historical travel speeds learned from position history.

What is learned is *pace* (seconds per metre), as total time over total distance per
key, so a stop at a traffic light or a bus stop counts as the time it takes — the
space-mean speed, which is what a travel-time sum needs (a mean of instantaneous
speeds would not be).

Keys, from specific to general, each shrunk toward the next (empirical Bayes with a
pseudo-distance, so a cell seen once barely moves away from its prior):

1. (grid cell, heading sector, hour of week)
2. (grid cell, heading sector)
3. grid cell
4. area: ``area_cells`` x ``area_cells`` grid cells (about 1.2 km square by default), so
   an unseen or thinly seen cell starts from the speed of its neighbourhood, not of the
   whole fleet (a city centre is slower than its ring road)
5. hour of week (all cells) — applied to levels 2–3 as a time-of-day factor
6. global, itself shrunk toward ``default_speed_mps``

Grid cells are about ``cell_m`` square (latitude rows, each row's longitude step
widened by ``1/cos(lat)``), so they work for any route through the same streets, not
just named lines. Heading sectors split the cell by direction of travel (``sectors``
equal sectors, 0 = north). Hour of week is 0..167 from Monday 00:00 in ``timezone``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from shared.domain.geo import (
    EARTH_RADIUS_M,
    Fix,
    FloatArray,
    bearing_deg,
    clean_track,
    haversine_m,
)

_M_PER_DEG_LAT = math.pi * EARTH_RADIUS_M / 180.0
_EPOCH_HOW_OFFSET = 72  # 1970-01-01 was a Thursday: hour 72 of a Monday-based week

CellKey = tuple[int, int]
IntArray = npt.NDArray[np.int32]


@dataclass(frozen=True, slots=True)
class SpeedParams:
    """How speeds are binned and how much evidence a bin needs.

    ``prior_m`` is the pseudo-distance of the prior at every level: a bin whose observed
    distance equals ``prior_m`` sits halfway between its own pace and its prior's.
    """

    cell_m: float = 300.0
    sectors: int = 8
    prior_m: float = 600.0
    global_prior_m: float = 5000.0
    default_speed_mps: float = 8.0
    min_speed_mps: float = 0.5
    max_speed_mps: float = 40.0
    max_gap_s: float = 600.0
    max_jump_mps: float = 60.0
    stationary_m: float = 15.0
    timezone: str = "UTC"
    #: Side of an area in grid cells (level 4); 0: no area level (cells shrink toward
    #: the global pace).
    area_cells: int = 4

    def __post_init__(self) -> None:
        for name in ("cell_m", "prior_m", "global_prior_m", "default_speed_mps", "max_gap_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"SpeedParams.{name} must be a positive number, got {v!r}")
        if not 0 < self.min_speed_mps <= self.default_speed_mps <= self.max_speed_mps:
            raise ValueError("need 0 < min_speed_mps <= default_speed_mps <= max_speed_mps")
        if self.sectors < 1:
            raise ValueError("SpeedParams.sectors must be >= 1")
        if self.area_cells < 0:
            raise ValueError("SpeedParams.area_cells must be >= 0")
        ZoneInfo(self.timezone)  # raises for an unknown zone


def _cell(lat: float, lon: float, cell_m: float) -> CellKey:
    dlat = cell_m / _M_PER_DEG_LAT
    row = math.floor(lat / dlat)
    row_lat = (row + 0.5) * dlat
    dlon = dlat / max(math.cos(math.radians(row_lat)), 1e-6)
    return row, math.floor(lon / dlon)


def _cells_many(lats: FloatArray, lons: FloatArray, cell_m: float) -> list[CellKey]:
    dlat = cell_m / _M_PER_DEG_LAT
    rows = np.floor(lats / dlat)
    dlon = dlat / np.maximum(np.cos(np.radians((rows + 0.5) * dlat)), 1e-6)
    cols = np.floor(lons / dlon)
    return list(zip(rows.astype(np.int64).tolist(), cols.astype(np.int64).tolist(), strict=True))


def area_of(cell: CellKey, area_cells: int) -> CellKey:
    """The area (level 4) a grid cell belongs to: ``area_cells`` rows by
    ``area_cells`` columns of cells."""
    return cell[0] // area_cells, cell[1] // area_cells


def area_paces(
    cells: Iterable[tuple[CellKey, float, float]], params: SpeedParams, global_pace: float
) -> dict[CellKey, float]:
    """Level 4: each area's pace from its cells' (distance, time) sums, shrunk toward
    ``global_pace`` by ``prior_m`` (empty when ``area_cells`` is 0)."""
    k = params.area_cells
    if not k:
        return {}
    sums: dict[CellKey, list[float]] = {}
    for cell, d, t in cells:
        acc = sums.setdefault(area_of(cell, k), [0.0, 0.0])
        acc[0] += d
        acc[1] += t
    lo, hi = 1.0 / params.max_speed_mps, 1.0 / params.min_speed_mps
    prior = params.prior_m
    return {
        a: min(max((t + prior * global_pace) / (d + prior), lo), hi)
        for a, (d, t) in sorted(sums.items())
    }


def _sector(heading: float, sectors: int) -> int:
    width = 360.0 / sectors
    return int(((heading % 360.0) + width / 2) // width) % sectors


def hour_of_week(t: float, utc_offset_s: float) -> int:
    """Hour of the week (0 = Monday 00:00 local) of epoch seconds ``t``."""
    return int(((t + utc_offset_s) // 3600 + _EPOCH_HOW_OFFSET) % 168)


def utc_offset_s(t: float, zone: ZoneInfo) -> float:
    """The zone's UTC offset in seconds at epoch seconds ``t``."""
    off = datetime.fromtimestamp(t, zone).utcoffset()
    return off.total_seconds() if off is not None else 0.0


class _Acc:
    """Sum of distance (m) and time (s) for one key."""

    __slots__ = ("d", "t")

    def __init__(self) -> None:
        self.d = 0.0
        self.t = 0.0


@dataclass(frozen=True, slots=True)
class HistoricalSpeeds:
    """Learned paces; immutable. Build with :class:`SpeedLearner` or :meth:`empty`.

    Every lookup returns a finite pace within the configured speed bounds: an unseen
    cell falls back through the levels to the default speed.
    """

    params: SpeedParams
    global_pace: float
    how_factor: Mapping[int, float]
    cell_pace: Mapping[CellKey, float]
    cell_dir_pace: Mapping[tuple[int, int, int], float]
    cell_dir_how_pace: Mapping[tuple[int, int, int, int], float]
    observed_m: float = 0.0
    observed_s: float = 0.0
    #: Level 4, by area key (:func:`area_of`); empty in models built before it.
    area_pace: Mapping[CellKey, float] = field(default_factory=dict)
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)
    #: The (row, col, sector) keys that have an hour-of-week pace, built when first
    #: needed (see `piece_paces`).
    _hourly_keys: frozenset[tuple[int, int, int]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", ZoneInfo(self.params.timezone))

    @property
    def uniform(self) -> bool:
        """True when nothing was learned per cell: every piece then has the same pace
        in a given hour (:meth:`hour_pace`)."""
        return not (
            self.cell_pace or self.cell_dir_pace or self.cell_dir_how_pace or self.area_pace
        )

    def hour_pace(self, how: int) -> float:
        """The pace of every piece during ``how`` when :attr:`uniform`: what
        :meth:`pace` returns then, for any cell and sector."""
        return self._clamp(self.global_pace * self.how_factor.get(how, 1.0))

    @classmethod
    def empty(cls, params: SpeedParams | None = None) -> HistoricalSpeeds:
        """No history: every pace is ``1 / default_speed_mps``."""
        p = params or SpeedParams()
        return cls(p, 1.0 / p.default_speed_mps, {}, {}, {}, {})

    @property
    def global_speed_mps(self) -> float:
        """The learned space-mean speed over everything (or the default)."""
        return 1.0 / self.global_pace

    def utc_offset_s(self, t: float) -> float:
        return utc_offset_s(t, self._zone)

    def _clamp(self, pace: float) -> float:
        p = self.params
        return min(max(pace, 1.0 / p.max_speed_mps), 1.0 / p.min_speed_mps)

    def pace(self, cell: CellKey, sector: int, how: int) -> float:
        """Seconds per metre in ``cell`` heading in ``sector`` during hour-of-week ``how``."""
        v = self.cell_dir_how_pace.get((cell[0], cell[1], sector, how))
        if v is not None:
            return v
        f = self.how_factor.get(how, 1.0)
        base = self.cell_dir_pace.get((cell[0], cell[1], sector))
        if base is None:
            base = self.cell_pace.get(cell)
        if base is None:
            base = self._area_or_global(cell)
        return self._clamp(base * f)

    def _area_or_global(self, cell: CellKey) -> float:
        if self.area_pace:
            return self.area_pace.get(area_of(cell, self.params.area_cells), self.global_pace)
        return self.global_pace

    def pace_at(self, lat: float, lon: float, heading_deg: float, t: float) -> float:
        """:meth:`pace` for a position, heading and instant (epoch seconds)."""
        return self.pace(
            _cell(lat, lon, self.params.cell_m),
            _sector(heading_deg, self.params.sectors),
            hour_of_week(t, self.utc_offset_s(t)),
        )

    def piece_keys(
        self, lats: FloatArray, lons: FloatArray, headings: FloatArray
    ) -> list[tuple[CellKey, int]]:
        """Cell and sector keys for many pieces (pair with :meth:`pace`)."""
        cells = _cells_many(lats, lons, self.params.cell_m)
        n = self.params.sectors
        width = 360.0 / n
        secs = (((np.asarray(headings) % 360.0) + width / 2) // width).astype(np.int64) % n
        return list(zip(cells, secs.tolist(), strict=True))

    def piece_paces(self, lats: FloatArray, lons: FloatArray, headings: FloatArray) -> PiecePaces:
        """A compact table giving :meth:`pace` of many pieces (midpoints and headings)
        for any hour of week: ``piece_paces(...).at_hour(how)[i]`` equals
        ``pace(cell_i, sector_i, how)``."""
        keys = self.piece_keys(lats, lons, headings)
        cdp, cp, g = self.cell_dir_pace, self.cell_pace, self.global_pace
        if self.area_pace:
            ap, k = self.area_pace, self.params.area_cells
            base = np.array(
                [
                    v
                    if (v := cdp.get((c[0], c[1], sec))) is not None
                    else v
                    if (v := cp.get(c)) is not None
                    else ap.get((c[0] // k, c[1] // k), g)
                    for c, sec in keys
                ],
                dtype=np.float64,
            )
        else:
            base = np.array(
                [
                    v if (v := cdp.get((c[0], c[1], sec))) is not None else cp.get(c, g)
                    for c, sec in keys
                ],
                dtype=np.float64,
            )
        hourly = self._hourly_keys
        if hourly is None:
            hourly = frozenset((k[0], k[1], k[2]) for k in self.cell_dir_how_pace)
            object.__setattr__(self, "_hourly_keys", hourly)
        special = [
            (i, c[0], c[1], sec) for i, (c, sec) in enumerate(keys) if (c[0], c[1], sec) in hourly
        ]
        # int32: a cell row or column index is below 2**31 for any cell of 1 cm or more.
        table = np.array(special, dtype=np.int32).reshape(len(special), 4)
        return PiecePaces(self, base, table)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form; :meth:`from_dict` restores an equal object."""
        p = self.params
        return {
            "params": {k: getattr(p, k) for k in SpeedParams.__dataclass_fields__},
            "global_pace": self.global_pace,
            "observed_m": self.observed_m,
            "observed_s": self.observed_s,
            "how_factor": [[k, v] for k, v in sorted(self.how_factor.items())],
            "cell_pace": [[*k, v] for k, v in sorted(self.cell_pace.items())],
            "cell_dir_pace": [[*k, v] for k, v in sorted(self.cell_dir_pace.items())],
            "cell_dir_how_pace": [[*k, v] for k, v in sorted(self.cell_dir_how_pace.items())],
            "area_pace": [[*k, v] for k, v in sorted(self.area_pace.items())],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistoricalSpeeds:
        """Inverse of :meth:`to_dict`. Raises ``KeyError``/``ValueError`` for bad input."""
        return cls(
            SpeedParams(**data["params"]),
            float(data["global_pace"]),
            {int(k): float(v) for k, v in data["how_factor"]},
            {(int(a), int(b)): float(v) for a, b, v in data["cell_pace"]},
            {(int(a), int(b), int(c)): float(v) for a, b, c, v in data["cell_dir_pace"]},
            {
                (int(a), int(b), int(c), int(d)): float(v)
                for a, b, c, d, v in data["cell_dir_how_pace"]
            },
            float(data["observed_m"]),
            float(data["observed_s"]),
            # Absent from models published before the area level: none.
            {(int(a), int(b)): float(v) for a, b, v in data.get("area_pace", ())},
        )


class PiecePaces:
    """The paces of a fixed sequence of pieces, by hour of week (see
    :meth:`HistoricalSpeeds.piece_paces`).

    Holds 8 bytes a piece (the hour-independent pace: cell and sector, else cell, else
    global), 16 bytes for each piece whose cell and sector also have hour-of-week paces,
    and the arrays of the last :data:`HOURS_KEPT` hours asked for (8 bytes a piece
    each): every vehicle on a route asks for the same few hours (one estimate spans as
    many hours as the trip takes). At most 56 bytes a piece: 56 KB for a 100 km route
    in 100 m pieces.
    """

    __slots__ = ("_base", "_hours", "_special", "_speeds")

    #: How many hours' arrays are kept (least recently computed dropped first).
    HOURS_KEPT = 4

    def __init__(self, speeds: HistoricalSpeeds, base: FloatArray, special: IntArray) -> None:
        self._speeds = speeds
        self._base = base
        self._special = special
        self._hours: dict[int, FloatArray] = {}

    def __len__(self) -> int:
        return len(self._base)

    def at_hour(self, how: int) -> FloatArray:
        """Seconds per metre of every piece during hour-of-week ``how`` (read-only)."""
        found = self._hours.get(how)
        if found is not None:
            return found
        sp = self._speeds
        p = sp.params
        # What `HistoricalSpeeds.pace` does per piece, elementwise: the same IEEE
        # operations (a product, then max and min), hence the same values.
        paces = np.minimum(
            np.maximum(self._base * sp.how_factor.get(how, 1.0), 1.0 / p.max_speed_mps),
            1.0 / p.min_speed_mps,
        )
        hourly = sp.cell_dir_how_pace
        for i, row, col, sector in self._special.tolist():
            v = hourly.get((row, col, sector, how))
            if v is not None:
                paces[i] = v
        paces.flags.writeable = False
        if len(self._hours) >= self.HOURS_KEPT:
            del self._hours[next(iter(self._hours))]
        self._hours[how] = paces
        return paces


class SpeedLearner:
    """Accumulates position history into a :class:`HistoricalSpeeds` (pure, in memory).

    Each trace is one vehicle's fixes (any order), cleaned by
    :func:`~shared.domain.geo.clean_track` (jumps above ``max_jump_mps`` dropped).
    Consecutive pairs count only when ``0 < dt <= max_gap_s``. A pair's distance and
    time are spread over the cells its chord crosses (pieces of at most half a cell).
    A stationary pair (moved less than ``stationary_m``) adds time to the cell it sits
    in, with the last moving heading.
    """

    def __init__(self, params: SpeedParams | None = None) -> None:
        self.params = params or SpeedParams()
        self._zone = ZoneInfo(self.params.timezone)
        self._global = _Acc()
        self._how: dict[int, _Acc] = {}
        self._cell: dict[CellKey, _Acc] = {}
        self._cell_dir: dict[tuple[int, int, int], _Acc] = {}
        self._cell_dir_how: dict[tuple[int, int, int, int], _Acc] = {}

    def _add(
        self, lat: float, lon: float, sector: int | None, how: int, d: float, t: float
    ) -> None:
        cell = _cell(lat, lon, self.params.cell_m)
        keys: list[tuple[dict[Any, _Acc], Any]] = [
            (self._how, how),
            (self._cell, cell),
        ]
        if sector is not None:
            keys.append((self._cell_dir, (cell[0], cell[1], sector)))
            keys.append((self._cell_dir_how, (cell[0], cell[1], sector, how)))
        self._global.d += d
        self._global.t += t
        for table, key in keys:
            acc = table.get(key)
            if acc is None:
                acc = table[key] = _Acc()
            acc.d += d
            acc.t += t

    def add_trace(self, fixes: Iterable[Fix]) -> int:
        """Learn from one vehicle's fixes. Returns the number of pairs used."""
        p = self.params
        pts = [(f.t, f.lat, f.lon) for f in clean_track(fixes, p.max_jump_mps)]
        used = 0
        sector: int | None = None
        prev: tuple[float, float, float] | None = None
        for cur in pts:
            if prev is None:
                prev = cur
                continue
            dt = cur[0] - prev[0]
            if dt <= 0:
                continue
            d = haversine_m(prev[1], prev[2], cur[1], cur[2])
            if dt > p.max_gap_s:
                prev = cur
                continue
            tm = (prev[0] + cur[0]) / 2
            how = hour_of_week(tm, utc_offset_s(tm, self._zone))
            if d < p.stationary_m:
                self._add((prev[1] + cur[1]) / 2, (prev[2] + cur[2]) / 2, sector, how, d, dt)
            else:
                sector = _sector(bearing_deg(prev[1], prev[2], cur[1], cur[2]), p.sectors)
                n = max(1, math.ceil(d / (p.cell_m / 2)))
                for k in range(n):
                    f = (k + 0.5) / n
                    lat = prev[1] + (cur[1] - prev[1]) * f
                    lon = prev[2] + (cur[2] - prev[2]) * f
                    self._add(lat, lon, sector, how, d / n, dt / n)
            used += 1
            prev = cur
        return used

    def build(self) -> HistoricalSpeeds:
        """Freeze what was learned. Learning from nothing gives :meth:`HistoricalSpeeds.empty`."""
        p = self.params
        lo, hi = 1.0 / p.max_speed_mps, 1.0 / p.min_speed_mps

        def shrink(acc: _Acc, prior: float, k: float) -> float:
            return min(max((acc.t + k * prior) / (acc.d + k), lo), hi)

        g = shrink(self._global, 1.0 / p.default_speed_mps, p.global_prior_m)
        how_factor = {h: shrink(a, g, p.global_prior_m) / g for h, a in self._how.items()}
        area = area_paces(((c, a.d, a.t) for c, a in sorted(self._cell.items())), p, g)
        k = p.area_cells
        cell = {
            c: shrink(a, area[area_of(c, k)] if area else g, p.prior_m)
            for c, a in self._cell.items()
        }
        cell_dir = {k: shrink(a, cell[(k[0], k[1])], p.prior_m) for k, a in self._cell_dir.items()}
        cell_dir_how = {
            k: shrink(a, cell_dir[(k[0], k[1], k[2])] * how_factor[k[3]], p.prior_m)
            for k, a in self._cell_dir_how.items()
        }
        return HistoricalSpeeds(
            p, g, how_factor, cell, cell_dir, cell_dir_how, self._global.d, self._global.t, area
        )


def learn_speeds(
    traces: Iterable[Sequence[Fix]], params: SpeedParams | None = None
) -> HistoricalSpeeds:
    """Convenience: learn from many traces (one per vehicle trip) at once."""
    learner = SpeedLearner(params)
    for trace in traces:
        learner.add_trace(trace)
    return learner.build()
