"""ETA accuracy on replayed real trajectories: ``cargotrack eta-eval``.

For each dataset (see data/trajectories/README.md):

1. Trips are cut from the file (Liverpool: vehicle + trip id of route 14 outbound;
   Austin: vehicle + trip id, grouped by route id + headsign; Porto taxis: one row per
   trip, a fix every 15 s from the trip's start), cleaned
   (:func:`~shared.domain.geo.clean_track`) and trimmed of terminal dwell: a trip runs
   from its *departure* (the last fix still within 50 m of the first one) to its
   *arrival* (the first fix already within 50 m of the last one). The last fix is the
   destination.
2. Trips are ordered by start time. The first ``learn_fraction`` of them are learning
   trips; the rest are scored. Speeds are learned only from learning-trip fixes taken
   *before the first scored trip starts*, so no scored trip is learned from and no
   future traffic leaks in.
3. Buses (``planned_route="other trip"``): the planned route of a scored trip is the
   geometry of a *different* trip (a learning trip of the same route and direction) —
   the one passing closest to the scored trip's origin and destination, both of which
   a shipment knows in advance; the scored trip's own geometry is never used. Taxis
   (``planned_route="own path"``) follow no timetable route another trip could lend, so
   the planned route is the scored trip's own path, positions only (as a navigation
   system plans it before departure; the usual setting of path-based travel-time
   estimation). Its timing is never used: every method gets the same geometry.
4. At 25 / 50 / 75 % of each scored trip's duration, every method sees only the fixes
   taken so far and predicts the arrival; the error is ``|predicted - actual|``.

Methods: the model (:class:`~shared.domain.eta.EtaModel` with the planned route and
the learned speeds); baseline ``straight line``: great-circle distance at the learned
global space-mean speed (no detour factor); baseline ``route @ last speed``: remaining
distance along the planned route at the speed between the last two fixes, clamped to
[2, 30] m/s.

Trips are skipped (and counted) when they are too short (< 4 fixes, < 10 min or
< 1 km), may be cut off by the end of the file (last fix within 5 min of it), have
fewer than two fixes by the 25 % mark, or have no usable planned route.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Literal

from shared.domain import learner
from shared.domain.eta import EtaModel, EtaParams
from shared.domain.geo import Fix, Route, clean_track, haversine_m
from shared.domain.learner import LearnerParams, LearnerState
from shared.domain.speeds import SpeedParams

CHECKPOINTS = (0.25, 0.50, 0.75)
METHODS = (
    "live",
    "previous live",
    "route @ fleet average",
    "straight line",
    "route @ current speed",
)
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "trajectories"

TERMINAL_RADIUS_M = 50.0
TRUNCATION_GUARD_S = 300.0
MIN_FIXES = 4
MIN_DURATION_S = 600.0
MIN_DISTANCE_M = 1000.0
MAX_ROUTE_OFFSET_M = 300.0
BASELINE_SPEED_RANGE = (2.0, 30.0)


@dataclass(frozen=True, slots=True)
class Trip:
    """One vehicle's run of one trip: cleaned, time-ordered fixes."""

    route_key: str
    trip_id: str
    fixes: tuple[Fix, ...]

    @property
    def start(self) -> float:
        return self.fixes[0].t

    @property
    def end(self) -> float:
        return self.fixes[-1].t


@dataclass(frozen=True, slots=True)
class Dataset:
    """One dataset: its files under the data folder, local time zone, loader, and where
    a scored trip's planned route comes from (see the module docstring, step 3)."""

    name: str
    full: str
    slice: str
    timezone: str
    loader: Callable[[Path], list[Trip]]
    planned_route: Literal["other trip", "own path"] = "other trip"


def _liverpool(path: Path) -> list[Trip]:
    groups: dict[tuple[str, str, str], list[Fix]] = defaultdict(list)
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            at = datetime.fromisoformat(row["timestamp"] + "+00:00")
            key = (f"{row['route_name']} {row['direction']}", row["vehicle_id"], row["trip_id"])
            groups[key].append(Fix(at, float(row["latitude"]), float(row["longitude"])))
    return [Trip(k[0], f"{k[1]}/{k[2]}", tuple(clean_track(v))) for k, v in groups.items()]


def _austin(path: Path) -> list[Trip]:
    groups: dict[tuple[str, str, str], list[Fix]] = defaultdict(list)
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if not row["trip_id"]:
                continue
            speed = float(row["speed"]) if row["speed"] else None
            fix = Fix(
                datetime.fromisoformat(row["timestamp"]),
                float(row["latitude"]),
                float(row["longitude"]),
                speed,
            )
            key = (f"{row['route_id']} {row['trip_headsign']}", row["vehicle_id"], row["trip_id"])
            groups[key].append(fix)
    return [Trip(k[0], f"{k[1]}/{k[2]}", tuple(clean_track(v))) for k, v in groups.items()]


PORTO_FIX_INTERVAL_S = 15.0
#: Above the learner's top speed (`SpeedParams.max_speed_mps`): fixes were lost.
PORTO_MAX_SPEED_MPS = 40.0


def _gap(a: Fix, b: Fix) -> bool:
    return haversine_m(a.lat, a.lon, b.lat, b.lon) > PORTO_MAX_SPEED_MPS * (b.t - a.t)


def _porto(path: Path) -> list[Trip]:
    """ECML/PKDD 2015 Porto taxi rows: one trip per row; ``POLYLINE`` is a JSON list of
    ``[lon, lat]`` taken every 15 s from ``TIMESTAMP`` (epoch seconds). Rows flagged
    ``MISSING_DATA`` (fixes lost, so the 15 s clock no longer holds) are skipped, and so
    are rows whose cleaned track still jumps faster than ``PORTO_MAX_SPEED_MPS`` between
    two fixes: fixes were lost there too, unflagged (a lone outlier is already gone)."""
    trips: list[Trip] = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["MISSING_DATA"] != "False":
                continue
            start = datetime.fromtimestamp(int(row["TIMESTAMP"]), UTC)
            fixes = [
                Fix(start + timedelta(seconds=i * PORTO_FIX_INTERVAL_S), float(lat), float(lon))
                for i, (lon, lat) in enumerate(json.loads(row["POLYLINE"]))
            ]
            track = clean_track(fixes)
            if any(_gap(a, b) for a, b in pairwise(track)):
                continue  # fixes lost without the flag: the 15 s clock no longer holds
            trip_id = f"{row['TAXI_ID']}/{row['TRIP_ID']}"
            trips.append(Trip("taxi", trip_id, tuple(track)))
    return trips


DATASETS: dict[str, Dataset] = {
    "liverpool": Dataset(
        "liverpool",
        "liverpool_bus/route14_outbound.csv",
        "liverpool_bus/route14_outbound_slice.csv",
        "Europe/London",
        _liverpool,
    ),
    "austin": Dataset(
        "austin",
        "austin_capmetro/vehicle_positions_2016-11-24.csv",
        "austin_capmetro/vehicle_positions_2016-11-24_slice.csv",
        "America/Chicago",
        _austin,
    ),
    "porto": Dataset(
        "porto",
        "porto_taxi/train_2013-07-01_11-17min.csv",
        "porto_taxi/train_2013-07-01_11-17min_slice.csv",
        "Europe/Lisbon",
        _porto,
        planned_route="own path",
    ),
}


def trim_terminal_dwell(fixes: Sequence[Fix], radius_m: float = TERMINAL_RADIUS_M) -> list[Fix]:
    """Drop the wait before departure and after arrival (time-ordered ``fixes``).

    Keeps from the last fix of the leading run within ``radius_m`` of the first fix to
    the first fix of the trailing run within ``radius_m`` of the last fix.
    """
    if len(fixes) < 2:
        return list(fixes)
    first, last = fixes[0], fixes[-1]
    i = 0
    while (
        i + 1 < len(fixes)
        and haversine_m(first.lat, first.lon, fixes[i + 1].lat, fixes[i + 1].lon) <= radius_m
    ):
        i += 1
    j = len(fixes) - 1
    while (
        j - 1 > i
        and haversine_m(last.lat, last.lon, fixes[j - 1].lat, fixes[j - 1].lon) <= radius_m
    ):
        j -= 1
    return list(fixes[i : j + 1])


@dataclass(slots=True)
class MethodScore:
    """Signed errors (predicted - actual, minutes) per checkpoint."""

    errors_min: list[list[float]] = field(default_factory=lambda: [[] for _ in CHECKPOINTS])

    def add(self, k: int, predicted: float, actual: float) -> None:
        self.errors_min[k].append((predicted - actual) / 60)

    def mae(self) -> list[float]:
        return [statistics.fmean(map(abs, e)) if e else math.nan for e in self.errors_min]

    def bias(self) -> list[float]:
        return [statistics.fmean(e) if e else math.nan for e in self.errors_min]


@dataclass(slots=True)
class DatasetReport:
    """Scores of one dataset; ``scores[method].mae()`` is minutes per checkpoint."""

    name: str
    trips_total: int
    trips_learning: int
    trips_scored: int
    skipped: dict[str, int]
    global_speed_mps: float
    scores: dict[str, MethodScore]
    interval_hits: list[int]
    model_route_share: float
    seconds: float
    #: Model versions the learner published while replaying the dataset.
    versions: int = 0

    def table_rows(self) -> list[tuple[str, str, int, list[float]]]:
        return [(self.name, m, self.trips_scored, self.scores[m].mae()) for m in METHODS]

    def to_json(self) -> dict[str, object]:
        n = max(self.trips_scored, 1)
        return {
            "dataset": self.name,
            "trips_total": self.trips_total,
            "trips_learning": self.trips_learning,
            "trips_scored": self.trips_scored,
            "skipped": self.skipped,
            "global_speed_mps": self.global_speed_mps,
            "mae_min": {
                m: dict(zip(_labels(), self.scores[m].mae(), strict=True)) for m in METHODS
            },
            "bias_min": {
                m: dict(zip(_labels(), self.scores[m].bias(), strict=True)) for m in METHODS
            },
            "model_interval_coverage": dict(
                zip(_labels(), [h / n for h in self.interval_hits], strict=True)
            ),
            "model_route_share": self.model_route_share,
            "model_versions": self.versions,
            "seconds": self.seconds,
        }


def _labels() -> list[str]:
    return [f"{int(c * 100)}%" for c in CHECKPOINTS]


def _route_for(trip: Trip, candidates: list[tuple[Trip, Route]]) -> Route | None:
    """The candidate route passing closest to the trip's origin and destination."""
    o, d = trip.fixes[0], trip.fixes[-1]
    need = 0.5 * haversine_m(o.lat, o.lon, d.lat, d.lon)
    best: tuple[float, Route] | None = None
    for other, route in candidates:
        if other.trip_id == trip.trip_id:
            continue
        po = route.project(o.lat, o.lon)
        pd = route.project(d.lat, d.lon)
        if po.offset_m > MAX_ROUTE_OFFSET_M or pd.offset_m > MAX_ROUTE_OFFSET_M:
            continue
        if pd.distance_along_m - po.distance_along_m < need:
            continue
        score = po.offset_m + pd.offset_m
        if best is None or score < best[0]:
            best = (score, route)
    return None if best is None else best[1]


def _own_path(trip: Trip) -> Route | None:
    """The trip's own path as its planned route: positions only, never their times."""
    try:
        return Route([(f.lat, f.lon) for f in trip.fixes])
    except ValueError:
        return None


def _eligible(trip: Trip, data_end: float) -> str | None:
    f = trip.fixes
    if len(f) < MIN_FIXES:
        return "too few fixes"
    if trip.end - trip.start < MIN_DURATION_S:
        return "too short in time"
    if haversine_m(f[0].lat, f[0].lon, f[-1].lat, f[-1].lon) < MIN_DISTANCE_M:
        return "too short in distance"
    if data_end - trip.end < TRUNCATION_GUARD_S:
        return "may be cut off by the end of the data"
    return None


def _split(trips: list[Trip], learn_fraction: float) -> tuple[list[Trip], list[Trip]]:
    n_learn = min(len(trips) - 1, max(1, math.ceil(len(trips) * learn_fraction)))
    return trips[:n_learn], trips[n_learn:]


#: Event time between two model versions in the evaluation. Production cuts one every
#: 10 min (CARGOTRACK_LEARNER_SNAPSHOT_EVERY_S); building each costs about a second on
#: Austin, so the evaluation uses hourly versions: its models are up to an hour older
#: than production's would be (a handicap, never a leak).
EVAL_SNAPSHOT_EVERY_S = 3600.0


def live_learner_params(timezone: str) -> LearnerParams:
    """The learner parameters the evaluation uses for a dataset in ``timezone``: the
    production defaults, with hourly versions."""
    return LearnerParams(
        speeds=SpeedParams(timezone=timezone), snapshot_every_s=EVAL_SNAPSHOT_EVERY_S
    )


@dataclass(slots=True)
class OnlineModels:
    """The models the projector would have had loaded at each instant.

    Every record of the dataset (all trips' raw fixes, keyed by vehicle) is folded by
    :func:`shared.domain.learner.fold` in event-time order, ``snapshot_every_s`` of
    event time per fold, as the learner service would receive it. A snapshot cut by
    the fold ending at ``T`` is available from ``T`` on (it learned only points before
    its version, which is at most ``T``), and is read back through the same payload
    codec the projector loads it with.
    """

    available_at: list[float]
    models: list[tuple[int, EtaModel]]

    def at(self, t: float) -> tuple[int, EtaModel] | None:
        """The newest model published at or before ``t`` (None: none yet)."""
        i = bisect.bisect_right(self.available_at, t)
        return self.models[i - 1] if i else None


def learn_online(
    points: Sequence[tuple[str, Fix]],
    params: LearnerParams,
    eta_params: EtaParams | None = None,
    until: float = math.inf,
) -> OnlineModels:
    """Fold ``points`` (vehicle id, fix) before ``until`` as the learner would."""
    ordered = sorted((p for p in points if p[1].t < until), key=lambda p: p[1].t)
    state = LearnerState()
    every = params.snapshot_every_s
    out = OnlineModels([], [])
    i = 0
    while i < len(ordered):
        end = (math.floor(ordered[i][1].t / every) + 1) * every
        j = bisect.bisect_left(ordered, end, lo=i, key=lambda p: p[1].t)
        state, snapshot = learner.fold(state, ordered[i:j], params)
        i = j
        if snapshot is None and not any(v for v, _ in out.models):
            # No version yet: the projector's fallback, the fleet's average speed.
            fallback = learner.fleet_average(state, params)
            if fallback is not None:
                out.available_at.append(end)
                out.models.append((0, EtaModel(fallback, eta_params)))
        if snapshot is not None:
            # What the projector loads: EtaModel(decode_speeds(payload)), where
            # decode_speeds(encode_speeds(s)) == s (tests/unit/test_learner.py).
            out.available_at.append(end)
            model = EtaModel(snapshot.speeds, eta_params, version=snapshot.version)
            out.models.append((snapshot.version, model))
    return out


def evaluate_dataset(
    ds: Dataset,
    path: Path,
    learn_fraction: float = 0.5,
    params: EtaParams | None = None,
    *,
    validate: bool = False,
    learner_params: LearnerParams | None = None,
) -> DatasetReport:
    """Learn, replay and score one dataset file (see the module docstring).

    With ``validate`` the scored trips are dropped first and the learning trips are
    split again by ``learn_fraction``: a validation set for choosing parameters that
    never looks at the trips the reported table is scored on (nor at any fix taken
    after the first of them started).
    """
    started = time.perf_counter()
    raw = [t for t in ds.loader(path) if t.fixes]
    data_end = max(t.end for t in raw)
    trips = sorted(
        (Trip(t.route_key, t.trip_id, tuple(trim_terminal_dwell(t.fixes))) for t in raw),
        key=lambda t: (t.start, t.trip_id),
    )
    learning, scored = _split(trips, learn_fraction)
    horizon = math.inf
    if validate:
        horizon = scored[0].start if scored else math.inf
        trips = learning
        learning, scored = _split(trips, learn_fraction)
    lp = learner_params or live_learner_params(ds.timezone)
    points = [(t.trip_id.split("/")[0], f) for t in raw for f in t.fixes]
    online = learn_online(points, lp, params, until=horizon)
    previous_model = EtaModel(None, params)
    candidates: dict[str, list[tuple[Trip, Route]]] = defaultdict(list)
    for t in learning:
        if len(t.fixes) >= MIN_FIXES:
            try:
                candidates[t.route_key].append((t, Route([(f.lat, f.lon) for f in t.fixes])))
            except ValueError:
                continue

    skipped: dict[str, int] = defaultdict(int)
    scores = {m: MethodScore() for m in METHODS}
    hits = [0 for _ in CHECKPOINTS]
    route_used = total_estimates = n_scored = 0
    fleet_speeds: list[float] = []
    for trip in scored:
        reason = _eligible(trip, data_end)
        fixes = trip.fixes
        dur = trip.end - trip.start
        if reason is None and sum(1 for f in fixes if f.t <= trip.start + CHECKPOINTS[0] * dur) < 2:
            reason = "fewer than two fixes by 25 %"
        route = None
        if reason is None and ds.planned_route == "own path":
            route = _own_path(trip)
            if route is None:
                reason = "no route through its own path"
        elif reason is None:
            route = _route_for(trip, candidates[trip.route_key])
            if route is None:
                reason = "no planned route from another trip"
        if reason is None and online.at(trip.start) is None:
            reason = "no model published yet"
        if reason is not None or route is None:
            skipped[reason or "?"] += 1
            continue
        n_scored += 1
        dest = (fixes[-1].lat, fixes[-1].lon)
        dest_along = route.project(*dest).distance_along_m
        actual = trip.end
        for k, frac in enumerate(CHECKPOINTS):
            t_now = trip.start + frac * dur
            now = fixes[0].at + timedelta(seconds=frac * dur)
            seen = [f for f in fixes if f.t <= t_now]
            last = seen[-1]
            loaded = online.at(t_now)
            assert loaded is not None
            _, live = loaded
            est = live.estimate(now=now, destination=dest, positions=seen, route=route)
            assert est is not None
            total_estimates += 1
            route_used += est.method == "route"
            hits[k] += est.earliest.timestamp() <= actual <= est.latest.timestamp()
            scores["live"].add(k, est.arrival.timestamp(), actual)

            old = previous_model.estimate(now=now, destination=dest, positions=seen, route=route)
            assert old is not None
            scores["previous live"].add(k, old.arrival.timestamp(), actual)

            # The fleet's average: the space-mean speed the same snapshot learned.
            v_fleet = live.speeds.global_speed_mps
            fleet_speeds.append(v_fleet)
            rem = max(0.0, dest_along - route.project(last.lat, last.lon).distance_along_m)
            scores["route @ fleet average"].add(k, max(t_now, last.t + rem / v_fleet), actual)

            gc = haversine_m(last.lat, last.lon, *dest)
            scores["straight line"].add(k, max(t_now, last.t + gc / v_fleet), actual)

            prev = seen[-2]
            v = haversine_m(prev.lat, prev.lon, last.lat, last.lon) / max(last.t - prev.t, 1.0)
            v = min(max(v, BASELINE_SPEED_RANGE[0]), BASELINE_SPEED_RANGE[1])
            scores["route @ current speed"].add(k, max(t_now, last.t + rem / v), actual)

    return DatasetReport(
        name=ds.name,
        trips_total=len(trips),
        trips_learning=len(learning),
        trips_scored=n_scored,
        skipped=dict(sorted(skipped.items())),
        global_speed_mps=statistics.fmean(fleet_speeds) if fleet_speeds else math.nan,
        scores=scores,
        interval_hits=hits,
        model_route_share=route_used / total_estimates if total_estimates else math.nan,
        seconds=time.perf_counter() - started,
        versions=len(online.models),
    )


def format_table(reports: Sequence[DatasetReport]) -> str:
    """The accuracy table (mean absolute error, minutes) as aligned text."""
    head = f"{'dataset':<10} {'method':<20} {'n':>4} " + " ".join(
        f"{'MAE@' + lbl:>9}" for lbl in _labels()
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        for name, method, n, maes in r.table_rows():
            cells = " ".join(f"{v:9.2f}" for v in maes)
            lines.append(f"{name:<10} {method:<20} {n:>4} {cells}")
    lines.append("")
    for r in reports:
        n = max(r.trips_scored, 1)
        cov = ", ".join(
            f"{lbl} {h / n:.0%}" for lbl, h in zip(_labels(), r.interval_hits, strict=True)
        )
        skipped = ", ".join(f"{k}: {v}" for k, v in r.skipped.items()) or "none"
        lines.append(
            f"{r.name}: {r.trips_total} trips, {r.trips_learning} learning, "
            f"{r.trips_scored} scored; {r.versions} model versions published; fleet average "
            f"{r.global_speed_mps:.2f} m/s (mean over estimates); live model used the route in "
            f"{r.model_route_share:.0%} of estimates; model interval coverage {cov}; "
            f"skipped {skipped}; {r.seconds:.1f} s"
        )
    return "\n".join(lines)


def evaluate(
    data: Path = DEFAULT_DATA,
    *,
    use_slice: bool = False,
    datasets: Sequence[str] = tuple(DATASETS),
    learn_fraction: float = 0.5,
    params: EtaParams | None = None,
    validate: bool = False,
) -> list[DatasetReport]:
    """Evaluate the named datasets found under ``data``. Raises ``FileNotFoundError``."""
    reports = []
    for name in datasets:
        ds = DATASETS[name]
        path = data / (ds.slice if use_slice else ds.full)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no data file at {path}")
        reports.append(evaluate_dataset(ds, path, learn_fraction, params, validate=validate))
    return reports


def build_parser() -> argparse.ArgumentParser:
    """The options of ``cargotrack eta-eval``."""
    ap = argparse.ArgumentParser(
        prog="cargotrack eta-eval",
        description="ETA accuracy (MAE at 25/50/75 %% of each trip) on real trajectories.",
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="trajectories folder")
    ap.add_argument("--slice", action="store_true", help="use the small CI slices")
    ap.add_argument(
        "--dataset", choices=sorted(DATASETS), action="append", help="repeatable; default all"
    )
    ap.add_argument("--learn-fraction", type=float, default=0.5)
    ap.add_argument(
        "--validate",
        action="store_true",
        help="score within the learning trips only (for tuning; never sees the test trips)",
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``cargotrack eta-eval``: print the accuracy table. Exit 0, or 2 for missing data."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 0.0 < args.learn_fraction < 1.0:
        ap.error("--learn-fraction must be between 0 and 1")
    try:
        reports = evaluate(
            args.data,
            use_slice=args.slice,
            datasets=args.dataset or tuple(DATASETS),
            learn_fraction=args.learn_fraction,
            validate=args.validate,
        )
    except FileNotFoundError as exc:
        print(f"eta-eval: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        print(format_table(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
