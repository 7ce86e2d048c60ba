"""What users feel during a fault: the longest gaps in acknowledgements, state updates
and query answers (the cluster scenarios, tests/faults/test_cluster.py; the PostgreSQL
failover, tests/faults/test_failover.py, polls with the same `QueryProbe` and measures
with `longest_gap` too).

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
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg
import grpc

from shared.auth import Role
from shared.config import Settings
from shared.pb import tracking_pb2, tracking_pb2_grpc
from shared.projection import load_offsets
from tests.faults.background import Background
from tests.faults.checker import Report
from tests.faults.workload import TENANT, Workload
from tests.ingest_helpers import bearer

#: How often the update and query probes look.
PROBE_INTERVAL_S = 0.1
#: What tracking-query answers a client: the shipment, or not yet (before its first
#: event is projected). Any other status is a failed query.
QUERY_ANSWERS = frozenset({"OK", "NOT_FOUND"})
#: The gRPC channel options of a client of several replicas: calls spread round robin,
#: and a replica that went away is retried within half a second.
BALANCED = (
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


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


class UpdateProbe(Background):
    """Polls the projection's stored offsets; remembers when the committed state moved."""

    task_name = "update-probe"

    def __init__(self, settings: Settings, topics: Sequence[str], partitions: int = 3) -> None:
        super().__init__()
        self._settings = settings
        self._partitions = [
            (topic, partition) for topic in topics for partition in range(partitions)
        ]
        self.moved: list[float] = []
        self.errors = 0

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


def replicas_target(addresses: Iterable[str]) -> str:
    """One gRPC target naming every replica ("ipv4:host:port,host:port"), for a channel
    that spreads its calls over them (with `BALANCED`), as behind a Service."""
    return "ipv4:" + ",".join(addresses)


class QueryProbe(Background):
    """A client of tracking-query: GetShipment over and over, `interval_s` apart, round
    robin over `shipment_ids`, each call with a `timeout_s` deadline, on one channel to
    `target` (with `channel_options`).

    `codes` counts the outcomes by status; `answered` holds when each answer (one of
    `QUERY_ANSWERS`) came; any other status failed (`failed`, `failures`). The
    defaults are a client of several replicas (`replicas_target`, `BALANCED`).
    """

    task_name = "query-probe"

    def __init__(
        self,
        target: str,
        shipment_ids: Sequence[str],
        *,
        interval_s: float = PROBE_INTERVAL_S / 2,
        timeout_s: float = 2.0,
        channel_options: Sequence[tuple[str, str | int]] = BALANCED,
    ) -> None:
        super().__init__()
        self._target = target
        self._shipments = list(shipment_ids)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._options = list(channel_options)
        self.codes: Counter[str] = Counter()
        self.answered: list[float] = []
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        super().start()

    @property
    def failed(self) -> dict[str, int]:
        """The calls that failed, by status."""
        return {code: n for code, n in self.codes.items() if code not in QUERY_ANSWERS}

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    def longest_gap(self) -> float:
        """The longest time between two consecutive answers (0 with fewer than two)."""
        return longest_gap(self.answered)

    async def _run(self) -> None:
        metadata = bearer(Role.OPS, tenant=TENANT)
        async with grpc.aio.insecure_channel(self._target, options=self._options) as channel:
            stub = tracking_pb2_grpc.TrackingServiceStub(channel)
            for n in itertools.count():
                shipment_id = self._shipments[n % len(self._shipments)]
                try:
                    await stub.GetShipment(
                        tracking_pb2.GetShipmentRequest(shipment_id=shipment_id),
                        metadata=metadata,
                        timeout=self._timeout_s,
                    )
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                self.codes[code] += 1
                if code in QUERY_ANSWERS:
                    self.answered.append(time.monotonic())
                await asyncio.sleep(self._interval_s)


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
