"""What `cargotrack dev` shows while the suite runs: a live terminal view, or summary lines.

Read-only, from outside the services, the way an operator would look:

- **shipments by status**: counted in PostgreSQL (`shipments`, the caller's tenant);
- **ETAs**: the portal's call, `TrackingService.ListShipments` (ops token), for
  shipments in transit or out for delivery;
- **alerts**: dispatch's call, `DispatchService.SubscribeDelays` (dispatcher token),
  subscribed *before* the simulator starts, resumed with the last token after an
  interruption; without a dispatch service the view works without alerts;
- **ingest rate**: GPS points per second the simulator had acknowledged, and GPS
  records per second appended to Kafka;
- **ETA accuracy**: one line from the scores of real arrivals (`eta_scores.recent_line`):
  MAE at 50 % of the trip and 5 minutes out over the last 7 days, and the week before;
- **consumer lag**: Kafka's end offsets of the projection's topics minus the offsets
  the projection stored in PostgreSQL (`projection_offsets`: the offsets that matter,
  written in the same transaction as the state);
- **processes**: each supervised process (devtools/supervisor.py) with its state
  and restart count, and the latest exits the supervisor reported.

A source that cannot be read is shown as unknown (and named), never fatal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import grpc
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from devtools.fleet_simulator.stats import SimulatorStats
from devtools.supervisor import Supervisor, UnitStatus
from shared.auth import Role, mint_token
from shared.config import Settings
from shared.db import connect
from shared.envelopes import to_datetime
from shared.lifecycle import Lifecycle
from shared.pb import (
    alerts_pb2,
    dispatch_pb2,
    dispatch_pb2_grpc,
    shipment_pb2,
    tracking_pb2,
    tracking_pb2_grpc,
)
from shared.readmodel import eta_scores, model_snapshots, shipments
from shared.runtime import Backoff

__all__ = ["AlertFeed", "DevMonitor", "Snapshot", "render", "summary_line"]

log = logging.getLogger(__name__)

#: The projection whose lag is shown (services/projector: `TrackingProjection.name`).
PROJECTION = "tracking"
STATUSES = [
    name.removeprefix("SHIPMENT_STATUS_").lower()
    for name in shipment_pb2.ShipmentStatus.keys()  # noqa: SIM118 - proto enum wrapper
    if name != "SHIPMENT_STATUS_UNSPECIFIED"
]
ALERT_KINDS = [
    name.removeprefix("ALERT_KIND_")
    for name in alerts_pb2.AlertKind.keys()  # noqa: SIM118 - proto enum wrapper
    if name != "ALERT_KIND_UNSPECIFIED"
]
ETA_ROWS = 6
RATE_WINDOW_S = 5.0
SEEN_IDS = 10_000
#: Initial metadata key of SubscribeDelays: the subscription exists (services/dispatch).
SUBSCRIBED_HEADER = "cargotrack-subscription"
#: Seconds before subscribing to dispatch again after the subscription ended: doubling
#: from the first to the most, back to the first once an alert came through.
RESUBSCRIBE_BACKOFF_S = 0.5
RESUBSCRIBE_BACKOFF_MAX_S = 5.0


def _metadata(secret: str, role: Role, tenant: str) -> tuple[tuple[str, str], ...]:
    token = mint_token(secret, role=role, tenant_id=tenant, subject=f"dev-view-{role.value}")
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class AlertSeen:
    """One alert as dispatch delivered it to the view's subscription."""

    received_at: datetime
    kind: str
    severity: str
    shipment_id: str
    vehicle_id: str
    message: str

    def line(self) -> str:
        return (
            f"alert {self.kind} {self.severity} {self.shipment_id} ({self.vehicle_id}):"
            f" {self.message}"
        )


class AlertFeed(Lifecycle):
    """A dispatcher's subscription to SubscribeDelays, from now on, kept alive.

    `subscribed` is set once dispatch confirmed the subscription (its initial
    metadata): every alert written after that reaches the feed. After UNAVAILABLE or
    RESOURCE_EXHAUSTED the feed resubscribes with the last resume token (at least
    once: a repeated alert id is counted once). `start()`/`stop()` (idempotent),
    `async with`.
    """

    def __init__(
        self,
        target: str,
        metadata: tuple[tuple[str, str], ...],
        *,
        keep: int = 8,
        on_alert: Callable[[AlertSeen], None] | None = None,
    ) -> None:
        self.target = target
        self._metadata = metadata
        self.on_alert = on_alert
        self.subscribed = asyncio.Event()
        self.state = "connecting"
        self.total = 0
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.latest: collections.deque[AlertSeen] = collections.deque(maxlen=keep)
        #: Recent alert ids (bounded), to count an alert repeated after a resume once.
        self._seen: set[str] = set()
        self._seen_order: collections.deque[str] = collections.deque()
        self._resume = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("AlertFeed.start() called twice")
        self._task = asyncio.create_task(self._run(), name="dev-view:alerts")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
            backoff = Backoff(RESUBSCRIBE_BACKOFF_S, RESUBSCRIBE_BACKOFF_MAX_S)
            while True:
                call = stub.SubscribeDelays(
                    dispatch_pb2.SubscribeDelaysRequest(resume_token=self._resume),
                    metadata=self._metadata,
                )
                try:
                    # Dispatch sends this initial metadata once the subscription exists
                    # (a failed call ends with empty metadata instead).
                    metadata = await call.initial_metadata()
                    if any(key == SUBSCRIBED_HEADER for key, _ in metadata or ()):
                        self._subscribed()
                    async for response in call:
                        if not self.subscribed.is_set():
                            self._subscribed()
                        self._take(response)
                        backoff.reset()
                    self.state = "ended by dispatch"
                except grpc.aio.AioRpcError as error:
                    self.state = f"{error.code().name.lower()}: resubscribing"
                    log.info("alert subscription ended: %s %s", error.code(), error.details())
                finally:
                    call.cancel()
                await backoff.sleep()

    def _subscribed(self) -> None:
        self.state = "subscribed"
        self.subscribed.set()

    def _take(self, response: dispatch_pb2.SubscribeDelaysResponse) -> None:
        self._resume = response.resume_token
        alert = response.alert
        if alert.alert_id in self._seen:
            return  # at least once: a resumed stream may repeat an alert
        self._seen.add(alert.alert_id)
        self._seen_order.append(alert.alert_id)
        if len(self._seen_order) > SEEN_IDS:
            self._seen.discard(self._seen_order.popleft())
        self.total += 1
        seen = AlertSeen(
            received_at=datetime.now(UTC),
            kind=alerts_pb2.AlertKind.Name(alert.kind).removeprefix("ALERT_KIND_"),
            severity=alerts_pb2.Severity.Name(alert.severity).removeprefix("SEVERITY_").lower(),
            shipment_id=alert.shipment_id,
            vehicle_id=alert.vehicle_id,
            message=alert.message,
        )
        self.by_kind[seen.kind] += 1
        self.latest.appendleft(seen)
        if self.on_alert is not None:
            self.on_alert(seen)


async def wait_subscribed(feed: AlertFeed, timeout_s: float) -> bool:
    """Wait until the feed is subscribed; False after the timeout (the view goes on)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await feed.subscribed.wait()
            return True
    return False


@dataclass(frozen=True)
class EtaRow:
    shipment_id: str
    vehicle_id: str
    status: str
    eta: datetime | None
    window_end: datetime | None
    remaining_m: float | None


@dataclass
class Snapshot:
    """Everything the view shows at one moment. None: unknown (see `problems`)."""

    elapsed_s: float
    tenant: str
    statuses: dict[str, int] | None
    etas: list[EtaRow]
    dispatch: str
    alerts_total: int
    alerts_by_kind: dict[str, int]
    latest_alerts: list[AlertSeen]
    points_per_s: float | None
    records_per_s: float | None
    lag: int | None
    simulator: SimulatorStats | None
    problems: list[str] = field(default_factory=list)
    #: One line on live ETA accuracy on real arrivals ("" unknown; eta_scores.recent_line).
    eta_accuracy: str = ""
    #: Supervised processes (empty without a supervisor) and its latest reports.
    processes: list[UnitStatus] = field(default_factory=list)
    process_events: list[str] = field(default_factory=list)
    #: The speed learner: records of gps-points it has not learned yet, and the
    #: tenant's newest model version (event time, epoch s; 0: none yet).
    learner_lag: int | None = None
    model_version: int | None = None

    @property
    def shipments(self) -> int | None:
        return None if self.statuses is None else sum(self.statuses.values())


class DevMonitor(Lifecycle):
    """Reads the sources of the view (module docstring). `start()`, `stop()` (idempotent),
    `async with`; `snapshot()` never raises for an unreachable source."""

    def __init__(
        self,
        settings: Settings,
        *,
        tenant: str,
        tracking_target: str | None,
        feed: AlertFeed | None,
        simulator: SimulatorStats | None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.tenant = tenant
        self.tracking_target = tracking_target
        self.feed = feed
        self.simulator = simulator
        self.started_at = time.monotonic()
        self._connection: asyncpg.Connection | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._channel: grpc.aio.Channel | None = None
        self._ops = _metadata(settings.auth.verification_key, Role.OPS, tenant)
        self._rates: dict[str, collections.deque[tuple[float, int]]] = {}
        self._partitions: list[TopicPartition] = []
        self._eta_accuracy = ""
        self._started = False

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("DevMonitor.start() called twice")
        self._started = True
        if self.tracking_target:
            self._channel = grpc.aio.insecure_channel(self.tracking_target)

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await consumer.stop()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            with contextlib.suppress(Exception):
                await connection.close(timeout=2)
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    def _rate(self, name: str, value: int | None) -> float | None:
        """Per-second change of a counter over the last RATE_WINDOW_S (uploads come in
        bursts, so a shorter window would flicker between zero and twice the rate)."""
        if value is None:
            return None
        now = time.monotonic()
        samples = self._rates.setdefault(name, collections.deque())
        samples.append((now, value))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        first_at, first = samples[0]
        if now <= first_at:
            return None
        return max(0.0, (value - first) / (now - first_at))

    async def snapshot(self) -> Snapshot:
        problems: list[str] = []
        statuses, stored = await self._database(problems)
        ends = await self._end_offsets(problems)
        lag = None
        if stored is not None and ends is not None:
            lag = sum(max(0, end - (stored.get(tp, -1) + 1)) for tp, end in ends.items())
        gps_records = None
        if ends is not None:
            gps_records = sum(
                end for tp, end in ends.items() if tp.topic == self.settings.topics.gps_points
            )
        learner_lag, model_version = await self._learner(problems, ends)
        feed = self.feed
        return Snapshot(
            elapsed_s=time.monotonic() - self.started_at,
            tenant=self.tenant,
            statuses=statuses,
            etas=await self._etas(problems),
            dispatch=feed.state if feed is not None else "not running",
            alerts_total=feed.total if feed is not None else 0,
            alerts_by_kind=dict(feed.by_kind) if feed is not None else {},
            latest_alerts=list(feed.latest) if feed is not None else [],
            points_per_s=self._rate(
                "points", self.simulator.points_accepted if self.simulator else None
            ),
            records_per_s=self._rate("gps-records", gps_records),
            lag=lag,
            simulator=self.simulator,
            problems=problems,
            eta_accuracy=self._eta_accuracy,
            processes=self.supervisor.statuses() if self.supervisor else [],
            process_events=list(self.supervisor.recent) if self.supervisor else [],
            learner_lag=learner_lag,
            model_version=model_version,
        )

    async def _learner(
        self, problems: list[str], ends: dict[TopicPartition, int] | None
    ) -> tuple[int | None, int | None]:
        """The learner's lag on gps-points and the tenant's newest model version."""
        if self._connection is None or self._connection.is_closed():
            return None, None
        try:
            async with asyncio.timeout(5):
                rows = await self._connection.fetch(
                    "SELECT topic, partition, last_offset FROM projection_offsets"
                    " WHERE projection = 'learner'"
                )
                versions = await model_snapshots.latest_versions(self._connection)
        except (OSError, asyncpg.PostgresError, TimeoutError) as error:
            problems.append(f"learner: {error!r}")
            return None, None
        stored = {TopicPartition(r["topic"], r["partition"]): r["last_offset"] for r in rows}
        lag = None
        if ends is not None:
            gps = self.settings.topics.gps_points
            lag = sum(
                max(0, end - (stored.get(tp, -1) + 1))
                for tp, end in ends.items()
                if tp.topic == gps
            )
        return lag, versions.get(self.tenant, 0)

    async def _database(
        self, problems: list[str]
    ) -> tuple[dict[str, int] | None, dict[TopicPartition, int] | None]:
        try:
            async with asyncio.timeout(5):
                return await self._read_database()
        except (OSError, asyncpg.PostgresError, TimeoutError) as error:
            problems.append(f"postgresql: {error!r}")
            if self._connection is not None:
                self._connection.terminate()
                self._connection = None
            return None, None

    async def _read_database(self) -> tuple[dict[str, int], dict[TopicPartition, int]]:
        """Counts by status, and the projection's stored offsets (one connection, kept)."""
        if self._connection is None or self._connection.is_closed():
            self._connection = await connect(self.settings.database)
        counts = await shipments.status_counts(self._connection, self.tenant)
        offsets = await self._connection.fetch(
            "SELECT topic, partition, last_offset FROM projection_offsets WHERE projection = $1",
            PROJECTION,
        )
        statuses = dict.fromkeys(STATUSES, 0)
        for status, count in counts.items():
            name = shipment_pb2.ShipmentStatus.Name(status)  # type: ignore[arg-type]
            statuses[name.removeprefix("SHIPMENT_STATUS_").lower()] = int(count)
        stored = {TopicPartition(r["topic"], r["partition"]): r["last_offset"] for r in offsets}
        self._eta_accuracy = await eta_scores.recent_line(
            self._connection, self.tenant, datetime.now(UTC)
        )
        return statuses, stored

    async def _end_offsets(self, problems: list[str]) -> dict[TopicPartition, int] | None:
        topics = self.settings.topics
        wanted = [topics.shipment_events, topics.delivery_confirmations, topics.gps_points]
        try:
            async with asyncio.timeout(5):
                if not self._partitions:
                    self._partitions = await _partitions_of(self.settings, wanted)
                if self._consumer is None:
                    consumer = AIOKafkaConsumer(
                        **self.settings.kafka.client_options(), group_id=None
                    )
                    await consumer.start()
                    self._consumer = consumer
                ends = await self._consumer.end_offsets(self._partitions)
        except Exception as error:  # aiokafka raises many kinds; the view goes on
            problems.append(f"kafka: {error!r}")
            return None
        if not self._partitions:
            problems.append(f"kafka: none of the topics {', '.join(wanted)} exists")
            return None
        return {tp: int(end) for tp, end in ends.items()}

    async def _etas(self, problems: list[str]) -> list[EtaRow]:
        if self._channel is None:
            return []
        stub = tracking_pb2_grpc.TrackingServiceStub(self._channel)
        request = tracking_pb2.ListShipmentsRequest(
            statuses=[
                shipment_pb2.SHIPMENT_STATUS_OUT_FOR_DELIVERY,
                shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT,
            ],
            page_size=ETA_ROWS,
        )
        try:
            reply = await stub.ListShipments(request, metadata=self._ops, timeout=2.0)
        except grpc.aio.AioRpcError as error:
            problems.append(f"tracking-query: {error.code().name}")
            return []
        rows = []
        for shipment in reply.shipments:
            has_eta = shipment.HasField("eta") and shipment.eta.HasField("estimated_arrival")
            rows.append(
                EtaRow(
                    shipment_id=shipment.shipment_id,
                    vehicle_id=shipment.vehicle_id,
                    status=shipment_pb2.ShipmentStatus.Name(shipment.status)
                    .removeprefix("SHIPMENT_STATUS_")
                    .lower(),
                    eta=to_datetime(shipment.eta.estimated_arrival) if has_eta else None,
                    window_end=to_datetime(shipment.promised_window.end)
                    if shipment.promised_window.HasField("end")
                    else None,
                    remaining_m=shipment.eta.remaining_m if has_eta else None,
                )
            )
        return rows


async def _partitions_of(settings: Settings, topics: list[str]) -> list[TopicPartition]:
    """Every partition of `topics` (those that exist), from the cluster's metadata."""
    admin = AIOKafkaAdminClient(**settings.kafka.client_options())
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    found = []
    for topic in described:
        if topic.get("error_code"):
            continue  # e.g. UNKNOWN_TOPIC_OR_PARTITION
        for partition in topic.get("partitions", ()):
            index = partition.get("partition", partition.get("partition_index"))
            found.append(TopicPartition(topic["topic"], int(index)))
    return sorted(found)


# -- output ------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _unknown(value: object) -> str:
    return "?" if value is None else str(value)


def summary_line(snapshot: Snapshot) -> str:
    """One line for `--headless`: stable `key=value` fields, easy to grep and parse.

    `shipments` and each status count, `alerts` (received by the dispatch subscriber)
    and one count per alert kind, `points/s` acknowledged to the simulator,
    `gps_records/s` appended to the GPS topic, `lag` of the projection in records
    (`?` when unknown); with supervision, `running=N/M` processes, `restarts` per
    process (`projector:1,dispatch:2`, or `0`) and, while any is not running,
    `down=NAME[,NAME]`.
    """
    statuses = snapshot.statuses
    parts = [f"[dev +{int(snapshot.elapsed_s)}s]", f"shipments={_unknown(snapshot.shipments)}"]
    parts += [f"{name}={_unknown(statuses and statuses[name])}" for name in STATUSES]
    parts.append("|")
    parts.append(f"alerts={snapshot.alerts_total}")
    parts += [f"{kind}={snapshot.alerts_by_kind.get(kind, 0)}" for kind in ALERT_KINDS]
    parts.append(f"dispatch={snapshot.dispatch.replace(' ', '-')}")
    parts.append("|")
    pps, rps = snapshot.points_per_s, snapshot.records_per_s
    parts.append(f"points/s={'?' if pps is None else f'{pps:.1f}'}")
    parts.append(f"gps_records/s={'?' if rps is None else f'{rps:.1f}'}")
    parts.append(f"lag={_unknown(snapshot.lag)}")
    if snapshot.processes:
        running = sum(1 for p in snapshot.processes if p.state == "running")
        restarted = [f"{p.name}:{p.restarts}" for p in snapshot.processes if p.restarts]
        parts.append(f"running={running}/{len(snapshot.processes)}")
        parts.append(f"restarts={','.join(restarted) or 0}")
        down = [p.name for p in snapshot.processes if p.state != "running"]
        if down:
            parts.append(f"down={','.join(down)}")
    parts.append(f"learner_lag={_unknown(snapshot.learner_lag)}")
    parts.append(f"model_version={_unknown(snapshot.model_version)}")
    sim = snapshot.simulator
    if sim is not None:
        parts += [
            f"refused_points={sim.points_refused}",
            f"refused_events={sim.events_refused}",
            f"reconnects={sim.reconnects}",
        ]
        if sim.failure:
            parts.append(f"simulator=failed({sim.failure})")
    return " ".join(parts)


#: Below this many columns the view stacks its tables instead of placing them side by side.
WIDE = 100


def render(snapshot: Snapshot, width: int = WIDE) -> RenderableType:
    """The live view (rich), laid out for a terminal `width` columns wide."""
    shipments = Table(title=f"shipments (tenant {snapshot.tenant})")
    shipments.add_column("status", no_wrap=True)
    shipments.add_column("count", justify="right")
    for name in STATUSES:
        count = snapshot.statuses[name] if snapshot.statuses is not None else None
        shipments.add_row(name.replace("_", " "), _unknown(count))
    shipments.add_row(Text("total", style="bold"), Text(_unknown(snapshot.shipments), "bold"))

    etas = Table(title="ETAs (tracking-query)", expand=True)
    etas.add_column("shipment", no_wrap=True, min_width=12)
    etas.add_column("status")
    etas.add_column("ETA", no_wrap=True)
    etas.add_column("vs window", justify="right", no_wrap=True)
    etas.add_column("left", justify="right", no_wrap=True)
    for row in snapshot.etas:
        versus: Text | str = ""
        if row.eta is not None and row.window_end is not None:
            minutes = (row.eta - row.window_end).total_seconds() / 60
            versus = Text(f"{minutes:+.0f} min", style="red" if minutes > 0 else "green")
        etas.add_row(
            row.shipment_id,
            row.status.replace("_", " "),
            f"{row.eta:%H:%M}" if row.eta else "-",
            versus,
            f"{row.remaining_m / 1000:.1f} km" if row.remaining_m is not None else "-",
        )

    kinds = ", ".join(f"{k} {n}" for k, n in sorted(snapshot.alerts_by_kind.items()))
    alerts = Table(
        title=f"alerts received by dispatch ({snapshot.dispatch}): {snapshot.alerts_total}"
        + (f" — {kinds}" if kinds else ""),
        expand=True,
    )
    columns: tuple[str, ...] = ("time", "kind", "shipment", "vehicle", "message")
    if width < WIDE:
        columns = ("kind", "shipment", "message")
    for column in columns:
        alerts.add_column(
            column, no_wrap=column != "message", ratio=1 if column == "message" else None
        )
    for alert in snapshot.latest_alerts:
        style = {"critical": "red", "warning": "yellow"}.get(alert.severity, "green")
        cells: dict[str, Text | str] = {
            "time": f"{alert.received_at:%H:%M:%S}",
            "kind": Text(alert.kind, style=style),
            "shipment": alert.shipment_id,
            "vehicle": alert.vehicle_id,
            "message": alert.message,
        }
        alerts.add_row(*(cells[column] for column in columns))

    pps = snapshot.points_per_s
    rps = snapshot.records_per_s
    footer = Text()
    footer.append("ingest ")
    footer.append("? " if pps is None else f"{pps:.1f} ", style="bold")
    footer.append("GPS points/s acknowledged · ")
    footer.append("? " if rps is None else f"{rps:.1f} ", style="bold")
    footer.append("records/s on gps-points · consumer lag ")
    footer.append(_unknown(snapshot.lag), style="bold")
    footer.append(" records")
    if snapshot.eta_accuracy:
        footer.append(f"\n{snapshot.eta_accuracy}")
    footer.append("\nlearner: lag ")
    footer.append(_unknown(snapshot.learner_lag), style="bold")
    footer.append(" records · ETA model version ")
    version = snapshot.model_version
    footer.append(
        "?" if version is None
        else "none yet (fleet average)" if version == 0
        else f"{version} (learned up to {datetime.fromtimestamp(version, UTC):%H:%M:%S} UTC)",
        style="bold",
    )  # fmt: skip
    sim = snapshot.simulator
    if sim is not None:
        footer.append(
            f"\nsimulator: {sim.rounds} rounds, {sim.shipments_delivered} delivered,"
            f" {sim.delivery_failures} failed attempts, refused {sim.points_refused} points"
            f" and {sim.events_refused} events, {sim.reconnects} reconnects,"
            f" {sim.batches_resent} batches resent"
        )
        if sim.failure:
            footer.append(f"\nsimulator failed: {sim.failure}", style="red")
    for problem in snapshot.problems:
        footer.append(f"\n{problem}", style="yellow")
    if snapshot.processes:
        footer.append("\nprocesses: ")
        for index, process in enumerate(snapshot.processes):
            footer.append(" · " if index else "")
            footer.append(process.name)
            if process.state != "running":
                footer.append(f" {process.state}", style="red")
            if process.restarts:
                plural = "s" if process.restarts > 1 else ""
                footer.append(f" ({process.restarts} restart{plural})", style="yellow")
    for event in snapshot.process_events:
        footer.append(f"\n{event}", style="red")
    top = Table.grid(expand=True, padding=(0, 1))
    if width < WIDE:
        top.add_column()
        top.add_row(shipments)
        top.add_row(etas)
    else:
        top.add_column()
        top.add_column(ratio=1)
        top.add_row(shipments, etas)
    return Panel(
        Group(top, alerts, footer),
        title=f"cargotrack dev — up {_clock(snapshot.elapsed_s)}",
        subtitle="Ctrl-C stops everything",
    )
