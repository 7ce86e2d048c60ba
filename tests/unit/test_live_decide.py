"""The projector's live-tracking decisions (services/projector/decide.py), without I/O.

The integration tests (test_projector.py, test_alerts_pipeline.py) check the whole
tracker against PostgreSQL; these name its decisions one by one, and check with
hypothesis the rule its docstring promises: the alerts do not depend on how the GPS
records were cut into batches (a replay decides what the live projector decided).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.projector.decide import (
    OBSERVE_EVERY_S,
    Decision,
    PendingAlert,
    Policy,
    active_since,
    alert_message,
    arrival,
    decide,
    due,
    eta_row,
    failed_deliveries,
    needed_from,
    observe,
    route_of,
)
from services.projector.track_cache import CachedTrack
from shared import statecodec
from shared.domain import alerts, polyline
from shared.domain.alerts import AlertConditions, AlertKind
from shared.domain.eta import DelayMargins, EtaModel
from shared.domain.geo import Fix
from shared.domain.tracking import (
    ASSIGNED,
    CREATED,
    DELIVERY_FAILED,
    IN_TRANSIT,
    ShipmentState,
    Status,
    TimelineEntry,
)
from shared.readmodel.messages import eta_message
from shared.readmodel.rows import Cursor, EtaRow, StoredTracking, TrackingRow
from shared.readmodel.shipment_tracking import (
    SAME_AS_MODEL,
    columns_of,
    decode_cursor,
    stored_of,
)

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
DESTINATION = (52.0, 13.0)
MODEL = EtaModel()
POLICY = Policy(DelayMargins(), timedelta(seconds=OBSERVE_EVERY_S), MODEL.params.window_s)
LONG_AGO = T0 - timedelta(days=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def entry(
    status: Status, seconds: float, *, anomaly: bool = False, kind: str = "x"
) -> TimelineEntry:
    return TimelineEntry(f"e-{kind}-{seconds}", kind, at(seconds), at(seconds), status, "", anomaly)


def shipment(window_end_s: float = 3600.0, **changes: object) -> ShipmentState:
    state = ShipmentState(
        shipment_id="s1",
        tenant_id="acme",
        status=IN_TRANSIT,
        customer_id="c1",
        destination=DESTINATION,
        promised_window=(at(0), at(window_end_s)),
        vehicle_id="v1",
        created_at=at(-600),
        updated_at=at(-60),
        timeline=(entry(CREATED, -600), entry(ASSIGNED, -300), entry(IN_TRANSIT, -60)),
    )
    return replace(state, **changes)  # type: ignore[arg-type]


# --- a vehicle driving due north to the destination, one GPS record per minute --------


START_M = 30_000.0
#: The planned route: due north from START_M south of the destination to it.
ROUTE = polyline.encode([(DESTINATION[0] - START_M / 111_195.0, DESTINATION[1]), DESTINATION])


def drive(
    speeds: list[float], start_m: float = START_M, detours: frozenset[int] = frozenset()
) -> list[list[tuple[str, Fix]]]:
    """GPS records (each 3 fixes, 20 s apart) of a vehicle heading for DESTINATION from
    `start_m` south of it, at each record's speed; in the records numbered in `detours`
    it is 700 m east of the straight line (off the planned ROUTE)."""
    records = []
    travelled = 0.0
    second = 0.0
    for n, speed in enumerate(speeds):
        points = []
        for _ in range(3):
            second += 20.0
            travelled += speed * 20.0
            remaining = max(start_m - travelled, 0.0)
            lat = DESTINATION[0] - remaining / 111_195.0
            lon = DESTINATION[1] + (0.0103 if n in detours else 0.0)
            points.append((f"gps-{n}", Fix(at(second), lat, lon, speed_mps=speed)))
        records.append(points)
    return records


def stored_after(previous: dict[str, object] | None, row: TrackingRow) -> dict[str, object]:
    """The stored columns after `row` was saved over `previous` (shared.readmodel.
    shipment_tracking.save: progress and ETA are kept when a batch has none, the cursor
    goes with the ETA)."""
    columns = columns_of(row)
    if previous is not None and columns["eta"] is None:
        for name in ("progress", "eta", "observed_at", "observed"):
            columns[name] = previous[name]
    return columns


def run(
    state: ShipmentState, records: list[list[tuple[str, Fix]]], cuts: set[int]
) -> tuple[list[PendingAlert], list[Decision]]:
    """Decide as the tracker does, with a batch ending after each record index in `cuts`
    (and after the last record)."""
    track = CachedTrack(LONG_AGO, (), ())
    columns: dict[str, object] | None = None
    raised: list[PendingAlert] = []
    decisions = []
    for n, record in enumerate(records):
        track = track.with_points(record)
        if n not in cuts and n != len(records) - 1:
            continue
        position = record[-1][1]
        stored = stored_of(columns) if columns is not None else None
        since = needed_from(state, stored, position.at)
        view = track.view(since - timedelta(seconds=POLICY.window_s))
        decision = decide(state, stored, position, view if view.fixes else None, MODEL, POLICY)
        raised.extend(decision.alerts)
        decisions.append(decision)
        columns = stored_after(columns, decision.row)
    return raised, decisions


speeds = st.lists(st.sampled_from([2.0, 6.0, 12.0, 20.0]), min_size=2, max_size=14)


@settings(max_examples=40, deadline=None)
@given(
    speeds=speeds,
    window_end_s=st.sampled_from([900.0, 1800.0, 2700.0, 3600.0]),
    cuts=st.sets(st.integers(0, 13)),
    routed=st.booleans(),
    detours=st.frozensets(st.integers(0, 13)),
)
def test_the_alerts_do_not_depend_on_how_the_records_were_batched(
    speeds: list[float],
    window_end_s: float,
    cuts: set[int],
    routed: bool,
    detours: frozenset[int],
) -> None:
    state = shipment(window_end_s, planned_route=ROUTE if routed else "")
    records = drive(speeds, detours=detours)
    whole, [last] = run(state, records, set())
    batched, decisions = run(state, records, cuts)
    assert [(a.decision.alert_id, a.detected_at, a.location) for a in batched] == [
        (a.decision.alert_id, a.detected_at, a.location) for a in whole
    ]
    assert [alert_message(a) for a in batched] == [alert_message(a) for a in whole]
    assert decisions[-1].row.conditions == last.row.conditions
    assert decisions[-1].row.cursor == last.row.cursor
    # The ETA shown is at the newest position, whatever the batches.
    assert decisions[-1].row.eta is not None
    assert decisions[-1].row.eta.computed_at == records[-1][-1][1].at


def test_a_shipment_that_will_clearly_miss_its_window_raises_late_once() -> None:
    state = shipment(window_end_s=600.0)  # 30 km at 6 m/s: over an hour away
    raised, _ = run(state, drive([6.0] * 8), {1, 2, 5})
    kinds = [a.decision.kind for a in raised]
    assert kinds.count(AlertKind.LATE) == 1
    late = next(a for a in raised if a.decision.kind is AlertKind.LATE)
    assert late.eta is not None
    assert late.eta.estimated_arrival is not None
    message = alert_message(late)
    assert message.expected_delay.ToTimedelta() == late.eta.estimated_arrival - at(600)
    assert message.detected_at.ToDatetime(UTC) == late.detected_at
    assert message.eta == eta_message(late.eta)


@given(
    records=st.lists(st.integers(0, 600), unique=True).map(sorted),
    observed=st.none() | st.integers(0, 600),
    start=st.integers(0, 600),
    every=st.integers(0, 120),
    cut=st.integers(0, 40),
)
def test_due_observes_after_the_cursor_from_the_start_at_most_once_per_interval(
    records: list[int], observed: int | None, start: int, every: int, cut: int
) -> None:
    moments = [at(r) for r in records]
    observed_at = at(observed) if observed is not None else None
    interval = timedelta(seconds=every)
    chosen = due(moments, observed_at, at(start), interval)
    assert chosen == sorted(set(chosen))
    assert set(chosen) <= set(moments)
    assert all(m >= at(start) for m in chosen)
    if observed_at is not None:
        assert all(m > observed_at for m in chosen)
        assert all(m >= observed_at + interval for m in chosen)
    assert all(b - a >= interval for a, b in itertools.pairwise(chosen))
    # The same moments whether the records come in one piece or two.
    first = due(moments[:cut], observed_at, at(start), interval)
    cursor = first[-1] if first else observed_at
    assert first + due(moments[cut:], cursor, at(start), interval) == chosen


def test_active_since_is_the_first_non_anomalous_active_entry() -> None:
    state = shipment(
        timeline=(
            entry(CREATED, -600),
            entry(IN_TRANSIT, -500, anomaly=True),
            entry(ASSIGNED, -300),
            entry(IN_TRANSIT, -60),
        )
    )
    assert active_since(state) == at(-300)
    assert active_since(shipment(timeline=())) == at(-600)
    assert active_since(shipment(timeline=(), created_at=None)) == datetime(1970, 1, 1, tzinfo=UTC)


def test_needed_from_is_the_cursor_or_the_activation_but_never_after_the_newest() -> None:
    state = shipment()
    assert needed_from(state, None, at(100)) == at(-300)
    assert needed_from(state, None, at(-400)) == at(-400)
    stored = StoredTracking(AlertConditions(), None, Cursor(at(50)))
    assert needed_from(state, stored, at(100)) == at(50)


def test_eta_row_is_what_the_api_shows_plus_the_model_estimate() -> None:
    fixes = [Fix(at(s), 51.8 + s / 100_000, 13.0, 10.0) for s in range(0, 121, 20)]
    estimate = MODEL.estimate(now=at(120), destination=DESTINATION, positions=fixes)
    assert estimate is not None
    row = eta_row(estimate, at(120))
    assert row.estimated_arrival == estimate.arrival
    assert (row.earliest, row.latest) == (estimate.earliest, estimate.latest)
    assert row.computed_at == at(120)
    assert row.model == estimate
    assert row.method == 2  # great circle: no planned route
    assert statecodec.decode_as(EtaRow, json.loads(json.dumps(statecodec.encode(row)))) == row
    message = eta_message(row)
    assert message.estimated_arrival.ToDatetime(UTC) == estimate.arrival
    assert message.position_age.ToNanoseconds() == int(estimate.position_age_s * 1e9)


def test_observe_feeds_delay_only_with_a_window_and_route_only_with_a_route() -> None:
    fixes = [Fix(at(s), 51.8 + s / 100_000, 13.0, 10.0) for s in range(0, 121, 20)]
    estimate = MODEL.estimate(now=at(120), destination=DESTINATION, positions=fixes)
    assert estimate is not None
    late = shipment(window_end_s=60.0)
    conditions = AlertConditions()
    for _ in range(5):  # the debouncer confirms a change over several observations
        conditions, fired = observe(late, conditions, estimate, POLICY.margins)
        if fired:
            break
    assert [d.kind for d in fired] == [AlertKind.LATE]
    unpromised = shipment(promised_window=None)
    assert observe(unpromised, AlertConditions(), estimate, POLICY.margins) == (
        AlertConditions(),
        [],
    )
    assert route_of(unpromised) is None
    assert route_of(shipment(planned_route="not a polyline!")) is None


def test_failed_deliveries_raise_one_alert_per_attempt_with_stable_ids() -> None:
    failed = shipment(
        status=DELIVERY_FAILED,
        timeline=(
            entry(ASSIGNED, -300),
            entry(DELIVERY_FAILED, 100, kind="delivery_failed"),
            entry(DELIVERY_FAILED, 200, kind="delivery_failed", anomaly=True),
            entry(DELIVERY_FAILED, 300, kind="delivery_failed"),
        ),
    )
    pending = list(failed_deliveries(failed))
    assert [p.decision.alert_id for p in pending] == [
        alerts.delivery_failed("acme", "s1", 1, "").alert_id,
        alerts.delivery_failed("acme", "s1", 2, "").alert_id,
    ]
    assert [p.detected_at for p in pending] == [at(100), at(300)]
    message = alert_message(pending[0])
    assert not message.HasField("eta")
    assert not message.HasField("last_location")
    assert message.detected_at.ToDatetime(UTC) == at(100)


def test_a_stored_row_without_a_cursor_continues_after_its_eta() -> None:
    """A row written before observations had a cursor (or by the previous release
    without the column): its ETA was the last thing the debouncer could have seen."""
    row = EtaRow(computed_at=at(300))
    stored = json.loads(json.dumps(statecodec.encode(row)))
    assert decode_cursor(stored, None, None) == Cursor(at(300), None)
    # The previous release's keys in the eta jsonb, and the column: the later one wins.
    legacy = {**stored, "observed_at": at(200).isoformat(), "observed": None}
    assert decode_cursor(legacy, None, None) == Cursor(at(200), None)
    assert decode_cursor(legacy, at(100), None) == Cursor(at(200), None)
    assert decode_cursor(legacy, at(250), None) == Cursor(at(250), None)
    assert decode_cursor(None, None, None) is None


def test_decide_without_a_track_keeps_the_stored_eta_and_raises_nothing() -> None:
    state = shipment()
    stored = StoredTracking(AlertConditions(), EtaRow(computed_at=at(0)), Cursor(at(0)))
    position = Fix(at(900), 51.9, 13.0)
    decision = decide(state, stored, position, None, MODEL, POLICY)
    assert decision.row.eta is None
    assert decision.row.progress is None
    assert decision.row.cursor is None  # the stored one stays, with the stored ETA
    assert decision.row.position == position
    assert decision.alerts == ()
    assert decision.history == ()
    assert decision.arrived_at is None
    assert decision.horizon == at(0)


def test_the_decisions_import_no_io_library() -> None:
    code = (
        "import sys, services.projector.decide\n"
        "print([m for m in ('asyncpg', 'aiokafka', 'grpc') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_the_cursor_columns_round_trip_and_store_the_shown_estimate_once() -> None:
    fixes = [Fix(at(s), 51.8 + s / 100_000, 13.0, 10.0) for s in range(0, 121, 20)]
    estimate = MODEL.estimate(now=at(120), destination=DESTINATION, positions=fixes)
    assert estimate is not None
    eta = eta_row(estimate, at(120))
    row = TrackingRow(
        "acme",
        "s1",
        "v1",
        Fix(at(120), 51.8, 13.0),
        None,
        eta,
        AlertConditions(pending_count=1),
        Cursor(at(120), estimate),
    )
    columns = columns_of(row)
    assert json.loads(str(columns["observed"])) == SAME_AS_MODEL
    # The previous release reads the whole estimate from the eta jsonb's keys.
    legacy = json.loads(str(columns["eta"]))
    assert legacy["observed"] == statecodec.encode(estimate)
    assert legacy["observed_at"] == at(120).isoformat()
    assert stored_of(columns) == StoredTracking(row.conditions, eta, row.cursor)
    other = replace(row, cursor=Cursor(at(100), None))
    assert columns_of(other)["observed"] is None
    assert stored_of(columns_of(other)).cursor == Cursor(at(100), None)


def test_arrival_is_the_geofence_entry_once_the_vehicle_stayed_since_activation() -> None:
    state = shipment()
    approach = [
        (f"gps-{n}", Fix(at(20 * n), DESTINATION[0] - (550 - 100 * n) / 111_195.0, 13.0))
        for n in range(6)
    ]
    parked = [(f"gps-p{n}", Fix(at(120 + 20 * n), *DESTINATION)) for n in range(6)]
    track = CachedTrack(LONG_AGO, (), ()).with_points(approach + parked).view(LONG_AGO)
    # Entered the 100 m geofence with the fix 50 m away (n = 5), then stayed.
    assert arrival(state, track, parked[-1][1]) == at(100)
    # Not near the destination now: nothing to look for.
    assert arrival(state, track, approach[0][1]) is None
    # Fixes before the shipment became active do not count.
    later = shipment(timeline=(entry(ASSIGNED, 200),))
    assert arrival(later, track, parked[-1][1]) is None
    decision = decide(state, None, parked[-1][1], track, MODEL, POLICY)
    assert decision.arrived_at == at(100)
