"""The plan of one vehicle's round: pure, deterministic given the seed.

A **round** is one recorded trip driven by one simulated vehicle with a few
deliveries on board. Everything that happens in it is decided here, before the
round starts, as offsets in seconds from the round's start (wall time):

* the **schedule**: every GPS fix the app will record (the recorded fixes, time
  compressed, plus fixes interpolated between them at `rate_hz`), with loading at
  the depot, an optional jam after departure and a short dwell at each stop;
* the **uploads**: fixes are grouped by the `upload_every_s` bucket they fall in and
  uploaded at the bucket's end, one batch per non-empty bucket; some batches carry
  one invalid point, and after some the app loses its stream;
* the **shipments**: origin = the trip's first fix (the depot), destination = the
  stop's fix, planned route = the recorded geometry of the whole round (a multi-drop
  route runs past most destinations), a promised window chosen by scenario, and
  whether the first attempt fails;
* the **milestones**: when the TMS records picked up, in transit, out for delivery,
  when the driver arrives at a stop, and the retries of failed deliveries.

Randomness comes only from `random.Random` seeded with (seed, vehicle, round), so the
same configuration gives the same plan, whatever the wall clock says. Only ids
carry the run id.

Scenarios (the promised window, relative to the round's start):

* `on_time`: a 4-hour window from now; no delay alert.
* `missed_window`: the window ended an hour ago (a shipment booked late): its ETA is
  past the window from the first estimate, so LATE fires after the projector's two
  confirming observations (30 s of event time apart), about 30 s into the round.
* `jam` (the last stop of a jam round): the vehicle stands still for `JAM_S` after
  leaving the depot; the window ends `JAM_SLACK_S` after the planned arrival. While
  the vehicle stands, its observed speed is nil and the ETA drifts past the window
  (AT_RISK, then LATE); once it drives on, the observed speed, and with it the ETA,
  recovers (RECOVERED). The swing must exceed the late and at-risk margins together
  (20 min by default), so jam rounds drive a trip of at least `JAM_MIN_LENGTH_M`.
  Only on a vehicle's first round: the ETA model measures progress over the last
  10 minutes, and the previous round's fixes would hide the end of the jam.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from devtools.fleet_simulator.config import SimulatorConfig
from devtools.fleet_simulator.routes import RecordedTrip
from shared.domain.geo import bearing_deg
from shared.domain.polyline import encode
from shared.pb import delivery_pb2, shipment_pb2

__all__ = [
    "BadPoint",
    "Batch",
    "Milestone",
    "RoundPlan",
    "Scenario",
    "ShipmentPlan",
    "Waypoint",
    "plan_round",
    "trip_order",
]

HOUR_S = 3600.0
#: Loading at the depot: created + assigned at 0, picked up at half, departure at the end.
LOAD_S = 4.0
#: The vehicle stands at each stop this long; the outcome is recorded at its end.
DWELL_S = 2.0
#: A failed delivery is attempted again this long after the previous milestone.
RETRY_GAP_S = 10.0
#: Between "out for delivery" of a retry and the hand-over.
RETRY_HANDOVER_S = 3.0
#: Stationary fixes (loading, jam, dwell) come at least this often, also at rate 0.
STATIONARY_EVERY_S = 1.0
#: Jam scenario: how long the vehicle stands still after leaving the depot, and how far
#: after the planned arrival the promised window ends. Checked against the real ETA
#: model and debouncer in tests/unit/test_simulator.py.
JAM_S = 150.0
JAM_SLACK_S = 12 * 60.0
WINDOW_ON_TIME = (0.0, 4 * HOUR_S)
WINDOW_MISSED = (-3 * HOUR_S, -1 * HOUR_S)
#: At most this many vertices in a planned route (the recorded trip thinned evenly).
MAX_ROUTE_POINTS = 400
#: A jam round drives a trip at least this long: the ETA must swing by more than the
#: late and at-risk margins together (20 min) between the jam and the drive on.
JAM_MIN_LENGTH_M = 8000.0

RECIPIENTS = ("A. Jones", "B. Okafor", "C. Murphy", "D. Patel", "E. Novak", "F. Garcia")
FAILURE_REASONS = (
    shipment_pb2.DELIVERY_FAILURE_REASON_RECIPIENT_ABSENT,
    shipment_pb2.DELIVERY_FAILURE_REASON_RECIPIENT_ABSENT,
    shipment_pb2.DELIVERY_FAILURE_REASON_ADDRESS_NOT_FOUND,
    shipment_pb2.DELIVERY_FAILURE_REASON_REFUSED,
)
METHODS = (
    delivery_pb2.CONFIRMATION_METHOD_SIGNATURE,
    delivery_pb2.CONFIRMATION_METHOD_PHOTO,
    delivery_pb2.CONFIRMATION_METHOD_PIN_CODE,
    delivery_pb2.CONFIRMATION_METHOD_LEFT_AT_DOOR,
)


class Scenario(enum.StrEnum):
    ON_TIME = "on_time"
    MISSED_WINDOW = "missed_window"
    JAM = "jam"


class BadPoint(enum.StrEnum):
    """How an invalid point is broken (each one is refused by gps-ingest)."""

    NAN_LATITUDE = "nan_latitude"
    FUTURE_TIMESTAMP = "future_timestamp"
    NULL_ISLAND = "null_island"
    NEGATIVE_SPEED = "negative_speed"


@dataclass(frozen=True, slots=True)
class Waypoint:
    """One GPS fix the app records: `at_s` after the round's start."""

    at_s: float
    lat: float
    lon: float
    speed_mps: float
    heading_deg: float


@dataclass(frozen=True, slots=True)
class Batch:
    """One upload: waypoints[start:end], sent at `send_at_s`."""

    send_at_s: float
    start: int
    end: int
    bad_point: BadPoint | None = None
    #: The app loses its stream right after writing this batch (before its answer).
    drop_stream: bool = False


@dataclass(frozen=True, slots=True)
class ShipmentPlan:
    shipment_id: str
    #: 1 = first stop of the round.
    stop_sequence: int
    #: Index of the stop's fix in the recorded trip.
    stop_fix: int
    customer_id: str
    reference: str
    origin: tuple[float, float]
    destination: tuple[float, float]
    planned_route: str
    #: The promised window, seconds relative to the round's start.
    window_s: tuple[float, float]
    scenario: Scenario
    fails_first_attempt: bool
    failure_reason: int
    method: int
    recipient: str

    @property
    def proof_sha256(self) -> str:
        """The digest of the (imaginary) signature or photo, for methods that need one."""
        if self.method in (
            delivery_pb2.CONFIRMATION_METHOD_SIGNATURE,
            delivery_pb2.CONFIRMATION_METHOD_PHOTO,
        ):
            return hashlib.sha256(f"proof:{self.shipment_id}".encode()).hexdigest()
        return ""


class Step(enum.StrEnum):
    """What happens at a milestone."""

    PICKED_UP = "picked_up"
    IN_TRANSIT = "in_transit"
    OUT_FOR_DELIVERY = "out_for_delivery"
    #: At the stop after the dwell: delivered (+ confirmation), or the first attempt fails.
    ARRIVE = "arrive"
    #: A failed delivery's second attempt: delivered (+ confirmation).
    HAND_OVER = "hand_over"
    #: The TMS sends one invalid event (refused, logged).
    BAD_EVENT = "bad_event"


@dataclass(frozen=True, slots=True)
class Milestone:
    at_s: float
    step: Step
    #: Index into RoundPlan.shipments; -1 for every shipment of the round.
    shipment: int = -1


@dataclass(frozen=True)
class RoundPlan:
    vehicle_no: int
    round_no: int
    trip: RecordedTrip
    jam: bool
    waypoints: tuple[Waypoint, ...]
    #: Offset at which the vehicle reaches each recorded fix.
    fix_at_s: tuple[float, ...]
    batches: tuple[Batch, ...]
    shipments: tuple[ShipmentPlan, ...]
    milestones: tuple[Milestone, ...]
    #: When the round is over (last upload and last milestone done).
    end_s: float

    def describe(self) -> dict[str, object]:
        """A plain summary (no waypoints), for logs and determinism checks."""
        return {
            "vehicle": self.vehicle_no,
            "round": self.round_no,
            "trip": f"{self.trip.dataset}/{self.trip.trip_id}",
            "jam": self.jam,
            "fixes": len(self.waypoints),
            "batches": len(self.batches),
            "bad_points": [(b.send_at_s, str(b.bad_point)) for b in self.batches if b.bad_point],
            "drops": [b.send_at_s for b in self.batches if b.drop_stream],
            "shipments": [
                (s.shipment_id, s.stop_fix, str(s.scenario), s.fails_first_attempt, s.window_s)
                for s in self.shipments
            ],
            "milestones": [(round(m.at_s, 3), str(m.step), m.shipment) for m in self.milestones],
            "end_s": round(self.end_s, 3),
        }


def vehicle_id(vehicle_no: int) -> str:
    return f"van-{vehicle_no:02d}"


def trip_order(seed: int, vehicle_no: int, count: int) -> list[int]:
    """The order in which a vehicle drives the `count` available trips (then repeats)."""
    order = list(range(count))
    random.Random(f"{seed}/{vehicle_no}/trips").shuffle(order)
    # Start each vehicle on a different trip when there are enough of them.
    shift = (vehicle_no - 1) % count
    return order[shift:] + order[:shift]


def _thin(points: Sequence[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return list(points)
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def _schedule(
    trip: RecordedTrip,
    config: SimulatorConfig,
    *,
    stall_s: float,
    stops: set[int],
    tail_s: float,
) -> tuple[list[Waypoint], list[float]]:
    """Waypoints of the round and the offset of each recorded fix (see module doc)."""
    fixes = trip.fixes
    rate_step = 1.0 / config.rate_hz if config.rate_hz > 0 else math.inf
    still_step = min(rate_step, STATIONARY_EVERY_S)
    points: list[Waypoint] = []
    heading = bearing_deg(fixes[0].lat, fixes[0].lon, fixes[1].lat, fixes[1].lon) if fixes else 0.0

    def stand(lat: float, lon: float, start: float, duration: float) -> float:
        """Stationary fixes in (start, start + duration]; returns the end time."""
        t = start
        end = start + duration
        while t + still_step < end - 1e-9:
            t += still_step
            points.append(Waypoint(t, lat, lon, 0.0, heading))
        if duration > 0:
            points.append(Waypoint(end, lat, lon, 0.0, heading))
        return end

    first = fixes[0]
    points.append(Waypoint(0.0, first.lat, first.lon, 0.0, heading))
    t = stand(first.lat, first.lon, 0.0, LOAD_S + stall_s)
    fix_at = [t]
    lengths = trip.segment_lengths_m
    for i in range(1, len(fixes)):
        a, b = fixes[i - 1], fixes[i]
        d = lengths[i - 1]
        wall = max((b.t - a.t) / config.speedup, d / config.max_speed_mps, 0.5)
        speed = d / wall
        if d >= 1.0:
            heading = bearing_deg(a.lat, a.lon, b.lat, b.lon)
        k = 1
        while k * rate_step < wall - 1e-9:
            f = k * rate_step / wall
            points.append(
                Waypoint(
                    t + k * rate_step,
                    a.lat + (b.lat - a.lat) * f,
                    a.lon + (b.lon - a.lon) * f,
                    speed,
                    heading,
                )
            )
            k += 1
        t += wall
        points.append(Waypoint(t, b.lat, b.lon, speed, heading))
        fix_at.append(t)
        if i in stops:
            t = stand(b.lat, b.lon, t, DWELL_S)
    stand(fixes[-1].lat, fixes[-1].lon, t, tail_s)
    return points, fix_at


def _batches(
    points: Sequence[Waypoint],
    config: SimulatorConfig,
    rng: random.Random,
    *,
    flaky: bool,
    forced_bad: int | None,
    forced_drop: int | None,
) -> list[Batch]:
    every = config.upload_every_s
    batches: list[Batch] = []
    start = 0
    while start < len(points):
        bucket = math.floor(points[start].at_s / every)
        end = start
        while end < len(points) and math.floor(points[end].at_s / every) == bucket:
            end += 1
        index = len(batches)
        bad_share = min(1.0, config.bad_batch_share * (5 if flaky else 1))
        bad: BadPoint | None = None
        if index == forced_bad or rng.random() < bad_share:
            bad = rng.choice(list(BadPoint))
        drop = index == forced_drop or rng.random() < config.drop_share
        batches.append(Batch((bucket + 1) * every, start, end, bad, drop))
        start = end
    return batches


def plan_round(
    config: SimulatorConfig,
    trips: Sequence[RecordedTrip],
    vehicle_no: int,
    round_no: int,
    run_id: str,
) -> RoundPlan:
    """The plan of round `round_no` of vehicle `vehicle_no` (1-based). Pure.

    Demo guarantees, whatever the seed: vehicle 1's first round carries a
    `missed_window` shipment (its last stop), fails its first delivery attempt,
    uploads one invalid point (4th batch), loses its stream once (7th batch) and has
    the TMS send one invalid event; vehicle 2's first round (with two or more
    vehicles) is a jam. Raises ValueError without trips.
    """
    if not trips:
        raise ValueError("no recorded trips to drive")
    order = trip_order(config.seed, vehicle_no, len(trips))
    trip = trips[order[round_no % len(trips)]]
    rng = random.Random(f"{config.seed}/{vehicle_no}/{round_no}")
    demo = vehicle_no == 1 and round_no == 0
    long_trips = [t for t in trips if t.length_m >= JAM_MIN_LENGTH_M]
    jam = (
        round_no == 0
        and bool(long_trips)
        and ((vehicle_no == 2) or (vehicle_no > 2 and rng.random() < config.jam_share))
    )
    if jam:
        # The vehicle's next long trip in its own order.
        ring = order[round_no % len(trips) :] + order[: round_no % len(trips)]
        trip = next(trips[i] for i in ring if trips[i].length_m >= JAM_MIN_LENGTH_M)
    n = len(trip.fixes)
    count = min(rng.randint(config.min_stops, config.max_stops), n - 2)
    first_stop = max(2, n // 5)
    stops = sorted(rng.sample(range(first_stop, n), count))
    stops[-1] = n - 1  # the round ends at the last delivery
    scenarios: list[Scenario] = []
    fails: list[bool] = []
    for index in range(len(stops)):
        if jam and index == len(stops) - 1:
            scenario = Scenario.JAM
        elif (demo and index == len(stops) - 1) or rng.random() < config.late_share:
            scenario = Scenario.MISSED_WINDOW
        else:
            scenario = Scenario.ON_TIME
        scenarios.append(scenario)
        fails.append((demo and index == 0) or rng.random() < config.fail_share)
    failed = [i for i, f in enumerate(fails) if f]
    tail_s = DWELL_S + len(failed) * (RETRY_GAP_S + RETRY_HANDOVER_S) + 1.0
    stall_s = JAM_S if jam else 0.0
    points, fix_at = _schedule(trip, config, stall_s=stall_s, stops=set(stops), tail_s=tail_s)
    batches = _batches(
        points,
        config,
        rng,
        flaky=vehicle_no % 4 == 0,
        forced_bad=3 if demo else None,
        forced_drop=6 if demo else None,
    )

    geometry = [(f.lat, f.lon) for f in trip.fixes]
    # A multi-drop round: every shipment's planned route is the whole round, so a
    # vehicle driving on past a failed delivery's address is still on its route.
    planned_route = encode(_thin(geometry, MAX_ROUTE_POINTS))
    shipments = []
    for index, stop in enumerate(stops):
        arrival = fix_at[stop]
        if scenarios[index] is Scenario.MISSED_WINDOW:
            window = WINDOW_MISSED
        elif scenarios[index] is Scenario.JAM:
            window = (0.0, arrival + JAM_SLACK_S)
        else:
            window = WINDOW_ON_TIME
        shipments.append(
            ShipmentPlan(
                shipment_id=f"S{run_id}-{vehicle_no:02d}-{round_no:03d}-{index + 1}",
                stop_sequence=index + 1,
                stop_fix=stop,
                customer_id=f"cust-{rng.randint(1, 40):03d}",
                reference=f"ORD-{rng.randint(10000, 99999)}",
                origin=geometry[0],
                destination=geometry[stop],
                planned_route=planned_route,
                window_s=window,
                scenario=scenarios[index],
                fails_first_attempt=fails[index],
                failure_reason=rng.choice(FAILURE_REASONS),
                method=rng.choice(METHODS),
                recipient=rng.choice(RECIPIENTS),
            )
        )

    milestones = [
        Milestone(LOAD_S / 2, Step.PICKED_UP),
        Milestone(LOAD_S, Step.IN_TRANSIT),
        Milestone(LOAD_S, Step.OUT_FOR_DELIVERY, 0),
    ]
    if demo or rng.random() < config.bad_event_share:
        milestones.append(Milestone(LOAD_S, Step.BAD_EVENT))
    for index, stop in enumerate(stops):
        done = fix_at[stop] + DWELL_S
        milestones.append(Milestone(done, Step.ARRIVE, index))
        if index + 1 < len(stops):
            milestones.append(Milestone(done, Step.OUT_FOR_DELIVERY, index + 1))
    t = fix_at[-1] + DWELL_S
    for index in failed:
        t += RETRY_GAP_S
        milestones.append(Milestone(t, Step.OUT_FOR_DELIVERY, index))
        t += RETRY_HANDOVER_S
        milestones.append(Milestone(t, Step.HAND_OVER, index))
    end_s = max(points[-1].at_s, batches[-1].send_at_s, t) + 0.5
    return RoundPlan(
        vehicle_no=vehicle_no,
        round_no=round_no,
        trip=trip,
        jam=jam,
        waypoints=tuple(points),
        fix_at_s=tuple(fix_at),
        batches=tuple(batches),
        shipments=tuple(shipments),
        milestones=tuple(sorted(milestones, key=lambda m: m.at_s)),
        end_s=end_s,
    )
