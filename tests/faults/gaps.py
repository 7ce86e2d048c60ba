"""What users feel during a fault: the longest gaps in acknowledgements, state updates
and query answers (the cluster scenarios, tests/faults/test_cluster.py).

"Nothing lost" says the system was correct; these say how long it stood still:

- **ack gap**: the longest time one client (a driver's app: one vehicle's batches; a
  TMS: its shipments' events and confirmations) waited between two consecutive
  acknowledgements, from the ack times the ledger records. The paced workload's own
  rhythm is in it (a driver sends a batch every ~0.2-0.3 s, a TMS one call per
  ~0.6-4 s), so it is never 0;
- **ack stall**: the longest time no client at all got an acknowledgement;
- **update gap**: the longest time the committed state in PostgreSQL did not move
  (the projection's stored offsets, polled every `PROBE_INTERVAL_S`, so this is
  exact to about that) while the clients were writing;
- **query gap** and **failed queries**: the longest time between two answered
  GetShipment calls of a client polling tracking-query, and how many calls failed.

Every scenario adds a `GapRow` to ROWS; tests/faults/conftest.py prints the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg
import grpc

from shared.auth import Role
from shared.config import Settings
from shared.pb import tracking_pb2, tracking_pb2_grpc
from shared.projection import load_offsets
from tests.faults.checker import Report
from tests.faults.workload import TENANT, Workload
from tests.ingest_helpers import bearer

#: How often the update and query probes look.
PROBE_INTERVAL_S = 0.1


def longest_gap(
    times: Iterable[float], start: float | None = None, end: float | None = None
) -> float:
    """The longest interval between consecutive instants of `times`, with `start` and
    `end` (when given) as the first and last instants; 0.0 with fewer than two."""
    points = sorted(times)
    if start is not None:
        points = [start, *(t for t in points if t >= start)]
    if end is not None:
        points = [*(t for t in points if t <= end), end]
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)


def client_ack_times(workload: Workload) -> dict[str, list[float]]:
    """Ack times per client: each driver's batches, each TMS's events and confirmations."""
    clients: dict[str, list[float]] = {}
    for driver in workload.drivers:
        clients[driver.vehicle.vehicle_id] = [
            item.acked_at for item in driver.vehicle.batches if item.acked
        ]
    for number, tms in enumerate(workload.tms):
        clients[f"tms-{number}"] = [
            item.acked_at for shipment in tms.shipments for item in shipment.steps if item.acked
        ]
    return clients


class UpdateProbe:
    """Polls the projection's stored offsets; remembers when the committed state moved."""

    def __init__(self, settings: Settings, topics: Sequence[str], partitions: int = 3) -> None:
        self._settings = settings
        self._partitions = [
            (topic, partition) for topic in topics for partition in range(partitions)
        ]
        self.moved: list[float] = []
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="update-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        from aiokafka import TopicPartition

        partitions = [TopicPartition(t, p) for t, p in self._partitions]
        last: int | None = None
        connection: asyncpg.Connection | None = None
        try:
            while True:
                try:
                    if connection is None or connection.is_closed():
                        connection = await asyncpg.connect(
                            self._settings.database.url,
                            server_settings={"search_path": self._settings.database.schema},
                        )
                    stored = await load_offsets(connection, "tracking", partitions)
                except (OSError, asyncpg.PostgresError):
                    self.errors += 1
                    connection = None
                else:
                    total = sum(stored.values())
                    if last is not None and total > last:
                        self.moved.append(time.monotonic())
                    last = total
                await asyncio.sleep(PROBE_INTERVAL_S)
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()


class QueryProbe:
    """A client of tracking-query: GetShipment over and over, round robin over the
    replicas (a load-balanced Service), each call with a 2 s deadline.

    An answer is OK or NOT_FOUND (a shipment not created yet); anything else failed.
    """

    def __init__(self, targets: Sequence[str], shipment_ids: Sequence[str]) -> None:
        self._target = "ipv4:" + ",".join(targets)
        self._shipments = list(shipment_ids)
        self.answered: list[float] = []
        self.failed: defaultdict[str, int] = defaultdict(int)
        self.started = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="query-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    async def _run(self) -> None:
        metadata = bearer(Role.OPS, tenant=TENANT)
        options = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500),
        ]
        async with grpc.aio.insecure_channel(self._target, options=options) as channel:
            stub = tracking_pb2_grpc.TrackingServiceStub(channel)
            n = 0
            while True:
                shipment_id = self._shipments[n % len(self._shipments)]
                n += 1
                try:
                    await stub.GetShipment(
                        tracking_pb2.GetShipmentRequest(shipment_id=shipment_id),
                        metadata=metadata,
                        timeout=2.0,
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        self.answered.append(time.monotonic())
                    else:
                        self.failed[error.code().name] += 1
                else:
                    self.answered.append(time.monotonic())
                await asyncio.sleep(PROBE_INTERVAL_S / 2)


@dataclass
class GapRow:
    scenario: str
    size: str
    acked: int
    lost: int
    duplicated: int
    diverged: int
    faults: int
    restarts: int
    ack_gap_s: float
    ack_gap_client: str
    ack_stall_s: float
    update_gap_s: float
    failed_queries: int | None = None
    query_gap_s: float | None = None
    seconds: float = 0.0
    notes: dict[str, object] = field(default_factory=dict)


ROWS: list[GapRow] = []


def measure(
    report: Report,
    workload: Workload,
    updates: UpdateProbe,
    queries: QueryProbe | None = None,
    *,
    started: float,
    restarts: int,
) -> GapRow:
    """The gaps of one scenario (from `started`, the workload's start, to its last
    acknowledgement), added to ROWS and to the report's notes. `restarts`: process
    restarts by the rig's keeper (a projector that exited)."""
    per_client = client_ack_times(workload)
    every_ack = [t for times in per_client.values() for t in times]
    end = max(every_ack, default=started)
    worst_client, worst_gap = "", 0.0
    for client, times in per_client.items():
        gap = longest_gap(times, start=started)
        if gap > worst_gap:
            worst_client, worst_gap = client, gap
    row = GapRow(
        scenario=report.scenario,
        size=report.size,
        acked=report.acked,
        lost=report.lost,
        duplicated=report.duplicated,
        diverged=report.diverged,
        faults=report.faults,
        restarts=restarts,
        ack_gap_s=worst_gap,
        ack_gap_client=worst_client,
        ack_stall_s=longest_gap(every_ack, start=started),
        update_gap_s=longest_gap(updates.moved, start=started, end=end),
        seconds=report.seconds,
    )
    if queries is not None:
        row.failed_queries = queries.failures
        row.query_gap_s = longest_gap(queries.answered, start=queries.started, end=end)
    report.notes.update(
        {
            "ack gap s": round(row.ack_gap_s, 2),
            "ack gap client": row.ack_gap_client,
            "ack stall s": round(row.ack_stall_s, 2),
            "update gap s": round(row.update_gap_s, 2),
        }
    )
    if queries is not None:
        report.notes.update(
            {
                "failed queries": dict(queries.failed),
                "queries answered": len(queries.answered),
                "query gap s": round(row.query_gap_s or 0.0, 2),
            }
        )
    ROWS.append(row)
    return row


_COLUMNS = (
    "scenario",
    "size",
    "acked",
    "lost",
    "duplicated",
    "diverged",
    "faults",
    "restarts",
    "ack gap s (client)",
    "ack stall s",
    "update gap s",
    "failed queries",
    "query gap s",
    "seconds",
)


def table(rows: Sequence[GapRow]) -> str:
    """A Markdown table, one row per scenario."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    body = [list(_COLUMNS)]
    for r in rows:
        body.append(
            [
                r.scenario,
                r.size,
                str(r.acked),
                str(r.lost),
                str(r.duplicated),
                str(r.diverged),
                str(r.faults),
                str(r.restarts),
                f"{r.ack_gap_s:.1f} ({r.ack_gap_client})",
                seconds(r.ack_stall_s),
                seconds(r.update_gap_s),
                "-" if r.failed_queries is None else str(r.failed_queries),
                seconds(r.query_gap_s),
                f"{r.seconds:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in body) for i in range(len(_COLUMNS))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in body
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
