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
from datetime import datetime
from functools import lru_cache
from itertools import compress, pairwise, repeat
from operator import attrgetter, is_

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import LineString, Point
from shapely.ops import substring

from shared.domain import _accel
from shared.domain.polyline import decode as decode_polyline

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


def bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial bearing from point 1 to point 2, degrees clockwise from north in [0, 360)."""
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    y = math.sin(dl) * math.cos(p2)
    x = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(y, x)) % 360.0


#: Field metadata of `Fix`'s optional readings, for shared.statecodec: a stored 0
#: decodes as None (see `Fix`).
_ZERO_IS_UNKNOWN = {"zero_is_none": True}


@dataclass(frozen=True, slots=True)
class Fix:
    """One GPS position of a vehicle: the one type of a point from its decoding in the
    projector to the ETA model (the vehicle fold's motion, the history rows, the track
    cache and the model share the same objects).

    ``at`` must be timezone-aware (any zone; compared as instants). ``speed_mps`` (the
    device-reported ground speed), ``heading_deg`` (degrees clockwise from north) and
    ``accuracy_m`` (horizontal accuracy radius) are ``None`` when unknown, else finite
    and >= 0.

    A plain value: what the ETA model works out about a fix (its projection onto a
    route, whether the next fix of its track is plausible from it) is kept by the
    caller in a :class:`TrackMemo`, never on the fix.

    Stored (shared.statecodec: vehicle states, tracking rows) under the keys the
    earlier ``Position`` type used, so old rows and states read back: ``at`` as
    ``recorded_at``, and a stored ``0`` for speed, heading or accuracy reads back as
    ``None``: ``0`` meant unknown in what earlier versions stored (as it does on the
    wire, gps.proto), and no fix decoded from the wire carries a known 0.
    """

    at: datetime = field(metadata={"json_key": "recorded_at"})
    lat: float
    lon: float
    speed_mps: float | None = field(default=None, metadata=_ZERO_IS_UNKNOWN)
    heading_deg: float | None = field(default=None, metadata=_ZERO_IS_UNKNOWN)
    accuracy_m: float | None = field(default=None, metadata=_ZERO_IS_UNKNOWN)
    #: ``at`` as epoch seconds (UTC), computed once: the ETA model reads it many times per
    #: fix. A plain slot, not a property: reading it is then about twice as fast.
    t: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.at.tzinfo is None or self.at.utcoffset() is None:
            raise ValueError("Fix.at must be timezone-aware")
        check_lat_lon(self.lat, self.lon)
        for name in ("speed_mps", "heading_deg", "accuracy_m"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be None or finite and >= 0, got {value!r}")
        _SET(self, "t", self.at.timestamp())

    @classmethod
    def trusted(
        cls,
        at: datetime,
        lat: float,
        lon: float,
        speed_mps: float | None,
        heading_deg: float | None = None,
        accuracy_m: float | None = None,
        *,
        t: float | None = None,
    ) -> Fix:
        """``Fix(at, lat, lon, speed_mps, heading_deg, accuracy_m)`` without its checks,
        for values already validated (the projector's decoded GPS points, its own
        history rows). Checking every point again was a tenth of the projector's time.
        ``t``, when given, must equal ``at.timestamp()`` (a caller decoding a time from
        integer seconds has it for less)."""
        fix = object.__new__(cls)
        _SET(fix, "at", at)
        _SET(fix, "lat", lat)
        _SET(fix, "lon", lon)
        _SET(fix, "speed_mps", speed_mps)
        _SET(fix, "heading_deg", heading_deg)
        _SET(fix, "accuracy_m", accuracy_m)
        _SET(fix, "t", at.timestamp() if t is None else t)
        return fix


_SET = object.__setattr__


class TrackMemo:
    """What the ETA model worked out about a vehicle's fixes, kept by the caller.

    The projector passes the same fix objects to the ETA model call after call (a
    vehicle's window slides by a few dozen fixes), so what depends only on the fixes is
    worked out once and kept here: each fix's global projection onto each route it was
    projected onto (:meth:`Route.project_fixes`), and which consecutive pairs
    :func:`clean_track` checked plausible, at which speed. A memo never changes a
    result, only what is recomputed: passing none (or a fresh one) gives the same
    estimates.

    Entries are keyed by fix *identity*, which is what makes the lookups cheap (no
    hashing of dates and floats): a fix equal to a memoised one but another object is
    simply worked out again. The memo holds a reference to every fix it has an entry
    for, so no id is reused while its entry exists. It is bounded by its owner:
    :meth:`retain` drops every fix but those given, a little late (the projector's
    track cache calls it with the vehicle's cached track on each commit). At most
    `ROUTES` routes are remembered, the least recently used dropped first. Not
    thread-safe; one memo per vehicle.
    """

    __slots__ = ("_fixes", "_max_checked_mps", "_next", "_next_mps", "_routes")

    #: Routes remembered per memo (a vehicle carries a few shipments at once).
    ROUTES = 4
    #: What :meth:`retain` lets the memo hold beyond the fixes it is given: this share
    #: of them, plus `SPARE_MIN` entries.
    SPARE = 0.25
    SPARE_MIN = 16

    def __init__(self) -> None:
        #: Every fix with an entry, by id: keeps the ids valid.
        self._fixes: dict[int, Fix] = {}
        #: id(a) -> b: the pair (a, b) was checked plausible at `_next_mps[id(a)]`.
        self._next: dict[int, Fix] = {}
        self._next_mps: dict[int, float] = {}
        #: The highest speed any pair was checked at (see `_ordered_and_plausible`).
        self._max_checked_mps = 0.0
        #: Per route, id(fix) -> its global projection: distance along + offset * 1j (a
        #: complex holds the two floats in one 32-byte object; a tuple takes 112 bytes).
        self._routes: dict[Route, dict[int, complex]] = {}

    def __len__(self) -> int:
        """How many fixes have an entry."""
        return len(self._fixes)

    def retain(self, fixes: Sequence[Fix]) -> None:
        """Forget every fix but ``fixes`` (those without an entry are ignored), a little
        late: the memo may keep up to :attr:`SPARE` more.

        Made for an owner whose track slides, calling this on every change with the
        track oldest first: the entries of fixes older than ``fixes[0]`` are dropped
        in one scan from the oldest entry on, which costs what is dropped, not the
        track (a pass over the whole memo per vehicle per batch was the projector's
        largest cost at 20,000 points/s). What that leaves (fixes given in another
        order, entries of fixes not in the track) is dropped by a full pass once the
        memo holds more than the spare over ``fixes``."""
        held = self._fixes
        if fixes and held:
            oldest = fixes[0].t
            # Entries are in the order they were made, for a sliding track its time
            # order; dropping an entry is always safe (it is worked out again).
            stale = []
            for key, fix in held.items():
                if fix.t >= oldest:
                    break
                stale.append(key)
            if stale:
                self._forget(stale)
        if len(held) <= len(fixes) + self.SPARE_MIN + len(fixes) * self.SPARE:
            return
        keep = {key: f for f in fixes if (key := id(f)) in held}
        self._fixes = keep
        self._next = {k: b for k, b in self._next.items() if k in keep and id(b) in keep}
        self._next_mps = {k: self._next_mps[k] for k in self._next}
        self._routes = {
            route: {k: pos for k, pos in table.items() if k in keep}
            for route, table in self._routes.items()
        }

    def _forget(self, keys: Iterable[int]) -> None:
        """Drop the entries of the fixes with these ids (all held)."""
        held, nexts, speeds = self._fixes, self._next, self._next_mps
        tables = list(self._routes.values())
        for key in keys:
            del held[key]
            nexts.pop(key, None)
            speeds.pop(key, None)
            for table in tables:
                table.pop(key, None)

    def _projections(self, route: Route) -> dict[int, complex]:
        """The projections onto `route`, made the most recently used route's."""
        table = self._routes.pop(route, None)
        if table is None:
            table = {}
            if len(self._routes) >= self.ROUTES:
                del self._routes[next(iter(self._routes))]
        self._routes[route] = table
        return table


def fix_sort_key(f: Fix) -> tuple[float, float, float, float, float, float]:
    """Total order on fixes: time, then position, then speed, heading and accuracy
    (unknown first)."""
    return (
        f.t,
        f.lat,
        f.lon,
        -1.0 if f.speed_mps is None else f.speed_mps,
        -1.0 if f.heading_deg is None else f.heading_deg,
        -1.0 if f.accuracy_m is None else f.accuracy_m,
    )


def _same_reading(a: Fix, b: Fix) -> bool:
    """Whether two fixes say the same to the ETA model: time, position and speed (it
    reads no heading or accuracy)."""
    return a.t == b.t and a.lat == b.lat and a.lon == b.lon and a.speed_mps == b.speed_mps


def clean_track(
    fixes: Iterable[Fix], max_speed_mps: float = 60.0, memo: TrackMemo | None = None
) -> list[Fix]:
    """One vehicle's fixes in time order, without duplicates and isolated GPS jumps.

    Deterministic for any input order (sorted by :func:`fix_sort_key`; of fixes with
    the same time, position and speed, the first in that order is kept). A fix whose
    implied speed from the last kept fix exceeds ``max_speed_mps`` is dropped unless
    the next fix confirms it (plausible from it and implausible from
    the last kept one): a single outlier never survives, while a genuine relocation
    (two agreeing fixes) does, and then a lone first fix it contradicts is dropped.
    Fixes with equal times count as one second apart. ``memo`` (see :class:`TrackMemo`)
    only saves checking pairs checked before.
    """
    given = list(fixes)

    def plausible(a: Fix, b: Fix) -> bool:
        dt = max(b.t - a.t, 1.0)
        return haversine_m(a.lat, a.lon, b.lat, b.lon) <= max_speed_mps * dt

    if _ordered_and_plausible(given, max_speed_mps, TrackMemo() if memo is None else memo):
        # Strictly in time order and every step plausible: the loop below would keep
        # every fix, in this order.
        return given
    if all(a.t < b.t for a, b in pairwise(given)):
        pts = given  # already in time order, hence distinct: what sorting would give
    else:
        pts = []
        for f in sorted(given, key=fix_sort_key):
            if not pts or not _same_reading(pts[-1], f):
                pts.append(f)

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


def _ordered_and_plausible(given: list[Fix], max_speed_mps: float, memo: TrackMemo) -> bool:
    """Whether every fix is strictly later than the one before and plausible from it at
    ``max_speed_mps`` (what `clean_track` checks), remembering checked pairs in
    ``memo`` so that a track passed again only checks its new pairs.

    A pair checked at some speed stays plausible at any higher one (``d <= v * dt`` is
    monotone in ``v``, also in floating point), so a remembered pair counts as checked
    unless it was checked at a higher speed than ``max_speed_mps``.
    """
    if len(given) < 2:
        return True
    ids = list(map(id, given))
    todo = _accel.unchecked_pairs(
        ids, given, memo._next, memo._next_mps, memo._max_checked_mps > max_speed_mps,
        max_speed_mps,
    )  # fmt: skip
    if not todo:
        return True
    memo._max_checked_mps = max(memo._max_checked_mps, max_speed_mps)
    checked: list[int] = []
    ok = True
    if len(todo) >= _accel.VECTORISE_FROM:
        # A numpy screen decides most pairs at once; the scalar check below decides
        # the rest exactly.
        firsts = [given[i] for i in todo]
        seconds = [given[i + 1] for i in todo]
        sure = _accel.screen_pairs(
            [f.t for f in firsts], [f.t for f in seconds],
            [f.lat for f in firsts], [f.lon for f in firsts],
            [f.lat for f in seconds], [f.lon for f in seconds],
            max_speed_mps,
        )  # fmt: skip
        if sure is None:
            return False
        checked = [i for i, certain in zip(todo, sure, strict=True) if certain]
        todo = [i for i, certain in zip(todo, sure, strict=True) if not certain]
    for i in todo:
        a, b = given[i], given[i + 1]
        ta, tb = a.t, b.t
        if not ta < tb:
            ok = False
            break
        if haversine_m(a.lat, a.lon, b.lat, b.lon) > max_speed_mps * max(tb - ta, 1.0):
            ok = False
            break
        checked.append(i)
    # The pairs found plausible are remembered, also when another one failed.
    held, nexts, speeds = memo._fixes, memo._next, memo._next_mps
    for i in checked:
        key = ids[i]
        held[key] = given[i]
        nexts[key] = given[i + 1]
        speeds[key] = max_speed_mps
    return ok


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
        "_coords",
        "_length",
        "_line",
        "_point_memo",
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
        # The vertices as one (n, 2) array: 16 bytes a vertex instead of ~100 for a
        # tuple of float pairs; `points` builds the tuples when asked (rarely).
        self._coords = np.column_stack([lats[keep], lons[keep]])
        self._proj = proj
        self._line = LineString(np.column_stack([xs[keep], ys[keep]]))
        shapely.prepare(self._line)
        # A line that never touches or crosses itself has no two equally near points
        # on different legs; `project` relies on that for its fast path.
        self._simple = bool(shapely.is_simple(self._line))
        self._threshold = float(on_route_threshold_m)
        self._length = float(self._line.length)
        self._samples: dict[float, RouteSamples] = {}
        #: Global projections of single points (`project` without ``near_m``): the ETA
        #: model projects each shipment's destination on every call. At most
        #: `_POINT_MEMO_SIZE` entries (oldest dropped first).
        self._point_memo: dict[LatLon, RoutePosition] = {}

    @property
    def points(self) -> tuple[LatLon, ...]:
        """The route's vertices (degrees), after merging near-duplicates."""
        return tuple((lat, lon) for lat, lon in self._coords.tolist())

    @property
    def projection(self) -> LocalProjection:
        """The local projection the route's metres are measured in."""
        return self._proj

    @property
    def length_m(self) -> float:
        """Length along the route, metres."""
        return self._length

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
        memo = self._point_memo
        key = (lat, lon)
        best = memo.get(key)
        if best is None:
            x, y = self._proj.to_xy(lat, lon)
            best = self._position(x, y, self._line, 0.0)
            if len(memo) >= _POINT_MEMO_SIZE:
                del memo[next(iter(memo))]
            memo[key] = best
            return self._near(x, y, best, near_m, back_m, ahead_m, slack_m)
        if near_m is None:
            return best
        x, y = self._proj.to_xy(lat, lon)
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
        if _accel.farther_than(self._line, x, y, lo, hi, best.offset_m + slack_m):
            # The window's nearest point is certainly worse than `best` by more than the
            # slack, so `best` wins: skip cutting the line. The usual case when the hint
            # comes from the newest fix of the previous call and this fix is the oldest
            # of the window, kilometres behind it.
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
        if _accel.all_nearest_in_window(raw, length, near_m, back_m, ahead_m, self._simple):
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

    def project_fixes(
        self,
        fixes: Sequence[Fix],
        *,
        near_m: float | None = None,
        back_m: float = 500.0,
        ahead_m: float = 5000.0,
        slack_m: float = 30.0,
        memo: TrackMemo | None = None,
    ) -> tuple[list[float], list[float]]:
        """:meth:`project_track` of the fixes' positions, as two lists: each fix's
        ``distance_along_m`` and ``offset_m`` (the same values, without building a
        :class:`RoutePosition` per fix).

        The global projection of each fix depends only on its position: ``memo`` (see
        :class:`TrackMemo`) keeps it per fix and route, so a fix passed again is not
        projected again. The choice between it and the nearest point around the
        previous position (``near_m``) is redone every call, with :meth:`project`'s rule.
        """
        if not fixes:
            return [], []
        if memo is None:
            memo = TrackMemo()
        held = memo._fixes
        table = memo._projections(self)
        ids = list(map(id, fixes))
        pos: list[complex | None] = list(map(table.get, ids))
        # The fixes without a projection onto this route, found by a C-level scan.
        missing = list(compress(range(len(fixes)), map(is_, pos, repeat(None))))
        if missing:
            new_alongs, new_offs = _accel.project_points(
                self._proj,
                self._line,
                self._length,
                np.array([fixes[i].lat for i in missing]),
                np.array([fixes[i].lon for i in missing]),
            )
            for i, along, off in zip(missing, new_alongs, new_offs, strict=True):
                key = ids[i]
                pos[i] = table[key] = complex(along, off)
                held[key] = fixes[i]
        alongs: list[float] = list(map(_REAL, pos))
        offs: list[float] = list(map(_IMAG, pos))
        self._apply_hints(fixes, alongs, offs, near_m, back_m, ahead_m, slack_m)
        return alongs, offs

    def _apply_hints(
        self,
        fixes: Sequence[Fix],
        alongs: list[float],
        offs: list[float],
        near_m: float | None,
        back_m: float,
        ahead_m: float,
        slack_m: float,
    ) -> None:
        """Turn global projections into `project_track`'s results, in place: fix ``i``
        is projected with the previous result's distance along as ``near_m``.

        `_near` keeps the global nearest point whenever the window around the hint is
        degenerate or (on a simple line) holds it; that is checked for all fixes at
        once (`_accel.keeps_global`), assuming each hint is the previous global
        projection. Only the fixes failing it go through `_near`; when one of them is
        moved off its global projection, the next fix's hint differs from what was
        assumed, so it is checked again on its own.
        """
        keep = _accel.keeps_global(alongs, near_m, back_m, ahead_m, self._length, self._simple)
        if keep.all():
            return
        threshold = self._threshold
        pending = np.flatnonzero(~keep).tolist()
        moved = -1  # the last fix `_near` moved off its global projection
        i = pending[0]
        k = 0
        while True:
            hint = alongs[i - 1] if i else near_m
            assert hint is not None
            best = RoutePosition(alongs[i], offs[i], offs[i] <= threshold)
            x, y = self._proj.to_xy(fixes[i].lat, fixes[i].lon)
            found = self._near(x, y, best, hint, back_m, ahead_m, slack_m)
            if found is not best:
                alongs[i], offs[i] = found.distance_along_m, found.offset_m
                moved = i
            while k < len(pending) and pending[k] <= i:
                k += 1
            if moved == i and i + 1 < len(alongs):
                i += 1  # its hint changed: check it whatever the vectorised check said
            elif k < len(pending):
                i = pending[k]
            else:
                return

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
        if cached is None:
            cached = self._samples[step_m] = self.cut(step_m)
        return cached

    def cut(self, step_m: float = 100.0) -> RouteSamples:
        """:meth:`samples`, computed afresh and not cached (for callers that keep only
        what they derive from the pieces)."""
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
        return RouteSamples(step_m, starts, ends - starts, lat, lon, heading)


_REAL = attrgetter("real")
_IMAG = attrgetter("imag")
_POINT_MEMO_SIZE = 16


@lru_cache(maxsize=4096)
def route_from_polyline(
    encoded: str, precision: int = 5, on_route_threshold_m: float = DEFAULT_ON_ROUTE_M
) -> Route:
    """Decode an encoded polyline into a :class:`Route`, cached by its arguments.

    Shipments share planned routes and every GPS point needs one, so the decode and the
    shapely construction happen once per distinct polyline. Raises
    :class:`~shared.domain.polyline.PolylineError` (a ``ValueError``) for a malformed
    string and ``ValueError`` for fewer than two distinct points.
    """
    return Route(decode_polyline(encoded, precision), on_route_threshold_m=on_route_threshold_m)
