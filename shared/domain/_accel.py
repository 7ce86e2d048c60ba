"""The geometry model's accelerators: vectorised and scan-based shortcuts, as plain functions.

Internal to shared/domain. shared/domain/geo.py states the model (what a track
cleaning or a route projection *is*); the functions here compute parts of it faster
(numpy, shapely's vectorised calls, C-level scans over memo tables) and must give
exactly what the model's plain formulation gives: where floating point could differ,
they screen with a margin and leave the undecided cases to the exact scalar code.
``tests/unit/test_eta_reference.py`` pins the combined result against the frozen
pre-optimisation model, bit for bit.

Pure and I/O-free, like the rest of the domain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import compress, islice, repeat
from operator import gt, is_not, or_
from typing import Protocol

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import LineString

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class Projection(Protocol):
    """What `project_points` needs of `geo.LocalProjection` (this module imports nothing
    of geo.py, which imports it)."""

    def to_xy_many(self, lats: FloatArray, lons: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Degrees to local metres."""
        ...


EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius (IUGG), metres: `shared.domain.geo.EARTH_RADIUS_M` (a test checks)."""

#: From how many unchecked pairs `screen_pairs` (numpy) beats the scalar loop.
VECTORISE_FROM = 12
#: Relative band around the speed limit where numpy's haversine cannot decide for
#: `geo.haversine_m`: the two evaluate the same formula with sin, cos and asin from
#: different libraries, a few ulps (1e-15) apart, up to ~1e-8 for nearly antipodal
#: points where asin is ill-conditioned. 1e-7 is well outside either.
SCREEN_BAND = 1e-7


def haversine_many(
    lat1: FloatArray, lon1: FloatArray, lat2: FloatArray, lon2: FloatArray
) -> FloatArray:
    """Vectorised `geo.haversine_m` (broadcasting numpy arrays; may differ from it in
    the last few bits, see `SCREEN_BAND`)."""
    p1 = np.radians(lat1)
    p2 = np.radians(lat2)
    dp = p2 - p1
    dl = np.radians(lon2 - lon1)
    h = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    out: FloatArray = 2.0 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(h)))
    return out


# -- clean_track -------------------------------------------------------------------------


def unchecked_pairs(
    ids: Sequence[int],
    fixes: Sequence[object],
    nexts: Mapping[int, object],
    next_mps: Mapping[int, float],
    recheck_faster: bool,
    max_speed_mps: float,
) -> list[int]:
    """The ``i`` whose pair ``(fixes[i], fixes[i + 1])`` is not known plausible: the memo
    (``nexts``: id of a fix -> the next fix it was checked with) names another next fix,
    or (only looked at when ``recheck_faster``) the pair was checked at a speed above
    ``max_speed_mps``. ``ids`` are the fixes' ids. A C-level scan: a sliding window's
    unchecked pairs are its newest few, and this finds them without a Python loop."""
    unchecked = map(is_not, map(nexts.get, ids), islice(fixes, 1, None))
    if recheck_faster:
        faster = map(gt, map(next_mps.get, ids, repeat(0.0)), repeat(max_speed_mps))
        unchecked = map(or_, unchecked, faster)
    return list(compress(range(len(fixes) - 1), unchecked))


def screen_pairs(
    ta: list[float],
    tb: list[float],
    lat_a: list[float],
    lon_a: list[float],
    lat_b: list[float],
    lon_b: list[float],
    max_speed_mps: float,
) -> list[bool] | None:
    """`clean_track`'s check of pairs (a, b), vectorised: ``None`` if one certainly
    fails (b not later than a, or farther than ``max_speed_mps`` allows), else per
    pair whether it is certainly plausible; False means undecided (distance within
    `SCREEN_BAND` of the limit), for the exact scalar check."""
    t_a = np.array(ta)
    t_b = np.array(tb)
    if not bool(np.all(t_a < t_b)):
        return None
    d = haversine_many(np.array(lat_a), np.array(lon_a), np.array(lat_b), np.array(lon_b))
    limit = max_speed_mps * np.maximum(t_b - t_a, 1.0)
    if bool(np.any(d > limit * (1.0 + SCREEN_BAND))):
        return None
    sure: list[bool] = (d <= limit * (1.0 - SCREEN_BAND)).tolist()
    return sure


# -- route projection ----------------------------------------------------------------------


def project_points(
    proj: Projection, line: LineString, length: float, lats: FloatArray, lons: FloatArray
) -> tuple[list[float], list[float]]:
    """The global projection of each point onto ``line`` (in ``proj``'s metres): its
    distance along, clamped to ``[0, length]``, and its offset. Elementwise numpy and
    per-point GEOS results do not depend on which other points are in the call, so
    projecting a few new points gives exactly what projecting them with others does."""
    xs, ys = proj.to_xy_many(lats, lons)
    pts = shapely.points(xs, ys)
    raw = shapely.line_locate_point(line, pts).tolist()
    offsets: list[float] = shapely.distance(line, pts).tolist()
    return [min(max(along, 0.0), length) for along in raw], offsets


def farther_than(line: LineString, x: float, y: float, lo: float, hi: float, limit: float) -> bool:
    """True only if every point of ``line`` between ``lo`` and ``hi`` metres along is
    farther than ``limit`` from ``(x, y)``, by a margin.

    A lower bound on what ``substring(line, lo, hi).distance(point)`` returns: the
    distance to the segments overlapping ``[lo - 1 m, hi + 1 m]`` (the cut line's
    segments are parts of them). Computed with numpy rather than GEOS, so it may differ
    from GEOS's figures in the last bits: the 1 m and 1 mm margins are many orders of
    magnitude wider than that, and when in doubt it says False and the caller does the
    exact computation.
    """
    xy = shapely.get_coordinates(line)
    ax, ay = xy[:-1, 0], xy[:-1, 1]
    dx, dy = xy[1:, 0] - ax, xy[1:, 1] - ay
    seg = np.hypot(dx, dy)
    end = np.cumsum(seg)
    start = np.concatenate([[0.0], end[:-1]])
    first = int(np.searchsorted(end, lo - 1.0, side="left"))
    last = int(np.searchsorted(start, hi + 1.0, side="right"))
    if last <= first:
        return False
    ax, ay, dx, dy = ax[first:last], ay[first:last], dx[first:last], dy[first:last]
    len2 = dx * dx + dy * dy
    r = np.clip(((x - ax) * dx + (y - ay) * dy) / np.where(len2 > 0, len2, 1.0), 0.0, 1.0)
    nearest = float(np.min(np.hypot(ax + r * dx - x, ay + r * dy - y)))
    return nearest - 1e-3 > limit


def keeps_global(
    alongs: list[float],
    near_m: float | None,
    back_m: float,
    ahead_m: float,
    length: float,
    simple: bool,
) -> BoolArray:
    """Per point of a track, whether `Route._near` certainly keeps its global nearest
    point (distance along ``alongs[i]``) when hinted with the previous point's global
    one (the first point with ``near_m``): the window around the hint is degenerate or,
    on a simple line, holds it. A point with no hint keeps it."""
    along = np.array(alongs)
    previous = np.concatenate([[np.nan if near_m is None else near_m], along[:-1]])
    lo = np.maximum(previous - back_m, 0.0)
    hi = np.minimum(previous + ahead_m, length)
    keep: BoolArray = (hi - lo < 1.0) | ((lo <= 0.0) & (hi >= length))
    if simple:
        keep |= (lo <= along) & (along <= hi)
    if near_m is None:
        keep[0] = True  # no hint: the global nearest point
    return keep


def all_nearest_in_window(
    raw_alongs: FloatArray,
    length: float,
    near_m: float | None,
    back_m: float,
    ahead_m: float,
    simple: bool,
) -> bool:
    """True when `Route._near` would return the global nearest point for every point of
    a track: each one's window (around the previous one's distance along, the first
    one's around ``near_m``) is degenerate or, on a simple line, holds it."""
    along = np.minimum(np.maximum(raw_alongs, 0.0), length)
    previous = along[:-1]
    ok = np.ones(len(along), dtype=bool)
    if near_m is None:
        current = along[1:]
        keep = ok[1:]
    else:
        previous = np.concatenate([[near_m], previous])
        current = along
        keep = ok
    lo = np.maximum(previous - back_m, 0.0)
    hi = np.minimum(previous + ahead_m, length)
    degenerate = (hi - lo < 1.0) | ((lo <= 0.0) & (hi >= length))
    inside = (lo <= current) & (current <= hi) if simple else False
    keep &= degenerate | inside
    return bool(ok.all())
