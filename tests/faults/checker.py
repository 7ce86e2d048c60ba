"""The checker: what the clients were told, what Kafka holds, what PostgreSQL shows.

Given the `Ledger` (every item the clients sent, and which ones a service
acknowledged), it reads the three input topics from the beginning to their end
offsets and the projection's tables, and decides:

- **acked**: items a service acknowledged (events, confirmations, GPS batches
  answered ACCEPTED or PARTIALLY_ACCEPTED);
- **reflected**: acked items whose effect is in PostgreSQL: the event id is applied
  to its shipment, with exactly one timeline entry; a GPS batch's accepted points
  are in the position history (as many rows as the answer's `accepted_points`) and
  its sequence is at or below its device's high-water mark;
- **lost**: acked but not reflected (acked items missing from Kafka count too);
- **duplicated**: effects applied more than once: extra timeline entries of one
  event id, GPS batches whose points are in the history more often than once;
- **unacked-applied**: copies in Kafka that no client saw acknowledged (a call
  that failed or was cut after Kafka took the record; an item never acknowledged
  but stored). Dedupe must absorb them: they are neither lost nor duplicated;
- **diverged**: shipments or vehicles whose stored state is not the pure fold of
  the log. A vehicle's fold follows its partition; a shipment's events and its
  delivery confirmation come from two topics, whose relative order the projector
  does not promise, so the stored state must equal the fold of *some*
  interleaving that keeps each topic's order. The checker also verifies that the
  first copy of every item in the log is what the client sent (for GPS: only the
  valid points) and that each shipment's events are in the log in the order the
  client had them acknowledged.

Every scenario's report is added to REPORTS; tests/faults/conftest.py prints the
table at the end of the session.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared import statecodec
from shared.config import Settings
from shared.db import Connection
from shared.domain import tracking
from shared.domain.tracking import ShipmentState, VehicleState
from shared.envelopes import PoisonRecord, decode
from shared.pb import delivery_pb2, envelope_pb2, gps_pb2, shipment_pb2
from tests.faults.workload import TENANT, Item, Ledger

T = TypeVar("T")


@dataclass
class Report:
    scenario: str
    size: str
    acked: int = 0
    reflected: int = 0
    lost: int = 0
    duplicated: int = 0
    unacked_applied: int = 0
    diverged: int = 0
    unacked_at_end: int = 0
    resent: int = 0
    faults: int = 0
    gps_points: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.diverged == 0
            and self.unacked_at_end == 0
            and not self.problems
        )

    def summary(self) -> str:
        head = table([self])
        details = "\n".join(f"  - {p}" for p in self.problems[:25])
        notes = ", ".join(f"{k}={v}" for k, v in self.notes.items())
        return f"{head}\n  notes: {notes}" + (f"\n  problems:\n{details}" if details else "")


REPORTS: list[Report] = []

_COLUMNS = (
    ("scenario", "scenario"),
    ("size", "size"),
    ("acked", "acked"),
    ("reflected", "reflected"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("unacked_applied", "unacked-applied"),
    ("resent", "resent"),
    ("faults", "faults"),
    ("diverged", "diverged"),
    ("gps_points", "gps-points"),
    ("seconds", "seconds"),
)


def table(reports: Sequence[Report]) -> str:
    """A Markdown table, one row per report."""
    rows = [[title for _, title in _COLUMNS]]
    for report in reports:
        row = []
        for name, _ in _COLUMNS:
            value = getattr(report, name)
            row.append(f"{value:.1f}" if isinstance(value, float) else str(value))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


@dataclass(frozen=True)
class LogRecord:
    topic: str
    partition: int
    offset: int
    envelope: envelope_pb2.Envelope


async def read_log(settings: Settings, topics: Sequence[str]) -> tuple[list[LogRecord], list[str]]:
    """Every record of the topics up to their end offsets, in partition then offset
    order, decoded; and a line per undecodable record."""
    consumer = AIOKafkaConsumer(**settings.kafka.client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = []
        for topic in topics:
            found = consumer.partitions_for_topic(topic)
            if not found:
                await consumer._client.force_metadata_update()
                found = consumer.partitions_for_topic(topic) or set()
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[LogRecord] = []
        poison: list[str] = []
        remaining = {tp for tp, end in ends.items() if end > 0}
        for _ in range(100_000):
            if not remaining:
                break
            batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=5000)
            for tp, batch in batches.items():
                for record in batch:
                    if record.offset >= ends[tp]:
                        continue
                    try:
                        envelope = decode(record.value, [(k, bytes(v)) for k, v in record.headers])
                    except PoisonRecord as error:
                        poison.append(f"{tp.topic}[{tp.partition}]@{record.offset}: {error}")
                        continue
                    records.append(LogRecord(tp.topic, tp.partition, record.offset, envelope))
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        else:
            raise TimeoutError(f"could not read the log to its end: {remaining}")
    finally:
        await consumer.stop()
    records.sort(key=lambda r: (r.topic, r.partition, r.offset))
    return records, poison


def merges(a: Sequence[T], b: Sequence[T]) -> Iterator[list[T]]:
    """Every merge of a and b keeping each one's order, b as late as possible first."""
    if not b:
        yield list(a)
        return
    if not a:
        yield list(b)
        return
    for rest in merges(a[1:], b):
        yield [a[0], *rest]
    for rest in merges(a, b[1:]):
        yield [b[0], *rest]


def fold_shipment(envelopes: Sequence[envelope_pb2.Envelope]) -> ShipmentState | None:
    state: ShipmentState | None = None
    for envelope in envelopes:
        state = tracking.apply(state, envelope)
    return state


def _payload_key(envelope: envelope_pb2.Envelope) -> tuple[str, str]:
    """(kind, aggregate id) of a record."""
    payload = envelope.WhichOneof("payload")
    if payload == "gps_batch":
        return "gps", envelope.gps_batch.vehicle_id
    if payload == "delivery_confirmation":
        return "confirmation", envelope.delivery_confirmation.shipment_id
    return "event", envelope.shipment_event.shipment_id


def _same_as_sent(item: Item, envelope: envelope_pb2.Envelope) -> bool:
    """Is the stored record what the client sent (as ingest should have stored it)?"""
    if isinstance(item.payload, shipment_pb2.ShipmentEvent):
        stored = shipment_pb2.ShipmentEvent()
        stored.CopyFrom(envelope.shipment_event)
        if stored.WhichOneof("event") == "created":
            stored.created.tracking_token = ""  # minted by ingest
        return stored == item.payload
    if isinstance(item.payload, delivery_pb2.DeliveryConfirmation):
        return envelope.delivery_confirmation == item.payload
    assert isinstance(item.payload, gps_pb2.GpsBatch)
    batch = envelope.gps_batch
    sent = item.payload
    valid = [p for p in sent.points if -90 <= p.latitude <= 90]  # NaN fails the comparison
    return (
        batch.vehicle_id == sent.vehicle_id
        and batch.device_id == sent.device_id
        and batch.sequence == sent.sequence
        and list(batch.points) == valid
    )


async def check(
    scenario: str,
    size: str,
    ledger: Ledger,
    settings: Settings,
    connection: Connection,
    *,
    faults: int,
    seconds: float,
) -> Report:
    """Compare ledger, log and PostgreSQL; the report says what was lost or doubled."""
    report = Report(scenario, size, faults=faults, seconds=seconds, resent=ledger.resent)
    problems = report.problems
    problems += [f"client saw a broken contract: {v}" for v in ledger.violations]
    topics = settings.topics
    log, poison = await read_log(
        settings, [topics.shipment_events, topics.delivery_confirmations, topics.gps_points]
    )
    problems += [f"undecodable record in an input topic: {p}" for p in poison]

    # --- the log: copies per event id, first copies, per-aggregate sequences -------------
    copies: Counter[str] = Counter(r.envelope.event_id for r in log)
    first: dict[str, LogRecord] = {}
    for record in log:
        first.setdefault(record.envelope.event_id, record)
    events_of: dict[str, list[envelope_pb2.Envelope]] = defaultdict(list)
    confirmations_of: dict[str, list[envelope_pb2.Envelope]] = defaultdict(list)
    gps_of: dict[str, list[envelope_pb2.Envelope]] = defaultdict(list)
    for record in log:
        envelope = record.envelope
        if envelope.tenant_id != TENANT:
            problems.append(f"record of tenant {envelope.tenant_id!r}: {envelope.event_id}")
        kind, aggregate = _payload_key(envelope)
        if envelope.event_id not in ledger.items:
            problems.append(f"{kind} {envelope.event_id} in the log was never sent")
        {"event": events_of, "confirmation": confirmations_of, "gps": gps_of}[kind][
            aggregate
        ].append(envelope)

    # --- PostgreSQL ------------------------------------------------------------------------
    shipment_rows = await connection.fetch("SELECT state FROM shipments")
    stored_shipments = {
        (s.tenant_id, s.shipment_id): s
        for s in (
            statecodec.decode_as(ShipmentState, json.loads(r["state"])) for r in shipment_rows
        )
    }
    vehicle_rows = await connection.fetch("SELECT state FROM vehicles")
    stored_vehicles = {
        (v.tenant_id, v.vehicle_id): v
        for v in (statecodec.decode_as(VehicleState, json.loads(r["state"])) for r in vehicle_rows)
    }
    history = {
        r["event_id"]: (r["rows"], r["distinct_rows"])
        for r in await connection.fetch(
            "SELECT event_id, count(*) AS rows,"
            " count(DISTINCT (tenant_id, vehicle_id, recorded_at, latitude, longitude)) AS"
            " distinct_rows FROM vehicle_positions GROUP BY event_id"
        )
    }
    report.gps_points = sum(rows for rows, _ in history.values())

    # --- divergence: stored state vs the pure fold of the log ------------------------------
    expected_history: Counter[str] = Counter()
    for vehicle_id, envelopes in gps_of.items():
        state: VehicleState | None = None
        for envelope in envelopes:
            expected_history[envelope.event_id] += len(
                tracking.accepted_history_points(state, envelope)
            )
            state = tracking.apply_gps(state, envelope)
        if stored_vehicles.get((TENANT, vehicle_id)) != state:
            report.diverged += 1
            problems.append(f"vehicle {vehicle_id}: stored state is not the fold of the log")
    for shipment_id in set(events_of) | set(confirmations_of):
        events = _first_copies(events_of.get(shipment_id, []))
        confirmations = _first_copies(confirmations_of.get(shipment_id, []))
        stored = stored_shipments.get((TENANT, shipment_id))
        if not any(fold_shipment(order) == stored for order in merges(events, confirmations)):
            report.diverged += 1
            problems.append(f"shipment {shipment_id}: stored state is no fold of the log")
    for key in set(stored_shipments) - {
        (TENANT, s) for s in set(events_of) | set(confirmations_of)
    }:
        report.diverged += 1
        problems.append(f"shipment {key} is stored but has no record in the log")

    # --- the order the client had its events acknowledged ----------------------------------
    for shipment_id, envelopes in events_of.items():
        in_log = [e.event_id for e in _first_copies(envelopes)]
        acked_order = sorted(
            (
                i
                for i in ledger.items.values()
                if i.kind == "event" and i.aggregate == shipment_id and i.acked
            ),
            key=lambda i: i.ack_order,
        )
        acked_ids = [i.key for i in acked_order]
        if [e for e in in_log if e in set(acked_ids)] != acked_ids:
            problems.append(f"shipment {shipment_id}: log order {in_log} != ack order {acked_ids}")

    # --- per item: acked, reflected, lost, duplicated, unacked-applied -----------------------
    for item in ledger.items.values():
        if not item.expect_stored:
            if item.key in copies:
                problems.append(f"REJECTED batch {item.key} was stored")
            continue
        extra = copies[item.key] - (1 if item.acked else 0)
        report.unacked_applied += max(0, extra)
        if item.key in first and not _same_as_sent(item, first[item.key].envelope):
            report.diverged += 1
            problems.append(f"{item.kind} {item.key}: the stored record is not what was sent")
        if not item.acked:
            report.unacked_at_end += 1
            continue
        report.acked += 1
        if copies[item.key] == 0:
            problems.append(f"{item.kind} {item.key} was acknowledged but is not in Kafka")
        if item.kind == "gps":
            rows, distinct = history.get(item.key, (0, 0))
            vehicle = stored_vehicles.get((TENANT, item.aggregate))
            batch = item.payload
            assert isinstance(batch, gps_pb2.GpsBatch)
            sequence_applied = (
                vehicle is not None and vehicle.sequence_of(batch.device_id) >= batch.sequence
            )
            if rows == 0 or not sequence_applied:
                report.lost += 1
                problems.append(f"GPS batch {batch.vehicle_id}#{batch.sequence} lost")
            elif rows > item.accepted_points or distinct < rows:
                report.duplicated += 1
                problems.append(
                    f"GPS batch {batch.vehicle_id}#{batch.sequence}: {rows} history rows "
                    f"for {item.accepted_points} points"
                )
            elif rows < item.accepted_points:
                report.lost += 1
                problems.append(f"GPS batch {batch.vehicle_id}#{batch.sequence}: points missing")
            else:
                report.reflected += 1
        else:
            shipment = stored_shipments.get((TENANT, item.aggregate))
            entries = (
                0
                if shipment is None
                else sum(1 for entry in shipment.timeline if entry.event_id == item.key)
            )
            if shipment is None or item.key not in shipment.applied_event_ids or entries == 0:
                report.lost += 1
                problems.append(f"{item.kind} {item.key} lost")
            else:
                report.reflected += 1
    # Duplicates of any record, acknowledged or not.
    for stored in stored_shipments.values():
        ids = Counter(entry.event_id for entry in stored.timeline)
        for event_id, count in ids.items():
            if count > 1:
                report.duplicated += count - 1
                problems.append(f"shipment {stored.shipment_id}: {event_id} {count}x in timeline")
    for event_id in set(history) | set(expected_history):
        rows = history.get(event_id, (0, 0))[0]
        sent = ledger.items.get(event_id)
        if sent is not None and sent.acked:
            continue  # judged above
        wanted = expected_history.get(event_id, 0)
        if rows > wanted:
            report.duplicated += 1
        elif rows < wanted:
            report.diverged += 1
        if rows != wanted:
            problems.append(
                f"history of {event_id}: {rows} rows, the fold of the log says {wanted}"
            )
    report.notes = {
        "log records": len(log),
        "client errors": dict(ledger.errors.most_common()),
        "cut in flight": ledger.cut_in_flight,
    }
    REPORTS.append(report)
    return report


def _first_copies(envelopes: Sequence[envelope_pb2.Envelope]) -> list[envelope_pb2.Envelope]:
    seen: set[str] = set()
    kept = []
    for envelope in envelopes:
        if envelope.event_id not in seen:
            seen.add(envelope.event_id)
            kept.append(envelope)
    return kept
