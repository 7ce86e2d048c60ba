"""STALE_TRACKING: shipments in transit whose vehicle stopped reporting.

A silence is not an event in the log, so this is the one alert decided by the
wall clock: a periodic scan (every `interval_s`) finds shipments in transit
(picked up, in transit, out for delivery) whose live tracking position is older
than `stale_after_min`, and feeds shared.domain.alerts.observe_silence. It
fires once per silence: the alert id is derived from the position's event time,
and the position it was raised for is kept in shipment_tracking.conditions
(`stale_since`), in the same transaction as the outbox row.

Concurrency with the projection: rows are claimed with FOR UPDATE SKIP LOCKED
(a row the projection is writing right now is looked at again next scan), and
only the `stale_since` key of the conditions is written, so the projection's
debounce counters are never overwritten. If the projection overwrites
`stale_since` with an older copy, the next scan decides the same alert again
with the same id, and the outbox's unique alert id makes that a no-op.

Only shipments with a tracking row (whose vehicle sent at least one position
after assignment) are considered: without a position there is no "last seen".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg

from services.projector.live import PendingAlert, write_alerts
from shared.config import AlertSettings
from shared.domain import alerts
from shared.envelopes import utc_now
from shared.readmodel import shipment_tracking
from shared.runtime import periodically

log = logging.getLogger(__name__)

SCAN_INTERVAL_S = 30.0


class StaleScanner:
    """Raises STALE_TRACKING for silent shipments; `run()` scans every interval_s."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: AlertSettings,
        *,
        interval_s: float = SCAN_INTERVAL_S,
        batch_size: int = 500,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.pool = pool
        self.stale_after = timedelta(minutes=settings.stale_after_min)
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.clock = clock
        self.raised = 0

    async def scan_once(self) -> int:
        """One scan; returns how many new alerts it wrote to the outbox.

        Looks at up to batch_size candidates per transaction, repeating until none
        is left, so a large backlog does not hold one long transaction.
        """
        total = 0
        while True:
            raised, candidates = await self._scan_batch(self.clock())
            total += raised
            if candidates < self.batch_size:
                break
        self.raised += total
        if total:
            log.info("stale tracking: %d new alert(s)", total)
        return total

    async def _scan_batch(self, now: datetime) -> tuple[int, int]:
        async with self.pool.acquire() as connection, connection.transaction():
            rows = await shipment_tracking.stale_candidates(
                connection, now - self.stale_after, self.batch_size
            )
            pending: list[PendingAlert] = []
            marks = []
            for row in rows:
                updated, decisions = alerts.observe_silence(
                    row.conditions,
                    row.position.at,
                    now,
                    stale_after_s=self.stale_after.total_seconds(),
                    tenant_id=row.tenant_id,
                    shipment_id=row.shipment_id,
                )
                if updated == row.conditions:
                    continue
                where = (row.position.lat, row.position.lon)
                pending.extend(PendingAlert(row.shipment, d, None, where, now) for d in decisions)
                marks.append((row.tenant_id, row.shipment_id, updated.stale_since))
            raised = await write_alerts(connection, pending)
            await shipment_tracking.mark_stale(connection, marks)
        return raised, len(rows)

    async def run(self) -> None:
        """Scan every interval_s until cancelled; a database error ends the loop."""

        async def scan() -> None:
            await self.scan_once()

        await periodically(self.interval_s, scan)
