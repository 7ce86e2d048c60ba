"""How good were the ETAs a shipment was given, once it really arrived: pure, no I/O.

:func:`score_arrival` takes the ETAs given for one shipment (``eta_history`` rows) and
its actual arrival, and returns the error at each horizon:

* **lead times** ``60m``, ``30m``, ``15m``, ``5m``: the ETA shown that long before the
  arrival, i.e. the newest one given at or before ``arrival - lead``;
* **trip fractions** ``25%``, ``50%``, ``75%``: the ETA shown at that fraction of the
  trip, the trip running from the first ETA given to the arrival (as
  ``cargotrack eta-eval`` scores recorded trips).

Only ETAs given before the arrival count. A horizon is left out when no ETA had been
given yet at its instant (a trip shorter than the lead time), or when the newest one
was given more than ``max_staleness_s`` before that instant (tracking was silent: the
ETA shown then says nothing about the model). The result does not depend on the
order of ``given``; ties in ``computed_at`` are broken by ``position_at``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from shared.domain.geo import Fix, LatLon
from shared.domain.geofence import GeofenceConfig, GeofenceState, GeofenceTransition, step

#: Lead-time horizons, minutes before the arrival.
LEAD_TIMES_MIN: tuple[int, ...] = (60, 30, 15, 5)
#: Trip-fraction horizons.
TRIP_FRACTIONS: tuple[float, ...] = (0.25, 0.50, 0.75)
#: Every horizon label, in report order.
HORIZONS: tuple[str, ...] = tuple(f"{m}m" for m in LEAD_TIMES_MIN) + tuple(
    f"{round(f * 100)}%" for f in TRIP_FRACTIONS
)
#: Default bound on how old the ETA shown at a horizon may be.
MAX_STALENESS_S = 600.0


def geofence_arrival(
    destination: LatLon, fixes: Iterable[Fix], config: GeofenceConfig | None = None
) -> datetime | None:
    """When the vehicle entered the destination's geofence, if ``fixes`` (time order)
    show it arriving there: entering and staying (:mod:`shared.domain.geofence`, 100 m,
    60 s and 2 fixes by default; a drive-by is not an arrival). ``None`` otherwise.
    The arrival is the entry, not its confirmation: what an ETA predicts."""
    state = GeofenceState.initial(config or GeofenceConfig(*destination))
    for fix in fixes:
        state, transition = step(state, fix)
        if transition is GeofenceTransition.ARRIVED and state.entered_at is not None:
            return datetime.fromtimestamp(state.entered_at, UTC)
    return None


@dataclass(frozen=True, slots=True)
class GivenEta:
    """One ETA as it was given: when (event time), from which position, for when."""

    computed_at: datetime
    position_at: datetime
    estimated_arrival: datetime


@dataclass(frozen=True, slots=True)
class HorizonError:
    """The ETA shown at one horizon and how far off it was.

    ``error_s`` is estimated minus actual arrival (positive: the ETA was too late);
    ``lead_s`` how long before the arrival it was given.
    """

    horizon: str
    computed_at: datetime
    estimated_arrival: datetime
    error_s: float
    lead_s: float


def score_arrival(
    given: Iterable[GivenEta], arrival: datetime, *, max_staleness_s: float = MAX_STALENESS_S
) -> list[HorizonError]:
    """The error at every horizon that has an ETA (module docstring), in HORIZONS order.

    Empty when no ETA was given before ``arrival``. Raises ``ValueError`` for a naive
    ``arrival`` or a negative ``max_staleness_s``.
    """
    if arrival.tzinfo is None or arrival.utcoffset() is None:
        raise ValueError("arrival must be timezone-aware")
    if not max_staleness_s >= 0:
        raise ValueError("max_staleness_s must be >= 0")
    before = sorted(
        (g for g in given if g.computed_at < arrival),
        key=lambda g: (g.computed_at, g.position_at),
    )
    if not before:
        return []
    times = [g.computed_at for g in before]
    start = times[0]
    staleness = timedelta(seconds=max_staleness_s)
    instants = [(f"{m}m", arrival - timedelta(minutes=m)) for m in LEAD_TIMES_MIN]
    instants += [(f"{round(f * 100)}%", start + (arrival - start) * f) for f in TRIP_FRACTIONS]
    scores = []
    for horizon, instant in instants:
        index = bisect.bisect_right(times, instant) - 1
        if index < 0:
            continue
        shown = before[index]
        if instant - shown.computed_at > staleness:
            continue
        scores.append(
            HorizonError(
                horizon=horizon,
                computed_at=shown.computed_at,
                estimated_arrival=shown.estimated_arrival,
                error_s=(shown.estimated_arrival - arrival).total_seconds(),
                lead_s=(arrival - shown.computed_at).total_seconds(),
            )
        )
    return scores


@dataclass(frozen=True, slots=True)
class ErrorSummary:
    """Absolute errors of one group of scores: mean (MAE) and percentiles, plus the
    mean signed error (bias; positive: ETAs too late). Seconds."""

    count: int
    mae_s: float
    p50_s: float
    p90_s: float
    bias_s: float


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), ``ordered`` sorted."""
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(errors_s: Iterable[float]) -> ErrorSummary | None:
    """MAE, p50 and p90 of the absolute errors and the bias; ``None`` for no errors."""
    signed = list(errors_s)
    if not signed:
        return None
    absolute = sorted(abs(e) for e in signed)
    return ErrorSummary(
        count=len(signed),
        mae_s=sum(absolute) / len(absolute),
        p50_s=_percentile(absolute, 0.5),
        p90_s=_percentile(absolute, 0.9),
        bias_s=sum(signed) / len(signed),
    )
