"""What a simulation run is: fleet size, pace, scenario shares, where to send.

Validated once at construction (`ValueError` naming the field), so a run never
starts half-configured.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from devtools.fleet_simulator.routes import DATASET_NAMES, DEFAULT_DATA
from shared.config import DEV_JWT_SECRET

__all__ = ["SimulatorConfig", "Targets", "default_run_id"]


def default_run_id(now: float | None = None) -> str:
    """A run tag from the UTC start time, e.g. ``1125183456`` (month, day, h, min, s).

    Shipment ids and device ids carry it, so a second run on kept state writes new
    shipments instead of repeating (and being deduplicated against) the first run's.
    """
    return time.strftime("%m%d%H%M%S", time.gmtime(now))


@dataclass(frozen=True)
class Targets:
    """gRPC addresses (``host:port``) of the three ingest services."""

    gps: str
    events: str
    confirmations: str


@dataclass(frozen=True)
class SimulatorConfig:
    """Every knob of a simulation run. The same seed gives the same plan.

    Pace: a recorded trip is replayed `speedup` times faster than it was driven, but a
    vehicle never *appears* faster than `max_speed_mps`: the projector drops fixes
    implying more than 60 m/s as GPS jumps and its ETA model trusts observed speeds up
    to 40 m/s, so replaying a bus at 30x its real speed would look like noise, not
    like a fast bus. Stops and waits shrink by the full factor.
    """

    seed: int = 1
    vehicles: int = 8
    speedup: float = 30.0
    #: GPS fixes per vehicle per second of wall time, interpolated between the
    #: recorded fixes (which are always sent); 0 sends the recorded fixes only.
    rate_hz: float = 1.0
    datasets: tuple[str, ...] = ("liverpool",)
    tenant: str = "demo"
    #: Tag in shipment and device ids; empty: `default_run_id()` at start.
    run_id: str = ""
    max_speed_mps: float = 25.0
    #: A driver's app uploads what it recorded every this many seconds.
    upload_every_s: float = 2.0
    #: Seconds between two vehicles' starts, so the fleet does not move in lock step.
    stagger_s: float = 1.5
    #: Deliveries per round, inclusive range.
    min_stops: int = 2
    max_stops: int = 4
    #: Share of shipments created after their promised window already ended (LATE).
    late_share: float = 0.08
    #: Share of first rounds where the vehicle is stuck in a jam after leaving the
    #: depot (LATE, then RECOVERED once it drives on).
    jam_share: float = 0.15
    #: Share of deliveries whose first attempt fails (retried at the end of the round).
    fail_share: float = 0.12
    #: Share of GPS batches carrying one invalid point (refused by gps-ingest).
    bad_batch_share: float = 0.01
    #: Share of rounds whose TMS also sends one invalid event (refused by shipment-events).
    bad_event_share: float = 0.1
    #: Share of GPS batches after which the app loses its stream (resends on reconnect).
    drop_share: float = 0.02
    #: On a clean stop, record `cancelled` for every shipment not yet delivered, so a
    #: second run on kept state does not start with stale shipments in transit.
    cancel_on_stop: bool = True
    jwt_secret: str = field(default=DEV_JWT_SECRET, repr=False)
    data_dir: Path = DEFAULT_DATA
    #: Read the small `*_slice.csv` files (tests).
    sliced_data: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.vehicles < 1:
            problems.append(f"vehicles={self.vehicles}: must be at least 1")
        for name in ("speedup", "max_speed_mps", "upload_every_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name}={value}: must be a positive number")
        for name in ("rate_hz", "stagger_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name}={value}: must be a number >= 0")
        if self.rate_hz > 20:
            problems.append(f"rate_hz={self.rate_hz}: at most 20 fixes per second")
        if not 1 <= self.min_stops <= self.max_stops:
            problems.append("need 1 <= min_stops <= max_stops")
        for name in (
            "late_share",
            "jam_share",
            "fail_share",
            "bad_batch_share",
            "bad_event_share",
            "drop_share",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name}={value}: must be within [0, 1]")
        if not self.datasets:
            problems.append("datasets: name at least one")
        for name in self.datasets:
            if name not in DATASET_NAMES:
                problems.append(f"datasets: {name!r} is not one of {', '.join(DATASET_NAMES)}")
        if self.run_id and (len(self.run_id) > 40 or not self.run_id.isalnum()):
            problems.append(f"run_id={self.run_id!r}: 1-40 letters or digits")
        if problems:
            raise ValueError("; ".join(problems))
