"""Debounced delay alerts: one alert per change of a shipment's condition.

`AlertConditions` is what was last reported for a shipment; `observe_*` take a
new observation and return the new conditions plus the alerts it causes (often
none). Everything is pure and deterministic: the projector feeds observations in
log order with event-time clocks, so a replay makes the same decisions, and each
alert's id comes from (tenant, shipment, kind, episode), so a replayed decision
has the same id as the original and is deduplicated downstream.

Debouncing rules:
- a delay condition (on time / at risk / late) is reported only after
  `confirmations` consecutive estimates agree on it, so one noisy ETA does not
  alert;
- LATE fires when entered, unless LATE was already reported since the shipment
  was last on time (LATE → AT_RISK → LATE is one lateness, reported once);
  AT_RISK fires only when entered from on time; leaving LATE for AT_RISK fires
  nothing (still not on time); RECOVERED fires on returning to on time after
  LATE or AT_RISK was reported;
- OFF_ROUTE fires when the vehicle leaves the route (the ETA model already
  applies hysteresis), nothing on return;
- STALE_TRACKING fires once per silence (keyed by the last position's time);
- DELIVERY_FAILED fires once per failed attempt.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime

from shared.domain.eta import DelayCondition
from shared.domain.ids import alert_id


class AlertKind(enum.IntEnum):
    """Numbers match cargotrack.v1.AlertKind."""

    LATE = 1
    AT_RISK = 2
    RECOVERED = 3
    STALE_TRACKING = 4
    OFF_ROUTE = 5
    DELIVERY_FAILED = 6


class Severity(enum.IntEnum):
    """Numbers match cargotrack.v1.Severity."""

    INFO = 1
    WARNING = 2
    CRITICAL = 3


SEVERITY = {
    AlertKind.LATE: Severity.CRITICAL,
    AlertKind.AT_RISK: Severity.WARNING,
    AlertKind.RECOVERED: Severity.INFO,
    AlertKind.STALE_TRACKING: Severity.WARNING,
    AlertKind.OFF_ROUTE: Severity.WARNING,
    AlertKind.DELIVERY_FAILED: Severity.CRITICAL,
}


@dataclass(frozen=True)
class AlertDecision:
    """An alert to publish. `alert_id` is stable for the same change."""

    alert_id: str
    kind: AlertKind
    severity: Severity
    message: str


@dataclass(frozen=True)
class AlertConditions:
    """What was last reported for one shipment, plus the debounce counters."""

    delay: str = DelayCondition.ON_TIME.value
    #: Counts changes of `delay`: part of each delay alert's id.
    delay_episode: int = 0
    #: The delay condition last alerted since the shipment was last on time ("" none).
    delay_reported: str = ""
    pending_delay: str = ""
    pending_count: int = 0
    off_route: bool = False
    off_route_episode: int = 0
    #: Event time of the last position a STALE_TRACKING alert was raised for.
    stale_since: str = ""


def observe_delay(
    conditions: AlertConditions,
    observed: DelayCondition,
    *,
    tenant_id: str,
    shipment_id: str,
    confirmations: int = 2,
    detail: str = "",
) -> tuple[AlertConditions, list[AlertDecision]]:
    """Feed one delay classification; return new conditions and any alert it causes."""
    if observed.value == conditions.delay:
        return replace(conditions, pending_delay="", pending_count=0), []
    count = conditions.pending_count + 1 if conditions.pending_delay == observed.value else 1
    if count < confirmations:
        return replace(conditions, pending_delay=observed.value, pending_count=count), []
    # Rows stored before `delay_reported` existed: a condition other than on time
    # was always alerted when entered.
    reported = conditions.delay_reported or (
        conditions.delay if conditions.delay != DelayCondition.ON_TIME.value else ""
    )
    episode = conditions.delay_episode + 1
    kind: AlertKind | None = None
    if observed is DelayCondition.LATE:
        if reported != DelayCondition.LATE.value:
            kind = AlertKind.LATE
            reported = observed.value
    elif observed is DelayCondition.AT_RISK:
        if not reported:
            kind = AlertKind.AT_RISK
            reported = observed.value
    elif reported:
        kind = AlertKind.RECOVERED
        reported = ""
    updated = replace(
        conditions,
        delay=observed.value,
        delay_episode=episode,
        delay_reported=reported,
        pending_delay="",
        pending_count=0,
    )
    if kind is None:
        return updated, []
    message = {
        AlertKind.LATE: "expected to arrive after the promised window",
        AlertKind.AT_RISK: "at risk of missing the promised window",
        AlertKind.RECOVERED: "back on time",
    }[kind]
    decision = AlertDecision(
        alert_id(shipment_id, kind, str(episode), tenant_id=tenant_id),
        kind,
        SEVERITY[kind],
        f"{message}{': ' + detail if detail else ''}",
    )
    return updated, [decision]


def observe_route(
    conditions: AlertConditions,
    off_route: bool,
    *,
    tenant_id: str,
    shipment_id: str,
    offset_m: float,
) -> tuple[AlertConditions, list[AlertDecision]]:
    """Feed the ETA model's on/off-route verdict (already hysteretic)."""
    if off_route == conditions.off_route:
        return conditions, []
    if not off_route:
        return replace(conditions, off_route=False), []
    episode = conditions.off_route_episode + 1
    decision = AlertDecision(
        alert_id(shipment_id, AlertKind.OFF_ROUTE, str(episode), tenant_id=tenant_id),
        AlertKind.OFF_ROUTE,
        SEVERITY[AlertKind.OFF_ROUTE],
        f"vehicle is {offset_m:.0f} m off the planned route",
    )
    return replace(conditions, off_route=True, off_route_episode=episode), [decision]


def observe_silence(
    conditions: AlertConditions,
    last_position_at: datetime,
    now: datetime,
    *,
    stale_after_s: float,
    tenant_id: str,
    shipment_id: str,
) -> tuple[AlertConditions, list[AlertDecision]]:
    """STALE_TRACKING once per silence: when `now` is stale_after_s past the last fix."""
    marker = last_position_at.isoformat()
    if conditions.stale_since == marker:
        return conditions, []
    if (now - last_position_at).total_seconds() < stale_after_s:
        return conditions, []
    minutes = (now - last_position_at).total_seconds() / 60
    decision = AlertDecision(
        alert_id(shipment_id, AlertKind.STALE_TRACKING, marker, tenant_id=tenant_id),
        AlertKind.STALE_TRACKING,
        SEVERITY[AlertKind.STALE_TRACKING],
        f"no GPS for {minutes:.0f} min",
    )
    return replace(conditions, stale_since=marker), [decision]


def delivery_failed(tenant_id: str, shipment_id: str, attempt: int, reason: str) -> AlertDecision:
    """The alert for one failed delivery attempt."""
    return AlertDecision(
        alert_id(shipment_id, AlertKind.DELIVERY_FAILED, str(attempt), tenant_id=tenant_id),
        AlertKind.DELIVERY_FAILED,
        SEVERITY[AlertKind.DELIVERY_FAILED],
        f"delivery attempt {attempt} failed{': ' + reason if reason else ''}",
    )
