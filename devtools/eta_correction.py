"""A learned correction on top of the live ETA, measured, not shipped (docs/eta.md).

``python -m devtools.eta_correction [--validate] [--dataset NAME ...]``

For each dataset, the same split, learner replay (:func:`shared.eta_eval.learn_online`)
and planned routes as ``cargotrack eta-eval``. Training rows: the live model's
estimates at 25 / 50 / 75 % of the learning trips that *arrived before the first
scored trip started* (what a correction trained on the learning period's own replay
could know), with the actual remaining time as the target. Each variant is a least
absolute deviations fit (iteratively reweighted least squares, numpy only) of the
remaining time on terms built from the live estimate's remaining time ``T``, and is
scored on the scored trips (with ``--validate``: the validation trips, which it never
trained on) against the live model itself and route @ fleet average.

Features: ``T``; ``lr`` the log of the trip's pace so far against the model's
(elapsed time since departure over the model's time for the distance covered along the
route); ``detour`` the remaining route over the great circle to the destination;
``hour`` of day (sin, cos); ``F`` the remaining route at the fleet average; ``el``
the elapsed time since departure.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import timedelta

import numpy as np
import numpy.typing as npt

from devtools import eta_eval as ev
from shared.domain.eta import EtaModel
from shared.domain.geo import Route, haversine_m

Array = npt.NDArray[np.float64]
Rows = dict[str, Array]

FEATURES = ("k", "T", "F", "detour", "lr", "sh", "ch", "el", "y", "fleet")


def _one(r: Rows) -> Array:
    return np.ones_like(r["T"])


def _el(r: Rows) -> Array:
    return r["T"] * np.log((r["el"] + 60.0) / (r["T"] + 60.0))


VARIANTS: dict[str, Callable[[Rows], list[Array]]] = {
    "scale + constant": lambda r: [r["T"], _one(r)],
    "+ pace": lambda r: [r["T"], r["T"] * r["lr"], _one(r)],
    "+ pace + detour": lambda r: [r["T"], r["T"] * r["lr"], r["T"] * (r["detour"] - 1), _one(r)],
    "log T + pace": lambda r: [
        r["T"],
        r["T"] * np.log((r["T"] + 60.0) / 900.0),
        r["T"] * r["lr"],
        _one(r),
    ],
    "elapsed + pace": lambda r: [r["T"], _el(r), r["T"] * r["lr"], _one(r)],
    "all terms": lambda r: [
        r["T"],
        r["T"] * r["lr"],
        r["T"] * (r["detour"] - 1),
        r["T"] * r["sh"],
        r["T"] * r["ch"],
        r["F"],
        _one(r),
    ],
}


def _rows(
    trips: Sequence[ev.Trip],
    online: ev.OnlineModels,
    candidates: dict[str, list[tuple[ev.Trip, Route]]],
    ds: ev.Dataset,
    data_end: float,
) -> Rows:
    out: dict[str, list[float]] = {f: [] for f in FEATURES}
    for trip in trips:
        fixes, dur = trip.fixes, trip.end - trip.start
        if ev._eligible(trip, data_end) is not None or online.at(trip.start) is None:
            continue
        if sum(1 for f in fixes if f.t <= trip.start + ev.CHECKPOINTS[0] * dur) < 2:
            continue
        if ds.planned_route == "own path":
            route = ev._own_path(trip)
        else:
            route = ev._route_for(trip, candidates[trip.route_key])
        if route is None:
            continue
        dest = (fixes[-1].lat, fixes[-1].lon)
        dest_along = route.project(*dest).distance_along_m
        for k, frac in enumerate(ev.CHECKPOINTS):
            t_now = trip.start + frac * dur
            now = fixes[0].at + timedelta(seconds=frac * dur)
            seen = [f for f in fixes if f.t <= t_now]
            last = seen[-1]
            loaded = online.at(t_now)
            assert loaded is not None
            live: EtaModel = loaded[1]
            est = live.estimate(now=now, destination=dest, positions=seen, route=route)
            assert est is not None
            v = live.speeds.global_speed_mps
            rem = max(0.0, dest_along - route.project(last.lat, last.lon).distance_along_m)
            gc = haversine_m(last.lat, last.lon, *dest)
            # The model's time for what was covered: an estimate from the first fix.
            past = live.estimate(
                now=fixes[0].at, destination=(last.lat, last.lon), positions=[fixes[0]],
                route=route,
            )  # fmt: skip
            model_s = max(60.0, past.arrival.timestamp() - fixes[0].t) if past else 60.0
            h = (now.hour + now.minute / 60.0) / 24.0 * 2.0 * math.pi
            values = {
                "k": float(k),
                "T": max(0.0, est.arrival.timestamp() - t_now),
                "F": rem / v,
                "detour": min(rem / max(gc, 100.0), 5.0),
                "lr": math.log(min(max((last.t - trip.start) / model_s, 0.25), 4.0)),
                "sh": math.sin(h),
                "ch": math.cos(h),
                "el": t_now - trip.start,
                "y": trip.end - t_now,
                "fleet": max(t_now, last.t + rem / v) - t_now,
            }
            for name, value in values.items():
                out[name].append(value)
    return {name: np.asarray(values, dtype=np.float64) for name, values in out.items()}


def lad(x: Array, y: Array, iterations: int = 100) -> Array:
    """Least absolute deviations by iteratively reweighted least squares."""
    beta = np.asarray(np.linalg.lstsq(x, y, rcond=None)[0], dtype=np.float64)
    for _ in range(iterations):
        w = 1.0 / np.maximum(np.abs(y - x @ beta), 30.0)
        xw = x * w[:, None]
        beta = np.asarray(
            np.linalg.solve(x.T @ xw + 1e-6 * np.eye(x.shape[1]), xw.T @ y), dtype=np.float64
        )
    return beta


def _mae(predicted: Array, rows: Rows) -> list[float]:
    return [
        float(np.mean(np.abs(predicted[rows["k"] == k] - rows["y"][rows["k"] == k]))) / 60.0
        for k in range(len(ev.CHECKPOINTS))
    ]


def measure(name: str, validate: bool) -> list[str]:
    """The report lines of one dataset."""
    ds = ev.DATASETS[name]
    raw = [t for t in ds.loader(ev.DEFAULT_DATA / ds.full) if t.fixes]
    data_end = max(t.end for t in raw)
    trips = sorted(
        (ev.Trip(t.route_key, t.trip_id, tuple(ev.trim_terminal_dwell(t.fixes))) for t in raw),
        key=lambda t: (t.start, t.trip_id),
    )
    learning, scored = ev._split(trips, 0.5)
    horizon = math.inf
    if validate:
        horizon = scored[0].start
        learning, scored = ev._split(learning, 0.5)
    points = [(t.trip_id.split("/")[0], f) for t in raw for f in t.fixes]
    online = ev.learn_online(points, ev.live_learner_params(ds.timezone), until=horizon)
    candidates: dict[str, list[tuple[ev.Trip, Route]]] = defaultdict(list)
    for t in learning:
        if len(t.fixes) >= ev.MIN_FIXES:
            try:
                candidates[t.route_key].append((t, Route([(f.lat, f.lon) for f in t.fixes])))
            except ValueError:
                continue
    arrived = [t for t in learning if t.end <= scored[0].start]
    train = _rows(arrived, online, candidates, ds, data_end)
    test = _rows(scored, online, candidates, ds, data_end)
    split = "validation" if validate else "held out"
    head = f"{name} ({split}): {len(train['y'])} training rows from {len(arrived)} trips"
    if len(train["y"]) < 20 or not len(test["y"]):
        return [f"{head}: too few to fit"]
    lines = [f"{head}, {len(test['y'])} scored rows"]
    fleet = _mae(test["fleet"], test)
    for label, predicted in [("live (speed table)", test["T"])] + [
        (v, np.maximum(np.column_stack(f(test)) @ lad(np.column_stack(f(train)), train["y"]), 0))
        for v, f in VARIANTS.items()
    ]:
        m = _mae(predicted, test)
        gain = 1.0 - m[1] / fleet[1]
        lines.append(f"  {label:<20} {m[0]:6.2f} {m[1]:6.2f} {m[2]:6.2f}   gain@50 {gain:4.0%}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.eta_correction", description=__doc__)
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--dataset", choices=sorted(ev.DATASETS), action="append")
    args = ap.parse_args(argv)
    print("MAE (min) at 25 / 50 / 75 %; gain@50: over route @ fleet average")
    for name in args.dataset or ev.DATASETS:
        print("\n".join(measure(name, args.validate)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
