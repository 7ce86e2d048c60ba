"""What users feel during a database failover: the longest pause in acknowledgements
and in new state (tests/faults/test_failover.py).

"Nothing lost" says nothing about how long the clients waited for an answer, or how
long the read model stood still. `GapMeter` samples both while a scenario runs:

- **acknowledgements**: how many of the ledger's items the services have
  acknowledged (what the clients were told), every `interval_s`;
- **state**: the projection's committed progress in PostgreSQL, the sum over its
  partitions of the stored offsets (`projection_offsets`, committed in the same
  transaction as the state), read through the scenario's DATABASE_URL, so after a
  failover it reads the new primary.

A *state update* is a sample whose progress exceeds every earlier sample: after a
failover to a standby that lacked the last transactions, progress first reads lower
than before (the state went back in time) and only counts again once the projector
has re-applied past what users had already seen. The gaps are the longest times
between two consecutive events of each kind, so idle time before the first and after
the last event is not counted. Sampling bounds the resolution to about `interval_s`
plus the time of one read.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import asyncpg

from tests.faults.background import Background
from tests.faults.gaps import longest_gap
from tests.faults.workload import Ledger


@dataclass
class Timeline:
    """Moments (time.monotonic()) at which something new happened."""

    moments: list[float] = field(default_factory=list)

    def longest_gap(self) -> float:
        """The longest time between two consecutive moments (0 with fewer than two)."""
        return longest_gap(self.moments)

    def first_after(self, instant: float) -> float | None:
        """The first moment after `instant`, if any."""
        return next((m for m in self.moments if m > instant), None)


class GapMeter(Background):
    """Samples acknowledgements and committed state; `async with` runs the sampler."""

    task_name = "gap-meter"

    def __init__(
        self,
        ledger: Ledger,
        database_url: str,
        schema: str,
        *,
        projection: str = "tracking",
        interval_s: float = 0.02,
    ) -> None:
        super().__init__()
        self.ledger = ledger
        self.database_url = database_url
        self.schema = schema
        self.projection = projection
        self.interval_s = interval_s
        self.acks = Timeline()
        self.updates = Timeline()
        #: Samples of the state that failed (no database answering), for the notes.
        self.unreadable = 0
        self.last_error = ""
        self._acked = 0
        self._progress = 0  # the first update is the first commit, not an empty read

    def notes(self) -> dict[str, object]:
        """The figures for a scenario's report."""
        return {
            "longest ack gap s": round(self.acks.longest_gap(), 2),
            "longest state-update gap s": round(self.updates.longest_gap(), 2),
            "unreadable state samples": self.unreadable,
        }

    async def _run(self) -> None:
        connection: asyncpg.Connection | None = None
        try:
            while True:
                now = time.monotonic()
                acked = sum(1 for item in self.ledger.items.values() if item.acked)
                if acked > self._acked:
                    self._acked = acked
                    self.acks.moments.append(now)
                try:
                    if connection is None:
                        connection = await asyncpg.connect(
                            self.database_url,
                            timeout=1.0,
                            server_settings={"search_path": self.schema},
                        )
                    progress = await connection.fetchval(
                        "SELECT coalesce(sum(last_offset + 1), 0) FROM projection_offsets"
                        " WHERE projection = $1",
                        self.projection,
                        timeout=1.0,
                    )
                except Exception as error:  # a sample failed; the meter goes on
                    # Down, promoting, the schema not there yet, or a read cut by a
                    # timeout: drop the connection and try again next time.
                    self.unreadable += 1
                    self.last_error = f"{type(error).__name__}: {error}"
                    if connection is not None:
                        connection.terminate()
                        connection = None
                else:
                    if progress > self._progress:
                        self._progress = progress
                        self.updates.moments.append(now)
                await asyncio.sleep(self.interval_s)
        finally:
            if connection is not None:
                connection.terminate()
