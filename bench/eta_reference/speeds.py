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
4. hour of week (all cells) — applied to levels 2–3 as a time-of-day factor
5. global, itself shrunk toward ``default_speed_mps``

Grid cells are about ``cell_m`` square (latitude rows, each row's longitude step
widened by ``1/cos(lat)``), so they work for any route through the same streets, not
just named lines. Heading sectors split the cell by direction of travel (``sectors``
equal sectors, 0 = north). Hour of week is 0..167 from Monday 00:00 in ``timezone``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from bench.eta_reference.geo import (
    EARTH_RADIUS_M,
    FloatArray,
)

_M_PER_DEG_LAT = math.pi * EARTH_RADIUS_M / 180.0
_EPOCH_HOW_OFFSET = 72  # 1970-01-01 was a Thursday: hour 72 of a Monday-based week

CellKey = tuple[int, int]


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

    def __post_init__(self) -> None:
        for name in ("cell_m", "prior_m", "global_prior_m", "default_speed_mps", "max_gap_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"SpeedParams.{name} must be a positive number, got {v!r}")
        if not 0 < self.min_speed_mps <= self.default_speed_mps <= self.max_speed_mps:
            raise ValueError("need 0 < min_speed_mps <= default_speed_mps <= max_speed_mps")
        if self.sectors < 1:
            raise ValueError("SpeedParams.sectors must be >= 1")
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
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", ZoneInfo(self.params.timezone))

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
            base = self.cell_pace.get(cell, self.global_pace)
        return self._clamp(base * f)

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
        )
