"""Debounced delay alerts (shared.domain.alerts): pure, no I/O.

The projector feeds these functions one observation at a time; what they return
is what gets published. So each property here is a promise to a dispatcher: one
alert per change, nothing for noise, the same ids when the log is replayed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.domain import alerts
from shared.domain.alerts import AlertConditions, AlertDecision, AlertKind, Severity
from shared.domain.eta import (
    DelayCondition,
    DelayMargins,
    EtaEstimate,
    EtaMethod,
    classify_delay,
    late_probability,
)

ON_TIME, AT_RISK, LATE = DelayCondition.ON_TIME, DelayCondition.AT_RISK, DelayCondition.LATE
T0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)


def feed(
    observations: Iterable[DelayCondition],
    conditions: AlertConditions | None = None,
    *,
    tenant_id: str = "acme",
    shipment_id: str = "s1",
    confirmations: int = 2,
) -> tuple[AlertConditions, list[AlertDecision]]:
    """Every observation in order; the final conditions and every alert fired."""
    state = conditions or AlertConditions()
    fired: list[AlertDecision] = []
    for observed in observations:
        state, decided = alerts.observe_delay(
            state,
            observed,
            tenant_id=tenant_id,
            shipment_id=shipment_id,
            confirmations=confirmations,
        )
        fired.extend(decided)
    return state, fired


def kinds(decisions: Sequence[AlertDecision]) -> list[AlertKind]:
    return [d.kind for d in decisions]


# --- delay: one alert per change -------------------------------------------------------


def test_a_lasting_delay_alerts_once_however_many_estimates_confirm_it() -> None:
    state, fired = feed([LATE] * 50)
    assert kinds(fired) == [AlertKind.LATE]
    assert fired[0].severity is Severity.CRITICAL
    assert state.delay == LATE.value


def test_on_time_estimates_alert_nothing() -> None:
    state, fired = feed([ON_TIME] * 20)
    assert fired == []
    assert state == AlertConditions()


def test_a_change_needs_consecutive_confirmations() -> None:
    # One noisy estimate at a time never alerts.
    _, fired = feed([LATE, ON_TIME, LATE, ON_TIME, AT_RISK, ON_TIME, LATE])
    assert fired == []
    # The second consecutive LATE does.
    _, fired = feed([LATE, LATE])
    assert kinds(fired) == [AlertKind.LATE]
    # With three confirmations, two are not enough.
    _, fired = feed([LATE, LATE, ON_TIME, LATE, LATE], confirmations=3)
    assert fired == []
    _, fired = feed([LATE, LATE, LATE], confirmations=3)
    assert kinds(fired) == [AlertKind.LATE]


def test_the_alert_comes_on_the_confirming_estimate() -> None:
    state = AlertConditions()
    state, first = alerts.observe_delay(state, LATE, tenant_id="acme", shipment_id="s1")
    assert first == []
    assert (state.pending_delay, state.pending_count) == (LATE.value, 1)
    state, second = alerts.observe_delay(state, LATE, tenant_id="acme", shipment_id="s1")
    assert kinds(second) == [AlertKind.LATE]
    assert (state.pending_delay, state.pending_count) == ("", 0)


def test_mixed_non_on_time_estimates_do_not_confirm_each_other() -> None:
    # AT_RISK then LATE are two different conditions: neither is confirmed yet.
    _, fired = feed([AT_RISK, LATE])
    assert fired == []
    _, fired = feed([AT_RISK, LATE, LATE])
    assert kinds(fired) == [AlertKind.LATE]


def test_late_then_at_risk_is_silent_and_recovery_follows() -> None:
    _, fired = feed([LATE, LATE, AT_RISK, AT_RISK, AT_RISK, ON_TIME, ON_TIME])
    assert kinds(fired) == [AlertKind.LATE, AlertKind.RECOVERED]
    assert fired[1].severity is Severity.INFO
    assert "back on time" in fired[1].message


def test_late_at_risk_late_is_one_lateness_reported_once() -> None:
    # Hovering around the late margin must not repeat LATE.
    _, fired = feed([LATE, LATE, AT_RISK, AT_RISK, LATE, LATE, AT_RISK, AT_RISK, LATE, LATE])
    assert kinds(fired) == [AlertKind.LATE]


def test_at_risk_then_late_escalates_then_recovers() -> None:
    _, fired = feed([AT_RISK, AT_RISK, LATE, LATE, ON_TIME, ON_TIME])
    assert kinds(fired) == [AlertKind.AT_RISK, AlertKind.LATE, AlertKind.RECOVERED]
    assert [d.severity for d in fired] == [Severity.WARNING, Severity.CRITICAL, Severity.INFO]


def test_recovered_from_at_risk() -> None:
    _, fired = feed([AT_RISK, AT_RISK, ON_TIME, ON_TIME])
    assert kinds(fired) == [AlertKind.AT_RISK, AlertKind.RECOVERED]


def test_a_second_lateness_after_recovery_is_a_new_alert_with_a_new_id() -> None:
    _, fired = feed([LATE, LATE, ON_TIME, ON_TIME, LATE, LATE])
    assert kinds(fired) == [AlertKind.LATE, AlertKind.RECOVERED, AlertKind.LATE]
    assert len({d.alert_id for d in fired}) == 3


def test_conditions_stored_before_delay_reported_existed_do_not_repeat_late() -> None:
    # A row written by an older projector: LATE, without the delay_reported field.
    old_row = AlertConditions(delay=LATE.value, delay_episode=1)
    _, fired = feed([LATE, LATE], old_row)
    assert fired == []
    _, fired = feed([ON_TIME, ON_TIME], old_row)
    assert kinds(fired) == [AlertKind.RECOVERED]


def test_detail_is_appended_to_the_message() -> None:
    state, _ = alerts.observe_delay(AlertConditions(), LATE, tenant_id="a", shipment_id="s")
    _, [decision] = alerts.observe_delay(
        state, LATE, tenant_id="a", shipment_id="s", detail="ETA 10:40 UTC, +25 min"
    )
    assert decision.message.endswith(": ETA 10:40 UTC, +25 min")


# --- off route --------------------------------------------------------------------------


def route_feed(verdicts: Iterable[bool]) -> list[AlertDecision]:
    state = AlertConditions()
    fired: list[AlertDecision] = []
    for off in verdicts:
        state, decided = alerts.observe_route(
            state, off, tenant_id="acme", shipment_id="s1", offset_m=420.0
        )
        fired.extend(decided)
    return fired


def test_off_route_alerts_once_per_departure_and_nothing_on_return() -> None:
    fired = route_feed([False, True, True, True, False, False])
    assert kinds(fired) == [AlertKind.OFF_ROUTE]
    assert "420 m" in fired[0].message
    # Leaving the route again is a new departure, with a new id.
    again = route_feed([False, True, True, False, True])
    assert kinds(again) == [AlertKind.OFF_ROUTE, AlertKind.OFF_ROUTE]
    assert again[0].alert_id != again[1].alert_id
    assert again[0].alert_id == fired[0].alert_id


# --- stale tracking ---------------------------------------------------------------------


def test_stale_tracking_alerts_once_per_silence() -> None:
    state = AlertConditions()
    last_fix = T0
    fired: list[AlertDecision] = []
    # Checked every 30 s of wall clock for an hour after the last fix.
    for minute in range(0, 60):
        now = last_fix + timedelta(minutes=minute, seconds=30)
        state, decided = alerts.observe_silence(
            state, last_fix, now, stale_after_s=600, tenant_id="acme", shipment_id="s1"
        )
        fired.extend(decided)
    assert kinds(fired) == [AlertKind.STALE_TRACKING]
    assert "no GPS for 10 min" in fired[0].message
    assert state.stale_since == last_fix.isoformat()
    # The vehicle reports again, then falls silent again: a new silence, a new alert.
    later_fix = T0 + timedelta(hours=2)
    state, decided = alerts.observe_silence(
        state, later_fix, later_fix + timedelta(minutes=5), stale_after_s=600,
        tenant_id="acme", shipment_id="s1",
    )  # fmt: skip
    assert decided == []
    state, decided = alerts.observe_silence(
        state, later_fix, later_fix + timedelta(minutes=11), stale_after_s=600,
        tenant_id="acme", shipment_id="s1",
    )  # fmt: skip
    assert kinds(decided) == [AlertKind.STALE_TRACKING]
    assert decided[0].alert_id != fired[0].alert_id


def test_stale_tracking_has_the_same_id_when_decided_again() -> None:
    """A scan that lost its conditions update decides again: same id, deduplicated."""
    fresh = AlertConditions()
    _, first = alerts.observe_silence(
        fresh, T0, T0 + timedelta(minutes=11), stale_after_s=600, tenant_id="a", shipment_id="s"
    )
    _, again = alerts.observe_silence(
        fresh, T0, T0 + timedelta(hours=3), stale_after_s=600, tenant_id="a", shipment_id="s"
    )
    assert [d.alert_id for d in first] == [d.alert_id for d in again]


# --- delivery failed --------------------------------------------------------------------


def test_delivery_failed_has_one_id_per_attempt() -> None:
    first = alerts.delivery_failed("acme", "s1", 1, "recipient absent")
    assert first == alerts.delivery_failed("acme", "s1", 1, "recipient absent")
    assert first.alert_id != alerts.delivery_failed("acme", "s1", 2, "").alert_id
    assert first.kind is AlertKind.DELIVERY_FAILED
    assert first.severity is Severity.CRITICAL
    assert first.message == "delivery attempt 1 failed: recipient absent"


# --- ids and replays --------------------------------------------------------------------

observations = st.lists(st.sampled_from([ON_TIME, AT_RISK, LATE]), max_size=60)


@given(observations)
def test_a_replay_of_the_same_observations_decides_the_same_alerts(
    sequence: list[DelayCondition],
) -> None:
    first_state, first = feed(sequence)
    second_state, second = feed(sequence)
    assert first == second
    assert first_state == second_state


@given(observations, st.integers(min_value=0, max_value=60))
def test_resuming_from_stored_conditions_equals_one_pass(
    sequence: list[DelayCondition], cut: int
) -> None:
    """A restart between two observations (conditions stored, then loaded) changes nothing."""
    whole_state, whole = feed(sequence)
    middle, before = feed(sequence[:cut])
    end, after = feed(sequence[cut:], middle)
    assert before + after == whole
    assert end == whole_state


@given(observations)
def test_delay_alerts_follow_the_reporting_rules(sequence: list[DelayCondition]) -> None:
    _, fired = feed(sequence)
    ids = [d.alert_id for d in fired]
    assert len(ids) == len(set(ids)), "two alerts with one id"
    reported: AlertKind | None = None
    for decision in fired:
        if decision.kind is AlertKind.RECOVERED:
            assert reported in (AlertKind.LATE, AlertKind.AT_RISK)
            reported = None
        elif decision.kind is AlertKind.LATE:
            assert reported is not AlertKind.LATE
            reported = AlertKind.LATE
        else:
            assert decision.kind is AlertKind.AT_RISK
            assert reported is None
            reported = AlertKind.AT_RISK


@given(observations)
def test_every_delay_alert_rests_on_confirmed_estimates(sequence: list[DelayCondition]) -> None:
    """An alert fires only on an estimate that repeats the one before it (2 confirmations)."""
    state = AlertConditions()
    for i, observed in enumerate(sequence):
        state, decided = alerts.observe_delay(state, observed, tenant_id="a", shipment_id="s")
        if decided:
            assert i >= 1
            assert sequence[i - 1] is observed


def test_ids_are_scoped_by_tenant_and_shipment() -> None:
    _, a = feed([LATE, LATE], tenant_id="acme", shipment_id="s1")
    _, b = feed([LATE, LATE], tenant_id="other", shipment_id="s1")
    _, c = feed([LATE, LATE], tenant_id="acme", shipment_id="s2")
    assert len({a[0].alert_id, b[0].alert_id, c[0].alert_id}) == 3


# --- the delay rule: probability of arriving after the window ---------------------------

SEVERITY_ORDER = {ON_TIME: 0, AT_RISK: 1, LATE: 2}
WINDOW_END = T0 + timedelta(hours=3)


def estimate_at(eta_minus_end_s: float, early_s: float, late_s: float) -> EtaEstimate:
    """An estimate whose point is `eta_minus_end_s` from the window end, with the
    interval reaching `early_s` before and `late_s` after it."""
    arrival = WINDOW_END + timedelta(seconds=eta_minus_end_s)
    return EtaEstimate(
        arrival=arrival,
        earliest=arrival - timedelta(seconds=early_s),
        latest=arrival + timedelta(seconds=late_s),
        confidence=0.8,
        method=EtaMethod.ROUTE,
        remaining_m=5000.0,
        position_age_s=0.0,
        position_at=T0,
        travel_s=600.0,
        dwell_s=0.0,
        observed_speed_mps=None,
        speed_ratio=1.0,
        off_route=False,
        distance_along_m=None,
        offset_m=None,
    )


offsets = st.floats(min_value=-7200, max_value=7200, allow_nan=False)
spreads = st.floats(min_value=0, max_value=7200, allow_nan=False)
margins = st.builds(
    DelayMargins,
    late_after_s=st.floats(min_value=0, max_value=3600),
    at_risk_within_s=st.floats(min_value=0, max_value=3600),
    late_probability=st.floats(min_value=0.5, max_value=1.0),
    at_risk_probability=st.floats(min_value=0.01, max_value=0.5),
)


def test_late_probability_reads_the_interval_as_a_central_80_percent_interval() -> None:
    # The latest bound exactly at the window end: a 10 % chance of being later.
    assert late_probability(estimate_at(-600, 300, 600), WINDOW_END) == pytest.approx(0.1)
    # The point estimate at the end: even odds. The earliest bound at it: 90 %.
    assert late_probability(estimate_at(0, 300, 600), WINDOW_END) == pytest.approx(0.5)
    assert late_probability(estimate_at(300, 300, 600), WINDOW_END) == pytest.approx(0.9)
    # No spread on the side that matters: certain either way.
    assert late_probability(estimate_at(-1, 300, 0), WINDOW_END) == 0.0
    assert late_probability(estimate_at(1, 0, 300), WINDOW_END) == 1.0


@given(offsets, spreads, spreads, st.floats(min_value=0, max_value=3600), margins)
def test_a_later_estimate_is_never_a_milder_condition(
    offset: float, early: float, late: float, shift: float, m: DelayMargins
) -> None:
    sooner = estimate_at(offset, early, late)
    later = estimate_at(offset + shift, early, late)
    p_sooner = late_probability(sooner, WINDOW_END, m.interval_coverage)
    p_later = late_probability(later, WINDOW_END, m.interval_coverage)
    assert 0.0 <= p_sooner <= p_later + 1e-12 <= 1.0 + 1e-12
    assert (
        SEVERITY_ORDER[classify_delay(sooner, WINDOW_END, m)]
        <= SEVERITY_ORDER[classify_delay(later, WINDOW_END, m)]
    )


@given(offsets, spreads, spreads, st.floats(min_value=1, max_value=4), margins)
def test_more_uncertainty_pulls_the_probability_toward_even_odds(
    offset: float, early: float, late: float, widen: float, m: DelayMargins
) -> None:
    narrow = estimate_at(offset, early, late)
    wide = estimate_at(offset, early * widen, late * widen)
    p_narrow = late_probability(narrow, WINDOW_END)
    p_wide = late_probability(wide, WINDOW_END)
    severity_narrow = SEVERITY_ORDER[classify_delay(narrow, WINDOW_END, m)]
    severity_wide = SEVERITY_ORDER[classify_delay(wide, WINDOW_END, m)]
    if narrow.arrival <= WINDOW_END:  # on time by the point estimate: only adds risk
        assert p_narrow <= p_wide + 1e-12 <= 0.5 + 1e-12
        assert severity_narrow <= severity_wide
    else:  # late by the point estimate: uncertainty can only soften it
        assert p_narrow + 1e-12 >= p_wide >= 0.5
        assert severity_narrow >= severity_wide


@given(
    st.lists(st.floats(min_value=0, max_value=900), min_size=1, max_size=40),
    st.floats(min_value=-7200, max_value=0),
    spreads,
    spreads,
)
def test_an_estimate_that_only_slips_later_never_recovers(
    slips: list[float], start: float, early: float, late: float
) -> None:
    """Observations of a shipment slipping further behind escalate, at most once each."""
    offset = start
    observed = []
    for slip in slips:
        offset += slip
        observed.append(classify_delay(estimate_at(offset, early, late), WINDOW_END))
    _, fired = feed(observed)
    assert kinds(fired) in (
        [],
        [AlertKind.AT_RISK],
        [AlertKind.LATE],
        [AlertKind.AT_RISK, AlertKind.LATE],
    )
