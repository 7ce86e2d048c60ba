"""Counters of a simulation run, read by `cargotrack simulate` and the dev view."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

__all__ = ["SimulatorStats"]


@dataclass
class SimulatorStats:
    """What the simulated fleet did so far. Plain counters, updated in the event loop.

    `points_accepted` counts points gps-ingest stored (its answers say so);
    `points_refused` the points it named in `violations`. `batches_resent` counts
    writes of a batch that had already been written on an earlier stream.
    """

    started_at: float = field(default_factory=time.monotonic)
    rounds: int = 0
    shipments_created: int = 0
    shipments_delivered: int = 0
    delivery_failures: int = 0
    shipments_cancelled: int = 0
    events_recorded: int = 0
    events_refused: int = 0
    confirmations: int = 0
    points_sent: int = 0
    points_accepted: int = 0
    points_refused: int = 0
    batches_sent: int = 0
    batches_acked: int = 0
    batches_resent: int = 0
    #: GPS devices (one per vehicle) and the streams they opened.
    devices: int = 0
    streams_opened: int = 0
    stream_errors: int = 0
    #: Set when the simulator failed (its error, one line).
    failure: str = ""

    @property
    def reconnects(self) -> int:
        """Streams opened after a device's first one (drills, errors, restarts)."""
        return max(0, self.streams_opened - self.devices)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("started_at")
        data["reconnects"] = self.reconnects
        return data

    def summary(self) -> str:
        """One line: what the fleet did so far."""
        return (
            f"rounds={self.rounds} shipments={self.shipments_created}"
            f" delivered={self.shipments_delivered} failed_attempts={self.delivery_failures}"
            f" events={self.events_recorded} refused_events={self.events_refused}"
            f" points={self.points_accepted} refused_points={self.points_refused}"
            f" reconnects={self.reconnects} resent={self.batches_resent}"
        )
