"""Microbenchmark: the ETA model's hot path, old (reference) against new, paired.

``python -m bench.micro_eta`` runs the frozen reference implementation
(``bench/eta_reference``, the model before its hot path was optimised) and the
production :class:`~shared.domain.eta.EtaModel` on the same synthetic workload, shaped
like the projector's: vehicles on 100 km planned routes (one route per vehicle, built
once, as ``route_from_polyline`` caches them), 1 fix/s, each call getting the vehicle's
last ``window_s`` (600 fixes) with the window sliding by 50 fixes between calls, the
same ``Fix`` objects reused from call to call with the vehicle's ``TrackMemo`` (as the
projector's track cache does, trimmed to the window), and each estimate fed back as
``previous``.

Calls are paired and interleaved: for every vehicle and round both models estimate
from the same list, in alternating order, and each call is timed on its own; the
report gives µs per call for both and the ratio new/old, per round (the first round
is the cold one: nothing memoised yet). Every pair of estimates is also compared, so
the run doubles as an equality check on a large workload. It then measures the memory
each model keeps per cached route (tracemalloc, the route object and the model's
per-route state, after one estimate) and what the new model's memo keeps per fix.

No thresholds: this measures, it does not judge. The reference is imported from
``tests/unit`` where its equality test lives, so there is a single frozen copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from bench.eta_reference import eta as old_eta
from bench.eta_reference import geo as old_geo
from bench.eta_reference import speeds as old_speeds
from bench.workload import ROUTE_LENGTH_M, route_of
from shared.domain import eta as new_eta
from shared.domain import geo as new_geo
from shared.domain import learner
from shared.domain.geo import EARTH_RADIUS_M, Fix, TrackMemo
from shared.domain.learner import LearnerParams, LearnerState
from shared.domain.speeds import HistoricalSpeeds, learn_speeds

T0 = datetime(2026, 3, 2, 7, 40, tzinfo=UTC)
SPEED_MPS = 5.0
#: GPS noise (metres, each axis), so fixes are not exactly on the line.
NOISE_M = 4.0


def _fields(estimate: Any) -> tuple[Any, ...]:
    """An estimate as plain values (the two models' classes differ), field by field
    of the reference estimate (the production one adds `model_version`)."""
    return tuple(
        v.value if hasattr(v, "value") else v
        for v in (getattr(estimate, f.name) for f in dataclasses.fields(old_eta.EtaEstimate))
    )


class Vehicle:
    """One vehicle: its route (old and new objects), its sliding window of fixes."""

    def __init__(self, index: int, rng: random.Random, window: int) -> None:
        self._line = route_of(index)
        points = self._line.vertices(ROUTE_LENGTH_M)
        self.new_route = new_geo.Route(points)
        self.old_route = old_geo.Route(points)
        self.points = points
        self.destination = points[-1]
        self._rng = rng
        self._along = rng.uniform(0.0, 0.6) * ROUTE_LENGTH_M
        self._t = 0
        self.fixes: list[Fix] = []
        self.memo = TrackMemo()
        self.advance(window, window)
        self.old_prev: Any = None
        self.new_prev: new_eta.EtaEstimate | None = None

    def advance(self, count: int, window: int) -> None:
        """``count`` more fixes (1 s apart), keeping the last ``window``."""
        rng = self._rng
        for _ in range(count):
            self._along += SPEED_MPS * rng.uniform(0.5, 1.5)
            lat, lon = (float(a[0]) for a in self._line.at(np.array([self._along])))
            lat += math.degrees(rng.gauss(0.0, NOISE_M) / EARTH_RADIUS_M)
            lon += math.degrees(
                rng.gauss(0.0, NOISE_M) / EARTH_RADIUS_M / math.cos(math.radians(lat))
            )
            at = T0 + timedelta(seconds=self._t)
            self.fixes.append(Fix(at, lat, lon, SPEED_MPS if self._t % 3 else None))
            self._t += 1
        del self.fixes[:-window]
        self.memo.retain(self.fixes)

    @property
    def now(self) -> datetime:
        return self.fixes[-1].at


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter_ns()
    result = call()
    return result, (time.perf_counter_ns() - start) / 1000.0


def run_calls(
    vehicles: Sequence[Vehicle],
    old: old_eta.EtaModel,
    new: new_eta.EtaModel,
    rounds: int,
    slide: int,
    window: int,
) -> None:
    """Time paired calls, round by round, and check every pair is equal."""
    print(f"{'round':>5} {'old µs/call':>12} {'new µs/call':>12} {'new/old':>8}")
    all_old: list[float] = []
    all_new: list[float] = []
    mismatches = 0
    for r in range(rounds):
        t_old: list[float] = []
        t_new: list[float] = []
        for i, v in enumerate(vehicles):
            if r:
                v.advance(slide, window)
            fixes = list(v.fixes)

            def call_old(v: Vehicle = v, fixes: list[Fix] = fixes) -> Any:
                return old.estimate(
                    now=v.now,
                    destination=v.destination,
                    positions=fixes,
                    route=v.old_route,
                    previous=v.old_prev,
                )

            def call_new(v: Vehicle = v, fixes: list[Fix] = fixes) -> Any:
                return new.estimate(
                    now=v.now,
                    destination=v.destination,
                    positions=fixes,
                    route=v.new_route,
                    previous=v.new_prev,
                    memo=v.memo,
                )

            if (i + r) % 2:
                e_old, us_old = _timed(call_old)
                e_new, us_new = _timed(call_new)
            else:
                e_new, us_new = _timed(call_new)
                e_old, us_old = _timed(call_old)
            t_old.append(us_old)
            t_new.append(us_new)
            if _fields(e_old) != _fields(e_new):
                mismatches += 1
            v.old_prev, v.new_prev = e_old, e_new
        mo, mn = statistics.fmean(t_old), statistics.fmean(t_new)
        print(f"{r:>5} {mo:>12.1f} {mn:>12.1f} {mn / mo:>8.3f}")
        if r:
            all_old += t_old
            all_new += t_new
    if all_old:
        mo, mn = statistics.fmean(all_old), statistics.fmean(all_new)
        print(f"{'warm':>5} {mo:>12.1f} {mn:>12.1f} {mn / mo:>8.3f}   (rounds 1.., mean)")
        mo, mn = statistics.median(all_old), statistics.median(all_new)
        print(f"{'':>5} {mo:>12.1f} {mn:>12.1f} {mn / mo:>8.3f}   (rounds 1.., median)")
    print(f"estimates compared: {rounds * len(vehicles)}, unequal: {mismatches}")


def learned_speeds(routes: range) -> HistoricalSpeeds:
    """Speeds learned from one earlier trip along each route (a fix every 60 s at
    10 m/s), so that every piece of the routes has per-cell history."""
    traces = []
    start = T0 - timedelta(days=1)
    for index in routes:
        metres = np.arange(0.0, ROUTE_LENGTH_M, 600.0)
        lat, lon = route_of(index).at(metres)
        traces.append(
            [
                Fix(start + timedelta(seconds=60.0 * k), float(a), float(b))
                for k, (a, b) in enumerate(zip(lat, lon, strict=True))
            ]
        )
    return learn_speeds(traces)


def learner_speeds(routes: range) -> HistoricalSpeeds:
    """The same trips learned the production way: the learner's fold (default
    parameters) and the snapshot payload codec the projector loads models with."""
    params = LearnerParams()
    points: list[tuple[str, Fix]] = []
    start = T0 - timedelta(days=1)
    for index in routes:
        metres = np.arange(0.0, ROUTE_LENGTH_M, 600.0)
        lat, lon = route_of(index).at(metres)
        points.extend(
            (f"v{index}", Fix(start + timedelta(seconds=60.0 * k), float(a), float(b)))
            for k, (a, b) in enumerate(zip(lat, lon, strict=True))
        )
    state, _ = learner.fold(LearnerState(), points, params)
    return learner.decode_speeds(learner.encode_speeds(learner.build(state, params)))


def models(speeds: HistoricalSpeeds) -> tuple[old_eta.EtaModel, new_eta.EtaModel]:
    """The reference and the new model with the same speeds."""
    # The reference predates the area level: it gets the rest (an estimate that
    # needed an area's pace then counts as unequal).
    data = speeds.to_dict()
    data.pop("area_pace")
    fields = old_speeds.SpeedParams.__dataclass_fields__
    data["params"] = {k: v for k, v in data["params"].items() if k in fields}
    old = old_eta.EtaModel(old_speeds.HistoricalSpeeds.from_dict(data))
    return old, new_eta.EtaModel(speeds)


def _rss() -> int:
    """Resident set size in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _measured(build: Callable[[], list[Any]]) -> tuple[int, list[Any]]:
    """Bytes that stay allocated after ``build`` (traced, or RSS when not tracing)."""
    gc.collect()
    tracing = tracemalloc.is_tracing()
    before = tracemalloc.get_traced_memory()[0] if tracing else _rss()
    kept = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if tracing else _rss()
    return after - before, kept


def route_memory(count: int, window: int, learned: bool) -> None:
    """Memory kept per cached route (the route object and the model's per-route state)
    after one estimate on it, old and new, and the new model's memo per fix.

    Twice: as growth of the resident set size (everything, but coarse; run first thing
    in the process), then traced by tracemalloc (Python objects and numpy arrays, not
    GEOS's copy of the line)."""
    first = 10_000
    vehicles: list[Vehicle] = []
    speeds = learned_speeds(range(first, first + count)) if learned else HistoricalSpeeds.empty()
    old_model, new_model = models(speeds)
    # Built once per speeds, not per route: not counted.
    speeds.piece_paces(np.zeros(1), np.zeros(1), np.zeros(1))

    def build_old() -> list[Any]:
        out: list[Any] = []
        for v in vehicles:
            route = old_geo.Route(v.points)
            old_model.estimate(now=v.now, destination=v.destination, positions=v.fixes, route=route)
            out.append(route)
        return out

    def build_new(fixes: Callable[[Vehicle], list[Fix]]) -> Callable[[], list[Any]]:
        def build() -> list[Any]:
            out: list[Any] = []
            for v in vehicles:
                route = new_geo.Route(v.points)
                memo = TrackMemo()
                new_model.estimate(
                    now=v.now,
                    destination=v.destination,
                    positions=fixes(v),
                    route=route,
                    memo=memo,
                )
                out.append((route, memo))
            return out

        return build

    kib = 1024 * count
    print(f"memory per cached route ({ROUTE_LENGTH_M / 1000:.0f} km, {count} routes):")
    # RSS first: freed memory that is reused later would hide growth.
    for label in ("RSS", "tracemalloc"):
        # Fresh fixes and memos each time.
        rng = random.Random(7)
        vehicles[:] = [Vehicle(first + i, rng, window) for i in range(count)]
        if label == "tracemalloc":
            tracemalloc.start()
        try:
            old_bytes, kept_old = _measured(build_old)
            # A single fix per call: the route's own state, no projection memo to speak of.
            new_bytes, kept_new = _measured(build_new(lambda v: v.fixes[-1:]))
            # Then the full windows (onto other routes): what the memo adds per fix.
            memo_bytes, kept_memo = _measured(build_new(lambda v: v.fixes))
        finally:
            tracemalloc.stop()
        print(
            f"  {label:>11}: old {old_bytes / kib:7.1f} KiB, new {new_bytes / kib:7.1f} KiB;"
            f" new memo {(memo_bytes - new_bytes) / (count * window):.0f} B per fix"
        )
        del kept_old, kept_new, kept_memo
        gc.collect()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_eta", description=__doc__)
    parser.add_argument("--vehicles", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4, help="round 0 is the cold one")
    parser.add_argument("--window", type=int, default=600, help="fixes per call (1 fix/s)")
    parser.add_argument("--slide", type=int, default=50, help="new fixes between calls")
    parser.add_argument("--memory-routes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--speeds",
        choices=["empty", "learned", "learner"],
        default="empty",
        help="empty: no history; learned: per-cell history on every route (SpeedLearner);"
        " learner: the same trips through the learner's fold and snapshot codec, the model"
        " the projector hot-loads",
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    learned = args.speeds != "empty"
    route_memory(args.memory_routes, args.window, learned)
    gc.collect()
    print(f"building {args.vehicles} vehicles with {args.window} fixes each, {args.speeds} speeds")
    vehicles = [Vehicle(i, rng, args.window) for i in range(args.vehicles)]
    if args.speeds == "learner":
        speeds = learner_speeds(range(args.vehicles))
    elif learned:
        speeds = learned_speeds(range(args.vehicles))
    else:
        speeds = HistoricalSpeeds.empty()
    old, new = models(speeds)
    run_calls(vehicles, old, new, args.rounds, args.slide, args.window)


if __name__ == "__main__":
    main()
