"""ETA accuracy on real arrivals: the ``eta_arrivals`` and ``eta_scores`` tables.

The projector calls :func:`record_arrivals` inside the transaction that records an
arrival (a ``delivered`` event, or the vehicle entering the destination geofence);
``cargotrack eta-report`` and the ``cargotrack dev`` view read with :func:`load_errors`
and :func:`recent_line`. The scoring itself is pure: shared/domain/eta_accuracy.py.

This module is the only one that names these two tables. It also reads
``eta_history`` (written by services/projector/live.py): the ETAs a shipment was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from shared.db import Connection, as_columns
from shared.domain.eta_accuracy import GivenEta, HorizonError, score_arrival, summarize

ArrivalSource = Literal["geofence", "delivered"]


@dataclass(frozen=True, slots=True)
class Arrival:
    """A shipment's actual arrival: when, and what revealed it."""

    tenant_id: str
    shipment_id: str
    arrived_at: datetime
    source: ArrivalSource


@dataclass(frozen=True, slots=True)
class ScoredArrival:
    """An arrival recorded by this call, with the scores stored for it."""

    arrival: Arrival
    scores: tuple[HorizonError, ...]


async def record_arrivals(
    connection: Connection, arrivals: Sequence[Arrival]
) -> list[ScoredArrival]:
    """Record each shipment's arrival and score the ETAs it was given, in the caller's
    transaction; return what this call recorded.

    Exactly once per shipment: an arrival already recorded (by an earlier batch, the
    other trigger, another projector instance) is left as it is and returns nothing, so
    a replayed or retried batch scores nothing twice. Several arrivals of one shipment
    in one call: the earliest wins. Scores use the ``eta_history`` rows visible to the
    transaction, this batch's included.
    """
    first: dict[tuple[str, str], Arrival] = {}
    for arrival in arrivals:
        key = (arrival.tenant_id, arrival.shipment_id)
        if key not in first or arrival.arrived_at < first[key].arrived_at:
            first[key] = arrival
    if not first:
        return []
    ordered = sorted(first.values(), key=lambda a: (a.tenant_id, a.shipment_id))
    inserted = await connection.fetch(
        "INSERT INTO eta_arrivals (tenant_id, shipment_id, arrived_at, source)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[])"
        " ON CONFLICT (tenant_id, shipment_id) DO NOTHING RETURNING tenant_id, shipment_id",
        *as_columns([(a.tenant_id, a.shipment_id, a.arrived_at, a.source) for a in ordered], 4),
    )
    recorded = [first[(row["tenant_id"], row["shipment_id"])] for row in inserted]
    if not recorded:
        return []
    history = await connection.fetch(
        "SELECT h.tenant_id, h.shipment_id, h.computed_at, h.position_at,"
        " h.estimated_arrival FROM eta_history h"
        " JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, shipment_id)"
        " USING (tenant_id, shipment_id)",
        [a.tenant_id for a in recorded],
        [a.shipment_id for a in recorded],
    )
    given: dict[tuple[str, str], list[GivenEta]] = {}
    for row in history:
        given.setdefault((row["tenant_id"], row["shipment_id"]), []).append(
            GivenEta(row["computed_at"], row["position_at"], row["estimated_arrival"])
        )
    result = []
    rows = []
    for arrival in sorted(recorded, key=lambda a: (a.tenant_id, a.shipment_id)):
        scores = score_arrival(
            given.get((arrival.tenant_id, arrival.shipment_id), ()), arrival.arrived_at
        )
        result.append(ScoredArrival(arrival, tuple(scores)))
        rows += [
            (
                arrival.tenant_id,
                arrival.shipment_id,
                s.horizon,
                arrival.arrived_at,
                s.computed_at,
                s.estimated_arrival,
                s.error_s,
            )
            for s in scores
        ]
    if rows:
        await connection.execute(
            "INSERT INTO eta_scores (tenant_id, shipment_id, horizon, arrived_at, computed_at,"
            " estimated_arrival, error_s) SELECT * FROM unnest($1::text[], $2::text[],"
            " $3::text[], $4::timestamptz[], $5::timestamptz[], $6::timestamptz[],"
            " $7::float8[])",
            *as_columns(rows, 7),
        )
    return result


@dataclass(frozen=True, slots=True)
class StoredError:
    """One stored score, as the reports read it."""

    tenant_id: str
    horizon: str
    arrived_at: datetime
    error_s: float


async def load_errors(
    connection: Connection, since: datetime, until: datetime, tenant_id: str | None = None
) -> list[StoredError]:
    """Every score of arrivals in [since, until), of one tenant or all, oldest first."""
    rows = await connection.fetch(
        "SELECT tenant_id, horizon, arrived_at, error_s FROM eta_scores"
        " WHERE arrived_at >= $1 AND arrived_at < $2 AND ($3::text IS NULL OR tenant_id = $3)"
        " ORDER BY arrived_at, tenant_id, shipment_id, horizon",
        since,
        until,
        tenant_id,
    )
    return [StoredError(r["tenant_id"], r["horizon"], r["arrived_at"], r["error_s"]) for r in rows]


async def count_arrivals(
    connection: Connection, since: datetime, until: datetime, tenant_id: str | None = None
) -> int:
    """Arrivals recorded in [since, until), scored or not (a trip may have no horizon)."""
    value = await connection.fetchval(
        "SELECT count(*) FROM eta_arrivals"
        " WHERE arrived_at >= $1 AND arrived_at < $2 AND ($3::text IS NULL OR tenant_id = $3)",
        since,
        until,
        tenant_id,
    )
    return int(value or 0)


async def recent_line(connection: Connection, tenant_id: str, now: datetime) -> str:
    """One line on the last 7 days of one tenant's arrivals, for ``cargotrack dev``:
    arrivals scored, MAE at 50 % of the trip and 5 minutes before arrival, and the
    same MAE over the 7 days before (the trend)."""
    week = timedelta(days=7)
    errors = await load_errors(connection, now - 2 * week, now, tenant_id)
    arrivals = await count_arrivals(connection, now - week, now, tenant_id)

    def mae_min(horizon: str, start: datetime, end: datetime) -> str:
        summary = summarize(
            e.error_s for e in errors if e.horizon == horizon and start <= e.arrived_at < end
        )
        return "-" if summary is None else f"{summary.mae_s / 60:.1f} min"

    this_week = (
        f"MAE@50% {mae_min('50%', now - week, now)}, MAE@5m {mae_min('5m', now - week, now)}"
    )
    previous = mae_min("50%", now - 2 * week, now - week)
    return f"ETA accuracy, last 7 days: {arrivals} arrivals, {this_week} (week before: {previous})"
