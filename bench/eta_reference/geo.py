"""City-scale geodesy: distances, a local metric projection, and routes in metres.

Pure and I/O-free. Coordinates are WGS84 degrees ``(lat, lon)``; the Earth is a sphere
of mean radius :data:`EARTH_RADIUS_M`. Against the WGS84 ellipsoid that costs at most
~0.5 % in distance, the same everywhere in one city, which is far below GPS and
routing noise for ETA purposes.

The local projection is the spherical *azimuthal equidistant* projection centred on a
reference point: distances and bearings from the centre are exact (on the sphere), and
any other distance within radius ``d`` of the centre is off by at most ``(d/R)²/6``
relative, i.e. 0.001 % at 50 km, 0.04 % at 300 km. Routes must not cross the ±180°
meridian (no city does).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import LineString, Point
from shapely.ops import substring

from shared.domain.geo import Fix as Fix  # the production class: both models see the same fixes

EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius (IUGG), metres."""

DEFAULT_ON_ROUTE_M = 150.0
"""A position farther than this from the route line is off route."""

FloatArray = npt.NDArray[np.float64]
LatLon = tuple[float, float]


def check_lat_lon(lat: float, lon: float) -> None:
    """Raise ``ValueError`` unless ``lat``/``lon`` are finite and in range."""
    if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
        raise ValueError(f"latitude must be finite and within [-90, 90], got {lat!r}")
    if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
        raise ValueError(f"longitude must be finite and within [-180, 180], got {lon!r}")


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two points (degrees). Symmetric, >= 0."""
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2.0 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def haversine_many(
    lat1: FloatArray, lon1: FloatArray, lat2: FloatArray, lon2: FloatArray
) -> FloatArray:
    """Vectorised :func:`haversine_m` (broadcasting numpy arrays)."""
    p1 = np.radians(lat1)
    p2 = np.radians(lat2)
    dp = p2 - p1
    dl = np.radians(lon2 - lon1)
    h = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    out: FloatArray = 2.0 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(h)))
    return out


def bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial bearing from point 1 to point 2, degrees clockwise from north in [0, 360)."""
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    y = math.sin(dl) * math.cos(p2)
    x = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(y, x)) % 360.0


def fix_sort_key(f: Fix) -> tuple[float, float, float, float]:
    """Total order on fixes: time, then position, then speed (unknown first)."""
    return (f.t, f.lat, f.lon, -1.0 if f.speed_mps is None else f.speed_mps)


def clean_track(fixes: Iterable[Fix], max_speed_mps: float = 60.0) -> list[Fix]:
    """One vehicle's fixes in time order, without duplicates and isolated GPS jumps.

    Deterministic for any input order (sorted by :func:`fix_sort_key`, exact duplicates
    removed). A fix whose implied speed from the last kept fix exceeds ``max_speed_mps``
    is dropped unless the next fix confirms it (plausible from it and implausible from
    the last kept one): a single outlier never survives, while a genuine relocation
    (two agreeing fixes) does, and then a lone first fix it contradicts is dropped.
    Fixes with equal times count as one second apart.
    """
    given = list(fixes)
    if all(a.t < b.t for a, b in pairwise(given)):
        pts = given  # already in time order, hence distinct: what sorting would give
    else:
        pts = sorted(set(given), key=fix_sort_key)

    def plausible(a: Fix, b: Fix) -> bool:
        dt = max(b.t - a.t, 1.0)
        return haversine_m(a.lat, a.lon, b.lat, b.lon) <= max_speed_mps * dt

    kept: list[Fix] = []
    for i, p in enumerate(pts):
        if not kept or plausible(kept[-1], p):
            kept.append(p)
            continue
        nxt = pts[i + 1] if i + 1 < len(pts) else None
        if nxt is not None and plausible(p, nxt) and not plausible(kept[-1], nxt):
            if len(kept) == 1:
                kept.clear()
            kept.append(p)
    return kept


@dataclass(frozen=True, slots=True)
class LocalProjection:
    """Spherical azimuthal equidistant projection centred on ``(lat0, lon0)``.

    ``x`` points east, ``y`` north, both metres. ``to_latlon(*to_xy(p)) == p`` up to
    floating-point rounding (sub-millimetre).
    """

    lat0: float
    lon0: float
    _sin0: float = field(init=False, repr=False, compare=False)
    _cos0: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_lat_lon(self.lat0, self.lon0)
        object.__setattr__(self, "_sin0", math.sin(math.radians(self.lat0)))
        object.__setattr__(self, "_cos0", math.cos(math.radians(self.lat0)))

    def to_xy_many(self, lats: FloatArray, lons: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Project arrays of degrees to metres."""
        phi = np.radians(np.asarray(lats, dtype=np.float64))
        dl = np.radians(np.asarray(lons, dtype=np.float64) - self.lon0)
        cos_phi = np.cos(phi)
        sin_phi = np.sin(phi)
        xs = cos_phi * np.sin(dl)
        ys = self._cos0 * sin_phi - self._sin0 * cos_phi * np.cos(dl)
        cos_c = self._sin0 * sin_phi + self._cos0 * cos_phi * np.cos(dl)
        sin_c = np.hypot(xs, ys)
        c = np.arctan2(sin_c, cos_c)
        # k = c / sin(c) -> 1 at the centre; the series avoids 0/0 there.
        k = np.where(sin_c > 1e-9, c / np.where(sin_c > 1e-9, sin_c, 1.0), 1.0 + c * c / 6.0)
        x: FloatArray = EARTH_RADIUS_M * k * xs
        y: FloatArray = EARTH_RADIUS_M * k * ys
        return x, y

    def to_latlon_many(self, xs: FloatArray, ys: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Inverse of :meth:`to_xy_many`."""
        x = np.asarray(xs, dtype=np.float64)
        y = np.asarray(ys, dtype=np.float64)
        rho = np.hypot(x, y)
        c = rho / EARTH_RADIUS_M
        sin_c = np.sin(c)
        cos_c = np.cos(c)
        safe_rho = np.where(rho > 0.0, rho, 1.0)
        arg = cos_c * self._sin0 + np.where(rho > 0.0, y * sin_c * self._cos0 / safe_rho, 0.0)
        lat = np.degrees(np.arcsin(np.clip(arg, -1.0, 1.0)))
        lon = self.lon0 + np.degrees(
            np.arctan2(x * sin_c, rho * self._cos0 * cos_c - y * self._sin0 * sin_c)
        )
        lon = np.where(rho > 0.0, lon, self.lon0)
        lat_out: FloatArray = np.where(rho > 0.0, lat, self.lat0)
        lon_out: FloatArray = (lon + 180.0) % 360.0 - 180.0
        return lat_out, lon_out

    def to_xy(self, lat: float, lon: float) -> tuple[float, float]:
        """Project one point (degrees) to metres."""
        x, y = self.to_xy_many(np.array([lat]), np.array([lon]))
        return float(x[0]), float(y[0])

    def to_latlon(self, x: float, y: float) -> LatLon:
        """Unproject one point (metres) to degrees."""
        lat, lon = self.to_latlon_many(np.array([x]), np.array([y]))
        return float(lat[0]), float(lon[0])


@dataclass(frozen=True, slots=True)
class RoutePosition:
    """Where a point lies relative to a route.

    ``distance_along_m`` is measured from the route start to the nearest point of the
    route line, in ``[0, length_m]``; ``offset_m`` is the distance from the point to that
    nearest point; ``on_route`` is ``offset_m <= on_route_threshold_m`` of the route.
    """

    distance_along_m: float
    offset_m: float
    on_route: bool


@dataclass(frozen=True, slots=True)
class RouteSamples:
    """A route cut into equal pieces: their midpoints, headings and lengths.

    ``start_m[i]`` is where piece ``i`` starts along the route; every piece is ``step_m``
    long except possibly the last.
    """

    step_m: float
    start_m: FloatArray
    length_m: FloatArray
    lat: FloatArray
    lon: FloatArray
    heading_deg: FloatArray


class Route:
    """A planned route: a polyline in a local metric projection, built once and reused.

    Immutable after construction. The shapely ``LineString`` (prepared) and the local
    projection (centred on the middle of the route's bounding box) are built once in the
    constructor; reuse one ``Route`` for every position of a shipment (see
    :func:`route_from_polyline`, which caches by encoded string).

    Consecutive points closer than 0.5 m are merged. Raises ``ValueError`` for fewer
    than two distinct points or invalid coordinates.
    """

    __slots__ = (
        "__weakref__",
        "_line",
        "_points",
        "_proj",
        "_samples",
        "_simple",
        "_threshold",
    )

    def __init__(
        self,
        points: Sequence[LatLon],
        *,
        on_route_threshold_m: float = DEFAULT_ON_ROUTE_M,
    ) -> None:
        if not (math.isfinite(on_route_threshold_m) and on_route_threshold_m > 0):
            raise ValueError("on_route_threshold_m must be a positive number")
        for lat, lon in points:
            check_lat_lon(lat, lon)
        if len(points) < 2:
            raise ValueError("a route needs at least two points")
        lats = np.array([p[0] for p in points], dtype=np.float64)
        lons = np.array([p[1] for p in points], dtype=np.float64)
        proj = LocalProjection(
            float((lats.min() + lats.max()) / 2), float((lons.min() + lons.max()) / 2)
        )
        xs, ys = proj.to_xy_many(lats, lons)
        keep = [0]
        for i in range(1, len(xs)):
            j = keep[-1]
            if math.hypot(xs[i] - xs[j], ys[i] - ys[j]) >= 0.5:
                keep.append(i)
        if len(keep) < 2:
            raise ValueError("a route needs at least two distinct points")
        self._points: tuple[LatLon, ...] = tuple((float(lats[i]), float(lons[i])) for i in keep)
        self._proj = proj
        self._line = LineString(np.column_stack([xs[keep], ys[keep]]))
        shapely.prepare(self._line)
        # A line that never touches or crosses itself has no two equally near points
        # on different legs; `project` relies on that for its fast path.
        self._simple = bool(shapely.is_simple(self._line))
        self._threshold = float(on_route_threshold_m)
        self._samples: dict[float, RouteSamples] = {}

    @property
    def points(self) -> tuple[LatLon, ...]:
        """The route's vertices (degrees), after merging near-duplicates."""
        return self._points

    @property
    def projection(self) -> LocalProjection:
        """The local projection the route's metres are measured in."""
        return self._proj

    @property
    def length_m(self) -> float:
        """Length along the route, metres."""
        return float(self._line.length)

    @property
    def on_route_threshold_m(self) -> float:
        return self._threshold

    def _position(self, x: float, y: float, line: LineString, offset0: float) -> RoutePosition:
        pt = Point(x, y)
        along = offset0 + float(line.project(pt))
        off = float(line.distance(pt))
        return RoutePosition(min(max(along, 0.0), self.length_m), off, off <= self._threshold)

    def project(
        self,
        lat: float,
        lon: float,
        *,
        near_m: float | None = None,
        back_m: float = 500.0,
        ahead_m: float = 5000.0,
        slack_m: float = 30.0,
    ) -> RoutePosition:
        """Project a point onto the route.

        Without ``near_m`` the nearest point of the whole route wins. With ``near_m``
        (where the vehicle was last seen along the route) the nearest point within
        ``[near_m - back_m, near_m + ahead_m]`` wins unless it is more than ``slack_m``
        farther than the global nearest point: on routes that pass the same street twice
        this keeps progress on the leg the vehicle is actually on.
        """
        check_lat_lon(lat, lon)
        x, y = self._proj.to_xy(lat, lon)
        best = self._position(x, y, self._line, 0.0)
        return self._near(x, y, best, near_m, back_m, ahead_m, slack_m)

    def _near(
        self,
        x: float,
        y: float,
        best: RoutePosition,
        near_m: float | None,
        back_m: float,
        ahead_m: float,
        slack_m: float,
    ) -> RoutePosition:
        """`project`'s choice between the global nearest point `best` and the nearest
        point within [near_m - back_m, near_m + ahead_m]."""
        if near_m is None:
            return best
        lo = max(0.0, near_m - back_m)
        hi = min(self.length_m, near_m + ahead_m)
        if hi - lo < 1.0 or (lo <= 0.0 and hi >= self.length_m):
            return best
        if self._simple and lo <= best.distance_along_m <= hi:
            # The global nearest point lies in the window, so it is the window's nearest
            # point too (on a simple line the nearest point is unique): skip cutting the
            # line, which costs more than everything else here together.
            return best
        local = self._position(x, y, substring(self._line, lo, hi), lo)
        return local if local.offset_m <= best.offset_m + slack_m else best

    def project_track(
        self,
        lats: Sequence[float],
        lons: Sequence[float],
        *,
        near_m: float | None = None,
        back_m: float = 500.0,
        ahead_m: float = 5000.0,
        slack_m: float = 30.0,
    ) -> list[RoutePosition]:
        """:meth:`project` of each point in turn, each with the previous result's
        distance along as its ``near_m`` (the first with ``near_m``): what a loop of
        :meth:`project` calls returns, with the projections done in one vectorised
        pass."""
        for lat, lon in zip(lats, lons, strict=True):
            check_lat_lon(lat, lon)
        if not lats:
            return []
        xs, ys = self._proj.to_xy_many(np.asarray(lats), np.asarray(lons))
        pts = shapely.points(xs, ys)
        raw = shapely.line_locate_point(self._line, pts)
        alongs = raw.tolist()
        offsets = shapely.distance(self._line, pts).tolist()
        length = self.length_m
        threshold = self._threshold
        if self._all_nearest_in_window(raw, length, near_m, back_m, ahead_m):
            # The usual case: every point's global nearest lies in the window around the
            # previous one, so `_near` would keep each as it is.
            return [
                RoutePosition(min(max(along, 0.0), length), off, off <= threshold)
                for along, off in zip(alongs, offsets, strict=True)
            ]
        found: list[RoutePosition] = []
        hint = near_m
        for i, (along, off) in enumerate(zip(alongs, offsets, strict=True)):
            best = RoutePosition(min(max(along, 0.0), length), off, off <= threshold)
            if hint is not None:
                best = self._near(float(xs[i]), float(ys[i]), best, hint, back_m, ahead_m, slack_m)
            found.append(best)
            hint = best.distance_along_m
        return found

    def _all_nearest_in_window(
        self,
        raw_alongs: FloatArray,
        length: float,
        near_m: float | None,
        back_m: float,
        ahead_m: float,
    ) -> bool:
        """True when `_near` would return the global nearest point for every point of a
        track: each one's window (around the previous one's distance along, the first
        one's around `near_m`) is degenerate or, on a simple line, holds it."""
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
        inside = (lo <= current) & (current <= hi) if self._simple else False
        keep &= degenerate | inside
        return bool(ok.all())

    def project_many(self, lats: FloatArray, lons: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Vectorised global projection: ``(distance_along_m, offset_m)`` arrays."""
        xs, ys = self._proj.to_xy_many(lats, lons)
        pts = shapely.points(xs, ys)
        along: FloatArray = np.asarray(shapely.line_locate_point(self._line, pts), np.float64)
        off: FloatArray = np.asarray(shapely.distance(self._line, pts), np.float64)
        return along, off

    def remaining_m(self, from_distance_m: float) -> float:
        """Distance from ``from_distance_m`` (clamped to the route) to the route's end, >= 0."""
        return self.length_m - min(max(from_distance_m, 0.0), self.length_m)

    def point_at(self, distance_m: float) -> LatLon:
        """The point ``distance_m`` along the route (clamped to its ends)."""
        p = self._line.interpolate(min(max(distance_m, 0.0), self.length_m))
        return self._proj.to_latlon(float(p.x), float(p.y))

    def samples(self, step_m: float = 100.0) -> RouteSamples:
        """The route cut into ``step_m`` pieces (cached per step)."""
        cached = self._samples.get(step_m)
        if cached is not None:
            return cached
        if not (math.isfinite(step_m) and step_m > 0):
            raise ValueError("step_m must be a positive number")
        length = self.length_m
        n = max(1, math.ceil(length / step_m))
        starts = np.arange(n, dtype=np.float64) * step_m
        ends = np.minimum(starts + step_m, length)
        pts = shapely.line_interpolate_point(self._line, np.concatenate([starts, ends]))
        coords = shapely.get_coordinates(pts)
        x0, y0 = coords[:n, 0], coords[:n, 1]
        x1, y1 = coords[n:, 0], coords[n:, 1]
        lat, lon = self._proj.to_latlon_many((x0 + x1) / 2, (y0 + y1) / 2)
        heading = np.degrees(np.arctan2(x1 - x0, y1 - y0)) % 360.0
        result = RouteSamples(step_m, starts, ends - starts, lat, lon, heading)
        self._samples[step_m] = result
        return result
