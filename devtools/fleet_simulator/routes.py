"""Recorded trips the simulated vehicles drive: real trajectories from data/trajectories.

The trips are cut, cleaned and trimmed exactly as the ETA evaluation does
(`devtools.eta_eval`): per vehicle and trip id, `clean_track`, terminal dwell removed.
Only trips long enough to carry a few deliveries are kept.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from devtools.eta_eval import DATASETS, DEFAULT_DATA, trim_terminal_dwell
from shared.domain.geo import Fix, haversine_m

__all__ = ["DATASET_NAMES", "DEFAULT_DATA", "RecordedTrip", "load_trips"]

#: The datasets a simulation may draw from (see data/trajectories/README.md).
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)

MIN_FIXES = 6
MIN_LENGTH_M = 2000.0
MIN_DURATION_S = 600.0


@dataclass(frozen=True)
class RecordedTrip:
    """One vehicle's run of one trip as recorded: time-ordered, cleaned fixes."""

    dataset: str
    trip_id: str
    fixes: tuple[Fix, ...]

    @cached_property
    def segment_lengths_m(self) -> tuple[float, ...]:
        """Great-circle length of each segment between consecutive fixes."""
        return tuple(
            haversine_m(a.lat, a.lon, b.lat, b.lon) for a, b in itertools.pairwise(self.fixes)
        )

    @property
    def length_m(self) -> float:
        return sum(self.segment_lengths_m)

    @property
    def duration_s(self) -> float:
        return self.fixes[-1].t - self.fixes[0].t


def load_trips(
    datasets: tuple[str, ...], data_dir: Path = DEFAULT_DATA, *, sliced: bool = False
) -> list[RecordedTrip]:
    """Every usable trip of `datasets`, in a stable order (dataset, then trip id).

    `sliced` reads the small `*_slice.csv` files (tests). Trips with fewer than
    MIN_FIXES fixes, shorter than MIN_LENGTH_M or MIN_DURATION_S are left out.
    Raises ValueError for an unknown dataset name and FileNotFoundError when a file
    is missing.
    """
    trips: list[RecordedTrip] = []
    for name in datasets:
        dataset = DATASETS.get(name)
        if dataset is None:
            raise ValueError(f"unknown dataset {name!r}; one of: {', '.join(DATASET_NAMES)}")
        path = data_dir / (dataset.slice if sliced else dataset.full)
        found = []
        for trip in dataset.loader(path):
            fixes = tuple(trim_terminal_dwell(trip.fixes))
            recorded = RecordedTrip(name, trip.trip_id, fixes)
            if (
                len(fixes) >= MIN_FIXES
                and recorded.length_m >= MIN_LENGTH_M
                and recorded.duration_s >= MIN_DURATION_S
            ):
                found.append(recorded)
        trips.extend(sorted(found, key=lambda t: t.trip_id))
    return trips
