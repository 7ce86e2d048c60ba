"""``cargotrack eta-report``: how accurate the live ETAs were on real arrivals.

Reads the scores the projector stores when a shipment arrives (``eta_scores``, see
shared/readmodel/eta_scores.py and docs/eta.md) and prints, per tenant and horizon,
the number of arrivals scored, the mean absolute error (MAE), its median (p50) and
90th percentile (p90), and the bias (mean signed error; positive: ETAs too late), over
a time range of arrivals; then the trend: MAE of the 7 days up to the end of the range
against the 7 days before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from shared.config import ConfigError, DatabaseSettings, load_settings
from shared.db import connect
from shared.domain.eta_accuracy import HORIZONS, ErrorSummary, summarize
from shared.readmodel.eta_scores import StoredError, load_errors

WEEK = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One tenant and horizon: the range's summary and the week-over-week MAE (s)."""

    tenant_id: str
    horizon: str
    summary: ErrorSummary | None
    mae_this_week_s: float | None
    mae_week_before_s: float | None


def build_report(
    errors: Sequence[StoredError], since: datetime, until: datetime
) -> list[ReportRow]:
    """Rows per tenant (sorted) and horizon (HORIZONS order) that have any score in
    [until - 14 days, until) or in [since, until). Pure."""
    tenants = sorted({e.tenant_id for e in errors})
    rows = []
    for tenant in tenants:
        for horizon in HORIZONS:
            mine = [e for e in errors if e.tenant_id == tenant and e.horizon == horizon]
            if not mine:
                continue

            def mae(start: datetime, end: datetime, mine: list[StoredError] = mine) -> float | None:
                s = summarize(e.error_s for e in mine if start <= e.arrived_at < end)
                return None if s is None else s.mae_s

            in_range = summarize(e.error_s for e in mine if since <= e.arrived_at < until)
            rows.append(
                ReportRow(
                    tenant,
                    horizon,
                    in_range,
                    mae(until - WEEK, until),
                    mae(until - 2 * WEEK, until - WEEK),
                )
            )
    return rows


def _min(seconds: float | None, signed: bool = False) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:+.2f}" if signed else f"{seconds / 60:.2f}"


def _trend(this_week: float | None, before: float | None) -> str:
    if this_week is None or before is None:
        return "-"
    change = (this_week - before) / 60
    if abs(change) < 0.005:
        return "same"
    return f"{'better' if change < 0 else 'worse'} ({change:+.2f})"


def format_report(rows: Sequence[ReportRow], since: datetime, until: datetime) -> str:
    """The report as aligned text (minutes)."""
    lines = [
        f"ETA accuracy on real arrivals from {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M}"
        " UTC (absolute error, minutes; bias: mean signed error, + = ETA too late)",
        f"{'tenant':<14} {'horizon':<8} {'n':>5} {'MAE':>7} {'p50':>7} {'p90':>7} {'bias':>7}"
        f"   {'MAE 7d':>7} {'7d before':>9}  trend",
    ]
    for row in rows:
        s = row.summary
        trend = _trend(row.mae_this_week_s, row.mae_week_before_s)
        stats = (
            f"{s.count:>5} {_min(s.mae_s):>7} {_min(s.p50_s):>7} {_min(s.p90_s):>7}"
            f" {_min(s.bias_s, True):>7}"
            if s
            else f"{0:>5} {'-':>7} {'-':>7} {'-':>7} {'-':>7}"
        )
        lines.append(
            f"{row.tenant_id:<14} {row.horizon:<8} {stats}   {_min(row.mae_this_week_s):>7}"
            f" {_min(row.mae_week_before_s):>9}  {trend}"
        )
    if not rows:
        lines.append("(no arrivals scored in this range)")
    return "\n".join(lines)


async def load_report(
    database: DatabaseSettings, since: datetime, until: datetime, tenant: str | None
) -> list[ReportRow]:
    """Read the scores the report needs (the range and the two trend weeks), build it."""
    connection = await connect(database)
    try:
        errors = await load_errors(connection, min(since, until - 2 * WEEK), until, tenant)
    finally:
        await connection.close()
    return build_report(errors, since, until)


def _instant(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``cargotrack eta-report``."""
    ap = argparse.ArgumentParser(
        prog="cargotrack eta-report",
        description="ETA accuracy on real arrivals (MAE, p50, p90 per tenant and horizon).",
    )
    ap.add_argument("--since", type=_instant, help="arrivals from (ISO 8601; default 7 days ago)")
    ap.add_argument("--until", type=_instant, help="arrivals before (ISO 8601; default now)")
    ap.add_argument("--tenant", help="one tenant (default: all)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def main(
    argv: Sequence[str] | None = None,
    *,
    now: datetime | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``cargotrack eta-report``: print the report. Exit 0, or 2 for bad options or
    configuration (the database comes from DATABASE_URL / CARGOTRACK_DB_SCHEMA of
    `environ`, by default this process's environment)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    until = args.until or now or datetime.now(UTC)
    since = args.since or until - WEEK
    if since >= until:
        ap.error("--since must be before --until")
    try:
        settings = load_settings(os.environ if environ is None else environ)
    except ConfigError as error:
        print(f"eta-report: {error}", file=sys.stderr)
        return 2
    rows = asyncio.run(load_report(settings.database, since, until, args.tenant))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_report(rows, since, until))
    return 0
