"""Freshness in production: how old a vehicle's position is when it becomes visible.

Issue #16's freshness target is receipt to state-visible for GPS points. This module
measures exactly that in the running projector, so operators see it without a benchmark
(`cargotrack_projector_gps_freshness_seconds`, docs/operations.md):

- receipt is the envelope's `recorded_at`: gps-ingest stamps it with its wall clock when
  it accepts a batch, before writing the record to Kafka (services/gps_ingest);
- visible is right after the PostgreSQL transaction that applied the record committed:
  from then on a query reads the new position. `TrackingProjection` stages its GPS
  records in `apply()` and calls `committed()` / `forget()` from the runner's own
  `committed()` / `forget()`, so a transaction that rolled back is never observed.

One observation per GPS record, not per point: every point of a batch shares one
receipt and the vehicle's position moves once per batch, so per point would only weight
large batches more. The benchmark's `3.latency` figure (bench/phases.py) is per record
too, so the two are comparable.

The two stamps come from two clocks (the ingest pod's and the projector pod's), so the
age includes their offset; with NTP that is a few milliseconds. A negative age (the
projector's clock behind) is observed as 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import Histogram

from shared import metrics
from shared.projection import Delivered


class ReceiptAges:
    """The receipt times of the GPS records in the transaction in flight, observed as
    ages once it commits.

    `stage(records)` replaces what was staged (one transaction at a time, as the runner
    applies them); `committed()` observes each staged record's age on `clock` (the wall
    clock, like `recorded_at`) and clears; `forget()` clears without observing.
    """

    def __init__(
        self,
        histogram: Histogram = metrics.PROJECTOR_GPS_FRESHNESS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._histogram = histogram
        self._clock = clock
        self._received: list[float] = []

    @property
    def staged(self) -> int:
        """How many records wait for their transaction to commit."""
        return len(self._received)

    def stage(self, records: Iterable[Delivered]) -> None:
        """The GPS records of the transaction just applied (not committed yet). A record
        without `recorded_at` (never written by gps-ingest) has no receipt: left out."""
        received = []
        for record in records:
            stamp = record.envelope.recorded_at
            if stamp.seconds or stamp.nanos:
                received.append(stamp.seconds + stamp.nanos / 1e9)
        self._received = received

    def committed(self) -> None:
        """The staged records' transaction committed: they are visible now."""
        now = self._clock()
        for received in self._received:
            self._histogram.observe(max(now - received, 0.0))
        self._received = []

    def forget(self) -> None:
        """The staged records' transaction did not commit: nothing became visible."""
        self._received = []
