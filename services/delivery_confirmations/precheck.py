"""The best-effort pre-check of a delivery confirmation against the read model.

The projection's fold (shared/domain/tracking.py) is the authority on whether a
confirmation delivers: it refuses, as an anomaly, one naming a vehicle other than
the shipment's assigned vehicle at that point of the log, and one for a shipment
whose proof is settled. This pre-check only gives the caller a clear status in the
common case, before anything is written: it reads the shipment's row of the read
model (PostgreSQL `shipments`, through shared.readmodel.shipments) and refuses

- a confirmation naming a vehicle while the read model assigns the shipment to
  another one: PERMISSION_DENIED for a driver (the shipment is not its vehicle's),
  FAILED_PRECONDITION for ops naming a vehicle;
- a confirmation of a delivered or cancelled shipment that holds the proof of
  another confirmation: FAILED_PRECONDITION (a retry of the very confirmation that
  settled the proof passes, so retries stay idempotent).

Everything else is accepted and left to the fold: a shipment the read model does
not know (yet), one it shows without a vehicle, a read model that does not answer
within READ_TIMEOUT_S (PostgreSQL down must not stop drivers from confirming), and
confirmations that name no vehicle (the back office). The read model lags the log,
so in the seconds after a reassignment the pre-check may refuse the newly assigned
driver (who retries) or let the previous one through (whose confirmation the fold
then records as an anomaly).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from types import TracebackType

import asyncpg

from shared import db
from shared.config import DatabaseSettings
from shared.domain.tracking import FINAL
from shared.metrics import CONFIRMATION_PRECHECKS
from shared.readmodel import shipments
from shared.readmodel.rows import Assignment

log = logging.getLogger(__name__)

#: The longest a confirmation waits for the read model before it is accepted unchecked.
READ_TIMEOUT_S = 0.5
#: Connections of the pre-check's pool (opened on demand, none held while idle).
POOL_MAX = 4


class Outcome(enum.StrEnum):
    """What the pre-check made of one confirmation (the metric's `outcome` label)."""

    PASSED = "passed"
    NOT_ASSIGNED = "not_assigned"
    SETTLED = "settled"
    UNKNOWN = "unknown"
    UNASSIGNED = "unassigned"
    UNAVAILABLE = "unavailable"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    #: Why the confirmation is refused (None: accepted).
    reason: str | None = None


def verdict(
    assignment: Assignment | None,
    shipment_id: str,
    vehicle_id: str,
    confirmation_id: str,
) -> Verdict:
    """What the read model's `assignment` of a shipment says about a confirmation of it
    naming `vehicle_id` (pure; see the module docstring for the rules). The reasons
    never name the vehicle the shipment is assigned to."""
    if assignment is None:
        return Verdict(Outcome.UNKNOWN)
    if not assignment.vehicle_id:
        return Verdict(Outcome.UNASSIGNED)
    if assignment.vehicle_id != vehicle_id:
        return Verdict(
            Outcome.NOT_ASSIGNED,
            f"shipment {shipment_id!r} is not assigned to vehicle {vehicle_id!r}",
        )
    settled = assignment.proof_confirmation_id
    if assignment.status in FINAL and settled is not None and settled != confirmation_id:
        return Verdict(
            Outcome.SETTLED,
            f"shipment {shipment_id!r} is already settled with a proof of delivery,"
            " which is never replaced",
        )
    return Verdict(Outcome.PASSED)


class ReadModelPrecheck:
    """The pre-check's access to the read model: a small pool opened on entry (no
    connection is made until the first check) and closed on exit."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None

    async def __aenter__(self) -> ReadModelPrecheck:
        self._pool = await db.create_pool(
            self._settings, min_size=0, max_size=POOL_MAX, command_timeout=READ_TIMEOUT_S
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def check(
        self, tenant_id: str, shipment_id: str, vehicle_id: str, confirmation_id: str
    ) -> Verdict:
        """The verdict on a confirmation naming `vehicle_id` (counted in CONFIRMATION_PRECHECKS).

        A read model that fails or does not answer within READ_TIMEOUT_S gives
        UNAVAILABLE (accepted), logged at debug: never an error of the call.
        """
        assert self._pool is not None, "enter the pre-check first"
        try:
            async with (
                asyncio.timeout(READ_TIMEOUT_S),
                self._pool.acquire() as connection,
            ):
                assignment = await shipments.load_assignment(connection, tenant_id, shipment_id)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.debug("read model not consulted, confirmation accepted unchecked: %r", error)
            result = Verdict(Outcome.UNAVAILABLE)
        else:
            result = verdict(assignment, shipment_id, vehicle_id, confirmation_id)
            log.debug("pre-check of the confirmation: %s", result.outcome)
        CONFIRMATION_PRECHECKS.labels(result.outcome).inc()
        return result


def skipped() -> None:
    """Count a confirmation that names no vehicle (the back office): never pre-checked."""
    CONFIRMATION_PRECHECKS.labels(Outcome.SKIPPED).inc()
