"""The fleet simulator: its plan (pure), its GPS uplink (against a real gRPC server) and
the alerts its scenarios cause in the projector's own ETA model and debouncer."""

from __future__ import annotations

import asyncio
import bisect
import io
import itertools
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cache
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from devtools.fleet_simulator import clients
from devtools.fleet_simulator.config import SimulatorConfig
from devtools.fleet_simulator.plan import (
    LOAD_S,
    RoundPlan,
    Scenario,
    Step,
    plan_round,
    trip_order,
)
from devtools.fleet_simulator.routes import RecordedTrip, load_trips
from devtools.fleet_simulator.stats import SimulatorStats
from devtools.fleet_simulator.uplink import GpsUplink
from devtools.view import STATUSES, AlertSeen, EtaRow, Snapshot, render, summary_line
from services.projector.live import OBSERVE_EVERY_S
from shared.config import AlertSettings
from shared.domain.alerts import AlertConditions, AlertKind, observe_delay
from shared.domain.eta import DelayMargins, EtaModel, classify_delay
from shared.domain.geo import Fix, haversine_m, route_from_polyline
from shared.domain.validation import validate_gps_batch
from shared.envelopes import timestamp
from shared.pb import gps_pb2, gps_pb2_grpc

CONFIG = SimulatorConfig()
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@cache
def trips(datasets: tuple[str, ...] = ("liverpool",), sliced: bool = False) -> list[RecordedTrip]:
    return load_trips(datasets, sliced=sliced)


# -- the plan ---------------------------------------------------------------------------


def test_trips_are_real_recorded_trips() -> None:
    liverpool = trips()
    austin = trips(("austin",), True)
    assert len(liverpool) >= 8
    assert len(austin) >= 8
    for trip in liverpool + austin:
        assert trip.length_m >= 2000
        assert all(b.t > a.t for a, b in itertools.pairwise(trip.fixes))


@settings(max_examples=25)
@given(
    seed=st.integers(0, 10_000),
    vehicle=st.integers(1, 12),
    round_no=st.integers(0, 30),
    speedup=st.sampled_from([1.0, 4.0, 30.0, 120.0]),
    rate=st.sampled_from([0.0, 0.5, 1.0, 5.0]),
)
def test_the_same_seed_gives_the_same_plan_and_every_plan_is_sound(
    seed: int, vehicle: int, round_no: int, speedup: float, rate: float
) -> None:
    config = replace(CONFIG, seed=seed, speedup=speedup, rate_hz=rate)
    plan = plan_round(config, trips(), vehicle, round_no, "R1")
    again = plan_round(config, trips(), vehicle, round_no, "R1")
    assert plan.describe() == again.describe()
    assert plan.waypoints == again.waypoints
    _check_sound(plan, config)


def test_another_seed_gives_another_plan() -> None:
    one = [plan_round(CONFIG, trips(), v, 0, "R").describe() for v in range(1, 9)]
    other = replace(CONFIG, seed=2)
    two = [plan_round(other, trips(), v, 0, "R").describe() for v in range(1, 9)]
    assert one != two
    assert sorted(trip_order(1, 3, 14)) == list(range(14))


def _check_sound(plan: RoundPlan, config: SimulatorConfig) -> None:
    points = plan.waypoints
    # Fixes are strictly time ordered and never move faster than the cap.
    for a, b in itertools.pairwise(points):
        assert b.at_s > a.at_s
        speed = haversine_m(a.lat, a.lon, b.lat, b.lon) / (b.at_s - a.at_s)
        assert speed <= config.max_speed_mps * 1.001
        assert 0 <= b.heading_deg <= 360
    # Every recorded fix is sent, at its planned time.
    sent = {(w.lat, w.lon, w.at_s) for w in points}
    for fix, at_s in zip(plan.trip.fixes, plan.fix_at_s, strict=True):
        assert (fix.lat, fix.lon, at_s) in sent
    # Uploads cover every fix once, in order, after the fix was recorded.
    assert plan.batches[0].start == 0
    assert plan.batches[-1].end == len(points)
    for first, then in itertools.pairwise(plan.batches):
        assert first.end == then.start
        assert then.send_at_s > first.send_at_s
    for batch in plan.batches:
        assert 0 < batch.end - batch.start <= 1000
        assert points[batch.end - 1].at_s <= batch.send_at_s
        assert batch.send_at_s - points[batch.start].at_s <= config.upload_every_s
    # Lifecycle order per shipment: picked up, in transit, out for delivery, outcome.
    steps = [(m.at_s, m.step, m.shipment) for m in plan.milestones]
    assert steps == sorted(steps, key=lambda s: s[0])
    assert steps[0][1] is Step.PICKED_UP
    assert steps[1][1] is Step.IN_TRANSIT
    for index, shipment in enumerate(plan.shipments):
        own = [step for _, step, s in steps if s == index]
        expected = [Step.OUT_FOR_DELIVERY, Step.ARRIVE]
        if shipment.fails_first_attempt:
            expected += [Step.OUT_FOR_DELIVERY, Step.HAND_OVER]
        assert own == expected
        assert shipment.window_s[0] < shipment.window_s[1]
        route = route_from_polyline(shipment.planned_route)
        assert route.project(*shipment.destination).on_route
    assert plan.end_s >= max(m.at_s for m in plan.milestones)
    assert len({s.shipment_id for s in plan.shipments}) == len(plan.shipments)


def test_time_is_compressed_by_the_speedup_within_the_speed_cap() -> None:
    trip = trips()[0]
    slow = plan_round(replace(CONFIG, speedup=1.0, rate_hz=0), [trip], 3, 1, "R")
    fast = plan_round(replace(CONFIG, speedup=30.0, rate_hz=0), [trip], 3, 1, "R")
    driving_slow = slow.fix_at_s[-1] - slow.fix_at_s[0]
    driving_fast = fast.fix_at_s[-1] - fast.fix_at_s[0]
    dwell = 2.0 * len(slow.shipments)  # the stops' hand-over time is not compressed
    assert driving_slow == pytest.approx(trip.duration_s + dwell, rel=0.02)
    assert driving_fast < driving_slow / 5
    # The cap, not the factor, bounds the fast replay: no segment above 25 m/s.
    assert driving_fast >= trip.length_m / CONFIG.max_speed_mps


def test_the_first_rounds_demonstrate_every_behaviour() -> None:
    first = plan_round(CONFIG, trips(), 1, 0, "R")
    scenarios = [s.scenario for s in first.shipments]
    assert scenarios[-1] is Scenario.MISSED_WINDOW
    assert first.shipments[0].fails_first_attempt
    assert first.batches[3].bad_point is not None
    assert first.batches[6].drop_stream
    assert any(m.step is Step.BAD_EVENT for m in first.milestones)
    second = plan_round(CONFIG, trips(), 2, 0, "R")
    assert second.jam
    assert second.shipments[-1].scenario is Scenario.JAM
    assert not plan_round(CONFIG, trips(), 2, 1, "R").jam  # jams only on a first round


def test_ids_carry_the_run_so_a_second_run_writes_new_shipments() -> None:
    one = plan_round(CONFIG, trips(), 1, 0, "1125180000")
    two = plan_round(CONFIG, trips(), 1, 0, "1125190000")
    assert {s.shipment_id for s in one.shipments}.isdisjoint(s.shipment_id for s in two.shipments)
    assert one.describe()["milestones"] == two.describe()["milestones"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vehicles", 0),
        ("speedup", 0.0),
        ("speedup", math.nan),
        ("rate_hz", -1.0),
        ("late_share", 1.5),
        ("datasets", ("nowhere",)),
        ("run_id", "has space"),
    ],
)
def test_a_bad_configuration_names_the_field(field: str, value: object) -> None:
    options: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        SimulatorConfig(**options)


# -- the scenarios against the projector's decisions ------------------------------------


def projector_decisions(plan: RoundPlan, start: datetime = T0) -> dict[str, list[AlertKind]]:
    """The delay alerts the projector would decide for the round, per shipment.

    Mirrors services/projector/live.py: one observation per GPS record (its newest
    fix), at most one per OBSERVE_EVERY_S of event time, from the assignment (the
    round's start) until the shipment is delivered; the ETA from the fixes of the
    model's window; the debouncer of shared.domain.alerts. Refused points are left
    out, as gps-ingest refuses them.
    """
    settings_ = AlertSettings()
    margins = DelayMargins(
        late_after_s=settings_.late_margin_min * 60,
        at_risk_within_s=settings_.at_risk_margin_min * 60,
    )
    model = EtaModel()
    window = timedelta(seconds=model.params.window_s)
    fixes = [
        Fix(start + timedelta(seconds=w.at_s), w.lat, w.lon, w.speed_mps or None)
        for w in plan.waypoints
    ]
    times = [f.at for f in fixes]
    records = [fixes[b.end - 1].at for b in plan.batches]
    decided: dict[str, list[AlertKind]] = {}
    for index, shipment in enumerate(plan.shipments):
        done = max(m.at_s for m in plan.milestones if m.shipment == index)
        route = route_from_polyline(shipment.planned_route)
        end = start + timedelta(seconds=shipment.window_s[1])
        conditions, chain, last = AlertConditions(), None, None
        kinds: list[AlertKind] = []
        for moment in records:
            if (moment - start).total_seconds() > done:
                break
            if last is not None and moment < last + timedelta(seconds=OBSERVE_EVERY_S):
                continue
            last = moment
            seen = fixes[
                bisect.bisect_right(times, moment - window) : bisect.bisect_right(times, moment)
            ]
            estimate = model.estimate(
                now=moment,
                destination=shipment.destination,
                positions=seen,
                route=route,
                previous=chain,
            )
            if estimate is None:
                continue
            chain = estimate
            condition = classify_delay(estimate, end, margins)
            conditions, fired = observe_delay(
                conditions, condition, tenant_id="demo", shipment_id=shipment.shipment_id
            )
            kinds += [d.kind for d in fired]
        decided[shipment.shipment_id] = kinds
    return decided


def test_scenarios_cause_the_alerts_they_stand_for() -> None:
    seen: dict[Scenario, list[list[AlertKind]]] = {s: [] for s in Scenario}
    for vehicle in (1, 2, 3, 4):
        plan = plan_round(CONFIG, trips(), vehicle, 0, "R")
        decided = projector_decisions(plan)
        for shipment in plan.shipments:
            seen[shipment.scenario].append(decided[shipment.shipment_id])
    assert seen[Scenario.MISSED_WINDOW]
    assert seen[Scenario.JAM]
    for kinds in seen[Scenario.ON_TIME]:
        assert kinds == []
    for kinds in seen[Scenario.MISSED_WINDOW]:
        assert kinds == [AlertKind.LATE]
    for kinds in seen[Scenario.JAM]:
        assert AlertKind.LATE in kinds
        assert kinds[-1] is AlertKind.RECOVERED


def test_the_first_late_alert_is_due_about_thirty_seconds_in() -> None:
    """What `cargotrack dev` promises: a delay alert within a minute of the start."""
    plan = plan_round(CONFIG, trips(), 1, 0, "R")
    late = plan.shipments[-1]
    assert late.scenario is Scenario.MISSED_WINDOW
    fixes = [T0 + timedelta(seconds=w.at_s) for w in plan.waypoints]
    records = [fixes[b.end - 1] for b in plan.batches]
    # Two observations OBSERVE_EVERY_S apart confirm LATE; the second is the first
    # record at least that long after the first one.
    second = next(r for r in records if r >= records[0] + timedelta(seconds=OBSERVE_EVERY_S))
    assert (second - T0).total_seconds() <= OBSERVE_EVERY_S + LOAD_S
    assert projector_decisions(plan)[late.shipment_id] == [AlertKind.LATE]


def test_austin_trips_work_too() -> None:
    config = replace(CONFIG, datasets=("austin",), sliced_data=True)
    for vehicle in (1, 2, 3):
        plan = plan_round(config, trips(("austin",), True), vehicle, 0, "R")
        _check_sound(plan, config)


def test_bad_points_are_refused_by_the_ingest_rules() -> None:
    from devtools.fleet_simulator.plan import BadPoint
    from devtools.fleet_simulator.vehicle import Vehicle

    now = datetime.now(UTC)
    good = gps_pb2.GpsPoint(
        recorded_at=timestamp(now - timedelta(seconds=1)), latitude=53.4, longitude=-2.9
    )
    for how in BadPoint:
        batch = gps_pb2.GpsBatch(
            vehicle_id="van-01",
            device_id="phone",
            sequence=1,
            points=[good, Vehicle._broken(good, how)],
        )
        verdict = validate_gps_batch(batch, now=now)
        assert verdict.outcome == gps_pb2.BATCH_OUTCOME_PARTIALLY_ACCEPTED, how
        assert list(verdict.point_violations) == [1], how


# -- the GPS uplink against a real gRPC server ------------------------------------------


class FakeGpsIngest(gps_pb2_grpc.GpsIngestServiceServicer):
    """Answers every batch in order; can end a stream with UNAVAILABLE at a chosen
    batch (before answering it), as gps-ingest does when Kafka does not acknowledge."""

    def __init__(self, fail_at: set[int], refuse: frozenset[int] = frozenset()) -> None:
        self.fail_at = set(fail_at)
        self.refuse = refuse
        #: (stream number, sequence) of every batch received.
        self.received: list[tuple[int, int]] = []
        self.streams = 0
        self.open = 0
        self.most_open = 0

    async def StreamPoints(
        self,
        request_iterator: AsyncIterator[gps_pb2.StreamPointsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gps_pb2.StreamPointsResponse]:
        self.streams += 1
        stream = self.streams
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            async for request in request_iterator:
                sequence = request.batch.sequence
                self.received.append((stream, sequence))
                if sequence in self.fail_at:
                    self.fail_at.discard(sequence)
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "Kafka did not acknowledge")
                points = len(request.batch.points)
                refused = sequence in self.refuse
                yield gps_pb2.StreamPointsResponse(
                    sequence=sequence,
                    outcome=gps_pb2.BATCH_OUTCOME_PARTIALLY_ACCEPTED
                    if refused
                    else gps_pb2.BATCH_OUTCOME_ACCEPTED,
                    accepted_points=points - 1 if refused else points,
                )
        finally:
            self.open -= 1


@pytest.fixture
async def fake_gps() -> AsyncIterator[tuple[FakeGpsIngest, grpc.aio.Channel]]:
    servicer = FakeGpsIngest(fail_at={4, 9}, refuse=frozenset({2}))
    server = grpc.aio.server()
    gps_pb2_grpc.add_GpsIngestServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield servicer, channel
    finally:
        await server.stop(None)


def _points(n: int) -> list[gps_pb2.GpsPoint]:
    now = datetime.now(UTC)
    return [
        gps_pb2.GpsPoint(recorded_at=timestamp(now), latitude=53.4, longitude=-2.9 + i / 1e4)
        for i in range(n)
    ]


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), code.name)


async def test_call_with_retry_backs_off_on_transient_errors_and_raises_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    # The module's own view of asyncio: nothing else in the test waits less.
    monkeypatch.setattr(clients, "asyncio", SimpleNamespace(sleep=sleep))
    answers: list[grpc.StatusCode | str] = [grpc.StatusCode.UNAVAILABLE] * 4 + ["done"]

    async def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, grpc.StatusCode):
            raise _rpc_error(answer)
        return answer

    assert await clients.call_with_retry(call, "test", backoff_s=(0.2, 0.5)) == "done"
    assert slept == [0.2, 0.4, 0.5, 0.5]  # doubling up to the most, one wait per failure

    slept.clear()
    answers[:] = [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await clients.call_with_retry(call, "test", backoff_s=(0.2, 0.5))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert slept == [0.2]  # a fresh back-off per call; no wait before raising


@pytest.mark.timeout(30)
async def test_uplink_resends_unanswered_batches_in_order_after_a_reconnect(
    fake_gps: tuple[FakeGpsIngest, grpc.aio.Channel],
) -> None:
    servicer, channel = fake_gps
    stats = SimulatorStats()
    uplink = GpsUplink(
        channel,
        vehicle_id="van-01",
        device_id="phone-01",
        metadata=lambda: (),
        stats=stats,
        backoff_s=(0.05, 0.2),
    )
    async with uplink:
        for n in range(1, 13):
            uplink.submit(_points(3), drop_stream=n == 6)
            await asyncio.sleep(0.01)
        assert await uplink.flush(10)
    # Every batch answered once, in order; the server ended two streams, the app one.
    assert stats.batches_acked == 12
    assert stats.points_accepted == 12 * 3 - 1
    assert stats.points_refused == 1
    assert servicer.streams == 4
    assert servicer.most_open == 1
    by_stream: dict[int, list[int]] = {}
    for stream, sequence in servicer.received:
        by_stream.setdefault(stream, []).append(sequence)
    highest_answered = 0
    for stream in sorted(by_stream):
        sequences = by_stream[stream]
        # Each stream continues with the oldest unanswered batch, in order, no gaps.
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
        assert sequences[0] == highest_answered + 1
        highest_answered = _answered_on(stream, sequences, servicer)
    assert highest_answered == 12
    assert stats.batches_resent >= 3  # 4 after the first failure, 6 after the drill, 9
    assert stats.reconnects == 3


def _answered_on(stream: int, sequences: list[int], servicer: FakeGpsIngest) -> int:
    """The highest sequence the server answered on a stream (it fails before answering)."""
    later = [s for st_, s in servicer.received if st_ > stream]
    return min(later) - 1 if later else sequences[-1]


@pytest.mark.timeout(30)
async def test_uplink_stop_is_idempotent_and_closes_the_stream() -> None:
    servicer = FakeGpsIngest(fail_at=set())
    server = grpc.aio.server()
    gps_pb2_grpc.add_GpsIngestServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            uplink = GpsUplink(channel, vehicle_id="v", device_id="d", metadata=lambda: ())
            await uplink.stop()  # before start: nothing to do
            await uplink.start()
            with pytest.raises(RuntimeError):
                await uplink.start()
            uplink.submit(_points(2))
            await uplink.stop()
            await uplink.stop()
            assert uplink.unacked == 0
            assert servicer.open == 0
            with pytest.raises(RuntimeError):
                uplink.submit(_points(1))
    finally:
        await server.stop(None)


# -- the headless summary line ------------------------------------------------------------


def test_summary_line_has_a_field_per_status_and_alert_kind() -> None:
    statuses = dict.fromkeys(STATUSES, 0) | {"in_transit": 3, "delivered": 2}
    snapshot = Snapshot(
        elapsed_s=42.7,
        tenant="demo",
        statuses=statuses,
        etas=[],
        dispatch="subscribed",
        alerts_total=2,
        alerts_by_kind={"LATE": 1, "DELIVERY_FAILED": 1},
        latest_alerts=[],
        points_per_s=12.345,
        records_per_s=None,
        lag=0,
        simulator=SimulatorStats(points_refused=1),
    )
    line = summary_line(snapshot)
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    assert line.startswith("[dev +42s] ")
    assert fields["shipments"] == "5"
    assert fields["in_transit"] == "3"
    assert fields["delivered"] == "2"
    assert fields["alerts"] == "2"
    assert fields["LATE"] == "1"
    assert fields["RECOVERED"] == "0"
    assert fields["points/s"] == "12.3"
    assert fields["gps_records/s"] == "?"
    assert fields["lag"] == "0"
    assert fields["dispatch"] == "subscribed"
    assert fields["refused_points"] == "1"
    unknown = replace(snapshot, statuses=None, lag=None, points_per_s=None)
    fields = dict(part.split("=", 1) for part in summary_line(unknown).split() if "=" in part)
    assert fields["shipments"] == fields["lag"] == fields["points/s"] == "?"


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_the_live_view_renders_at_any_width(width: int) -> None:
    now = datetime.now(UTC)
    snapshot = Snapshot(
        elapsed_s=99,
        tenant="demo",
        statuses=dict.fromkeys(STATUSES, 1),
        etas=[EtaRow("S1-01-000-1", "van-01", "in_transit", now, now, 1234.0)],
        dispatch="subscribed",
        alerts_total=1,
        alerts_by_kind={"LATE": 1},
        latest_alerts=[AlertSeen(now, "LATE", "critical", "S1-01-000-1", "van-01", "late")],
        points_per_s=None,
        records_per_s=3.0,
        lag=None,
        simulator=SimulatorStats(failure="boom"),
        problems=["kafka: unreachable"],
        eta_accuracy="ETA accuracy, last 7 days: 3 arrivals",
    )
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(render(snapshot, width))
    text = out.getvalue()
    assert "S1-01-000-1" in text
    assert "ETA accuracy, last 7 days: 3 arrivals" in text
    assert "simulator failed: boom" in text
    assert "kafka: unreachable" in text
