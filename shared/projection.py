"""The exactly-once runner that feeds Kafka records to a projection.

A projection turns records into PostgreSQL rows. The runner guarantees that
each record's effect is applied once, whatever crashes or rebalances happen:

- the rows a poll batch produces and the offsets it consumed are written in ONE
  transaction; offsets live in `projection_offsets`, never in Kafka;
- on partition assignment the consumer seeks to the stored offset + 1 (or the
  beginning of the topic when there is none: a new projection replays history);
  records a poll fetched before that seek completed (the consumer starts at the
  group's offsets in Kafka, which may be another schema's) are never applied:
  the runner seeks again and fetches them anew;
- the offset update is conditional on the offset the runner last saw
  (optimistic fencing): if another instance, or a rebuild, moved it meanwhile,
  the transaction rolls back and the runner re-seeks. A zombie instance can
  therefore never apply a batch twice;
- records that cannot be decoded, or whose payload does not belong on their
  topic, go to the dead-letter topic with the reason, and their offsets are
  committed like any other;
- a batch the database refuses for its data (a NUL in a text, a key over the
  index row limit: SQLSTATE classes 22 and 54) is retried in halves; the prefix
  that applies is committed and the record that cannot be stored alone goes to
  the dead-letter topic, so one bad record never stops its partition;
- partitions are assigned with the range assignor, so partition N of every
  subscribed topic goes to the same member: shipment events and delivery
  confirmations, co-partitioned by shipment id, are folded by one instance;
- pipelining (`pipelined=True`; off by default; the projector switches it on only
  with the internal setting CARGOTRACK_PROJECTOR_PIPELINED, see docs/performance.md
  row 21): while a batch's transaction runs,
  the next batch is polled and decoded; it is applied only after the batch in front
  of it committed, and never
  if a seek or a revocation came after its first poll began (records of a revoked
  partition stay unapplied). When a commit fails, the batch polled ahead is dropped
  and the consumer seeks to the stored offsets once that batch's last poll ended;
- poll sizing (`shared.poll_sizing`): with a latency budget, batches hold what the
  observed pace applies in half the budget while the projector keeps up, and grow
  to `max_records` while it catches up;
- after each PostgreSQL commit the offsets are also committed to Kafka, best
  effort and only for monitoring (consumer-lag exporters, KEDA); they are never
  read back (the consumer may fetch from them until the seek, see above).

Observability: shared.metrics counts batches, records, dead letters and offset
conflicts, times fold and commit, and keeps the consumer lag of each owned
partition (the end offset the consumer last fetched minus the next offset to
apply: no extra request). With tracing on, each batch is applied under one span
linked to the trace context of every record in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError

from shared import metrics, tracing
from shared.config import KafkaSettings
from shared.db import Connection
from shared.envelopes import (
    HEADER_EVENT_ID,
    HEADER_TRACEPARENT,
    EncodedRecord,
    PoisonRecord,
    decode,
)
from shared.kafka import dead_letter_headers, produce
from shared.pb import envelope_pb2
from shared.poll_sizing import PollSizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivered:
    """One decoded record, with where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    envelope: envelope_pb2.Envelope


class Projection(Protocol):
    """What the runner needs from a projection."""

    name: str

    @property
    def topics(self) -> Sequence[str]:
        """The topics it consumes."""

    @property
    def payloads(self) -> Mapping[str, Collection[str]]:
        """Per topic, the envelope payload kinds it carries; the runner dead-letters
        any other kind found there (a topic not listed accepts every kind)."""

    async def apply(self, connection: Connection, records: Sequence[Delivered]) -> None:
        """Apply records (in partition order) inside the runner's open transaction.

        Must be deterministic in the database state and records, and must not
        commit or roll back the transaction itself.
        """

    def committed(self) -> None:
        """The transaction of the last `apply` committed (keep what it cached)."""

    def forget(self) -> None:
        """Drop anything cached: the last `apply` did not commit, or partitions
        changed hands (another instance may have written meanwhile)."""


#: Errors that say the database cannot store this data, whatever is retried:
#: SQLSTATE class 22 (data exception) and 54 (program limit exceeded).
UNSTORABLE = (asyncpg.DataError, asyncpg.ProgramLimitExceededError)


class OffsetConflict(Exception):
    """Someone else moved this projection's offsets: the batch was not applied."""


@dataclass
class RunnerStats:
    batches: int = 0
    records: int = 0
    dead_letters: int = 0
    conflicts: int = 0
    #: Polled batches dropped unapplied, whole or in part: fetched before a seek,
    #: gathered behind a batch that failed to commit (both followed by a seek to the
    #: stored offsets), or holding records of partitions no longer owned.
    dropped: int = 0
    positions: dict[TopicPartition, int] = field(default_factory=dict)


async def load_offsets(
    connection: Connection, projection: str, partitions: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """The last applied offset of each partition that has one (absent: nothing applied)."""
    rows = await connection.fetch(
        "SELECT topic, partition, last_offset FROM projection_offsets"
        " WHERE projection = $1 AND topic = ANY($2::text[])",
        projection,
        sorted({tp.topic for tp in partitions}),
    )
    wanted = set(partitions)
    stored = {TopicPartition(r["topic"], r["partition"]): r["last_offset"] for r in rows}
    return {tp: offset for tp, offset in stored.items() if tp in wanted}


async def save_offsets(
    connection: Connection,
    projection: str,
    advanced: dict[TopicPartition, int],
    expected: dict[TopicPartition, int],
) -> None:
    """Store new offsets, fenced: each row must still hold the offset we expect.

    Raises OffsetConflict (the caller's transaction must roll back) if any row
    moved since we read it, or if an offset would not advance (those records were
    applied already). A missing expectation means "no row yet".
    """
    for tp, offset in advanced.items():
        moved = await connection.fetchval(
            "INSERT INTO projection_offsets (projection, topic, partition, last_offset)"
            " VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (projection, topic, partition) DO UPDATE"
            " SET last_offset = EXCLUDED.last_offset, updated_at = now()"
            " WHERE projection_offsets.last_offset = $5 AND EXCLUDED.last_offset > $5"
            " RETURNING 1",
            projection,
            tp.topic,
            tp.partition,
            offset,
            expected.get(tp, -1),
        )
        if moved is None:
            raise OffsetConflict(f"{projection}: offset of {tp.topic}[{tp.partition}] moved")


#: While a batch commits, the next one is topped up from the consumer this often; the
#: last top-up happens at once when the commit ends (a wait on it, not a sleep).
GATHER_SLICE_S = 0.01
#: Records decoded between two yields to the event loop: while the next batch is decoded,
#: the batch in flight waits for PostgreSQL's replies, which should not wait long.
DECODE_YIELD_EVERY = 256


@dataclass(frozen=True)
class Fetched:
    """One record as the consumer returned it: decoded, or why it is a dead letter."""

    record: ConsumerRecord[Any, Any]
    delivered: Delivered | None
    poison: str = ""


@dataclass
class Polled:
    """What one or more polls returned, decoded, per partition in log order.

    `seeks` is the runner's seek count when the first of those polls began: records
    polled before a seek are never applied (see `ProjectionRunner._apply`).
    `discarded`: the batch in front of it failed to commit, so it is dropped and the
    runner seeks to the stored offsets once its last poll has ended.
    """

    seeks: int
    partitions: dict[TopicPartition, list[Fetched]] = field(default_factory=dict)
    count: int = 0
    discarded: bool = False


class _Gathering:
    """The next batch, polled and decoded while the batch in front of it commits.

    A task tops the batch up from the consumer, never beyond what the poll sizer
    allows, until `finish()` (then one last poll takes what arrived meanwhile) or
    `discard()` (no more polls). `finish()` must not be awaited under the
    runner's batch lock: a poll waits for a rebalance in progress, and the rebalance
    listener waits for that lock.
    """

    def __init__(self, runner: ProjectionRunner) -> None:
        self.polled = Polled(runner.seeks)
        self._done = asyncio.Event()
        self.task = asyncio.create_task(runner._gather(self.polled, self._done))

    def discard(self) -> None:
        """Poll no more; the batch will be dropped (not blocking)."""
        self.polled.discarded = True
        self._done.set()

    async def finish(self) -> Polled:
        """The batch, after one last poll (none if discarded)."""
        self._done.set()
        return await self.task

    async def cancel(self) -> None:
        """Stop at once (the runner is stopping or failing)."""
        self.task.cancel()
        await asyncio.wait([self.task])
        if not self.task.cancelled():
            self.task.exception()  # retrieved: the runner's own failure is what counts


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: ProjectionRunner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Wait for the batch in flight to commit, so the next owner starts after it.
        async with self._runner.batch_lock:
            self._runner.projection.forget()
            # Until the new assignment, the consumer still reports these as assigned:
            # records fetched from them (a batch polled ahead) must not be applied now.
            self._runner.revoked = set(revoked)
            for tp in revoked:
                self._runner.expected.pop(tp, None)
                self._runner.fetched_to.pop(tp, None)
            metrics.forget_partitions([(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # No batch holding records of this assignment can take the lock before this
        # seek: aiokafka calls us before the task that reads the group's committed
        # offsets runs (the fetcher has no position for a new partition until then), the
        # lock hands over in arrival order, and a batch polled meanwhile is stale once
        # `seeks` moves. Partitions revoked and assigned again stay in `revoked` until
        # here, so records polled ahead from them wait for this seek too.
        async with self._runner.batch_lock:
            self._runner.projection.forget()
            self._runner.revoked = set()
            await self._runner.seek_to_stored(assigned)


class ProjectionRunner:
    """Consumes a projection's topics as one consumer group member and applies batches.

    `run()` loops until cancelled; `stop()` is not needed beyond cancelling run():
    the consumer is closed in run()'s finally block and an unfinished batch's
    transaction rolls back, which is safe (it is replayed by whoever resumes).

    Pipelining (`pipelined=True`, off by default): while a batch's transaction runs,
    the next batch is polled from the consumer and decoded (`_Gathering`); it is
    applied only if the batch in front of it committed and no seek or revocation
    happened since its first poll began. Records of partitions revoked and not yet
    reassigned are never applied, pipelined or not.

    Poll sizing: `max_records` is the ceiling of a batch; with `latency_budget_s`,
    a `PollSizer` keeps batches to what is applied in half the budget while the
    projector keeps up, and lets them grow to the ceiling while it catches up.
    """

    def __init__(
        self,
        projection: Projection,
        pool: asyncpg.Pool,
        kafka: KafkaSettings,
        dead_letter_topic: str,
        producer: AIOKafkaProducer,
        *,
        group_id: str | None = None,
        topic_prefix: str = "cargotrack.",
        max_records: int = 5000,
        poll_timeout_ms: int = 200,
        latency_budget_s: float | None = None,
        pipelined: bool = False,
    ) -> None:
        self.projection = projection
        self.pool = pool
        self.kafka = kafka
        self.dead_letter_topic = dead_letter_topic
        self.producer = producer
        # The topic prefix isolates environments (and tests) sharing one Kafka.
        self.group_id = group_id or f"{topic_prefix}{projection.name}"
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.sizer = PollSizer(latency_budget_s, ceiling=max_records)
        #: Poll the next batch while a batch commits (see the class docstring).
        self.pipelined = pipelined
        self.batch_lock = asyncio.Lock()
        #: Last offset applied per owned partition, as this instance believes.
        self.expected: dict[TopicPartition, int] = {}
        #: Per partition, the offset after the last record polled (for poll sizing).
        self.fetched_to: dict[TopicPartition, int] = {}
        #: Partitions revoked and not yet reassigned (between the two listener calls).
        self.revoked: set[TopicPartition] = set()
        self.stats = RunnerStats()
        self.consumer: AIOKafkaConsumer | None = None
        self.assigned = asyncio.Event()
        #: Counts completed seeks (see `seek_to_stored`): records fetched by a poll
        #: that began before the last seek completed are not applied (see `_apply`).
        self.seeks = 0
        #: The next batch, gathered while the one in flight commits.
        self._ahead: _Gathering | None = None

    @property
    def prefetched(self) -> int:
        """Records polled ahead of the batch in flight (0 when none is gathered)."""
        return self._ahead.polled.count if self._ahead is not None else 0

    async def seek_to_stored(self, partitions: Sequence[TopicPartition]) -> None:
        """Point the consumer at stored + 1 for each partition (beginning if none)."""
        assert self.consumer is not None
        if not partitions:
            return
        async with self.pool.acquire() as connection:
            stored = await load_offsets(connection, self.projection.name, partitions)
        unknown = [tp for tp in partitions if tp not in stored]
        for tp in partitions:
            self.fetched_to.pop(tp, None)
            if tp in stored:
                self.expected[tp] = stored[tp]
                self.consumer.seek(tp, stored[tp] + 1)
            else:
                self.expected.pop(tp, None)
        if unknown:
            await self.consumer.seek_to_beginning(*unknown)
        # Whatever a poll under way fetched from the old positions (after an assignment:
        # Kafka's committed offsets, which can be another schema's) is now stale.
        self.seeks += 1
        log.info(
            "%s assigned %d partitions (%d resume after stored offsets, %d from the beginning)",
            self.group_id,
            len(partitions),
            len(partitions) - len(unknown),
            len(unknown),
        )
        self.assigned.set()

    async def run(self) -> None:
        """Consume and apply until cancelled. Raises on database or Kafka failure.

        The consumer is closed whatever happens once it exists, a failed start
        included (aiokafka warns of an unclosed consumer otherwise)."""
        consumer = self.consumer = AIOKafkaConsumer(
            **self.kafka.client_options(),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=4 << 20,
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=self.kafka.consumer_session_timeout_ms,
            heartbeat_interval_ms=max(100, self.kafka.consumer_session_timeout_ms // 4),
        )
        try:
            consumer.subscribe(list(self.projection.topics), listener=_Rebalance(self))
            await consumer.start()
            await self._consume()
        finally:
            try:
                if self._ahead is not None:
                    await self._ahead.cancel()
                    self._ahead = None
                metrics.forget_partitions(
                    [(tp.topic, tp.partition) for tp in consumer.assignment()]
                )
            finally:
                await consumer.stop()

    async def _consume(self) -> None:
        """Apply batch after batch: the one gathered ahead if any, else a fresh poll."""
        while True:
            if self._ahead is None:
                polled = await self._poll()
            else:
                polled = await self._ahead.finish()
                self._ahead = None
            if polled.count or polled.discarded:
                await self._apply(polled)
            self._update_lag()

    async def _poll(self) -> Polled:
        """One poll, waiting up to `poll_timeout_ms` for records, decoded."""
        assert self.consumer is not None
        polled = Polled(self.seeks)
        batches = await self.consumer.getmany(
            timeout_ms=self.poll_timeout_ms, max_records=self.sizer.limit(self._waiting())
        )
        await self._take(polled, batches)
        return polled

    async def _gather(self, polled: Polled, done: asyncio.Event) -> Polled:
        """Top `polled` up with what the consumer has, without waiting for records,
        every GATHER_SLICE_S until `done`, then once more (unless discarded)."""
        assert self.consumer is not None
        while not polled.discarded:
            last = done.is_set()
            # Full, the batch polls no more (the rest goes to the batch after it) unless
            # the sizer lifts the limit: more records came than a budget-sized batch holds.
            room = self.sizer.limit(self._waiting()) - polled.count
            if room > 0:
                batches = await self.consumer.getmany(timeout_ms=0, max_records=room)
                await self._take(polled, batches)
            if last:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GATHER_SLICE_S):
                    await done.wait()
        return polled

    async def _take(
        self, polled: Polled, batches: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]
    ) -> None:
        """Decode polled records into `polled` (dead letters are decided here, sent
        only when the batch is applied)."""
        decoded = 0
        for tp, records in batches.items():
            if not records:
                continue
            into = polled.partitions.setdefault(tp, [])
            for record in records:
                into.append(self._decode(tp, record))
                decoded += 1
                if decoded % DECODE_YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            polled.count += len(records)
            self.fetched_to[tp] = records[-1].offset + 1

    def _decode(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> Fetched:
        try:
            envelope = decode(record.value, list(record.headers or ()))
        except PoisonRecord as error:
            return Fetched(record, None, str(error))
        kind = envelope.WhichOneof("payload")
        allowed = self.projection.payloads.get(tp.topic)
        if allowed is not None and kind not in allowed:
            return Fetched(record, None, f"a {kind} payload does not belong on {tp.topic}")
        return Fetched(
            record, Delivered(tp.topic, tp.partition, record.offset, record.key, envelope)
        )

    def _waiting(self) -> int:
        """Records in the owned partitions' logs beyond those polled already, from the
        end offsets the last fetches reported (no request of their own)."""
        assert self.consumer is not None
        waiting = 0
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is not None:
                start = self.fetched_to.get(tp, self.expected.get(tp, -1) + 1)
                waiting += max(0, end - start)
        return waiting

    def _update_lag(self) -> None:
        """Lag of each owned partition from the end offset the last fetch reported
        (aiokafka's highwater: no request of its own). Partitions not fetched yet are
        left out; one with nothing applied yet counts from offset 0."""
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is None:
                continue
            lag = max(0, end - (self.expected.get(tp, -1) + 1))
            metrics.PROJECTOR_LAG.labels(tp.topic, str(tp.partition)).set(lag)

    async def _apply(self, polled: Polled) -> None:
        """Apply a polled batch in one transaction with its offsets, and start gathering
        the next batch while that transaction runs (`self._ahead`)."""
        async with self.batch_lock:
            assert self.consumer is not None
            owned = set(self.consumer.assignment()) - self.revoked
            if polled.discarded or polled.seeks != self.seeks:
                # Discarded: the batch in front of it failed, so positions must go back
                # to the stored offsets, now that its last poll has ended. Stale: it was
                # fetched (at least partly) before a seek to the stored offsets
                # completed, from positions that were not ours (the group's Kafka
                # offsets), so applying it could put a log's tail before its head and
                # drop the head as applied. Either way: seek, and what was fetched after
                # the seek is fetched anew.
                self.stats.dropped += 1
                await self.seek_to_stored(list(owned))
                return
            # Records of partitions revoked (or being revoked) are not ours to apply; the
            # new assignment seeks those that come back.
            if not owned.issuperset(polled.partitions):
                self.stats.dropped += 1
            # Records at or below the last applied offset were fetched before a seek
            # (a rebalance, a conflict): applying them again would repeat their effect.
            batches = {
                tp: fresh
                for tp, fetched in polled.partitions.items()
                if tp in owned
                and (fresh := [f for f in fetched if f.record.offset > self.expected.get(tp, -1)])
            }
            if not batches:
                return
            delivered = [f.delivered for fs in batches.values() for f in fs if f.delivered]
            poison = [(f.record, f.poison) for fs in batches.values() for f in fs if f.poison]
            advanced = {tp: fetched[-1].record.offset for tp, fetched in batches.items()}
            raw = {tp: [f.record for f in fetched] for tp, fetched in batches.items()}
            with tracing.span(
                f"{self.projection.name} apply",
                kind="consumer",
                links=_traceparents(raw),
                attributes={
                    "messaging.system": "kafka",
                    "messaging.operation.type": "process",
                    "messaging.consumer.group.name": self.group_id,
                    "messaging.batch.message_count": len(delivered) + len(poison),
                },
            ):
                # Dead letters first: if we crash after this, they are sent again on
                # replay (at least once), but the records are never lost.
                for record, reason in poison:
                    await self._dead_letter(record, reason)
                ahead = self._ahead = _Gathering(self) if self.pipelined else None
                try:
                    await self._transact(delivered, advanced)
                except OffsetConflict as conflict:
                    self._conflicted(conflict)
                    await self._after_failure(ahead, owned)
                    return
                except UNSTORABLE as error:
                    await self._isolate_unstorable(
                        delivered,
                        {(r.topic, r.partition, r.offset): r for rs in raw.values() for r in rs},
                        error,
                    )
                    await self._after_failure(ahead, owned)  # the rest is fetched again
                    return
            self.stats.dead_letters += len(poison)
        # Outside the lock: a commit waits for a rebalance in progress, and the
        # rebalance listener waits for this lock.
        await self._commit_for_monitoring(advanced)

    async def _after_failure(
        self, ahead: _Gathering | None, owned: Collection[TopicPartition]
    ) -> None:
        """A batch did not commit: the consumer must go back to the stored offsets. A
        batch gathered behind it follows records that were not applied: it is dropped,
        and the seek waits until its last poll has ended (`_apply` of the discarded
        batch); without one, seek now."""
        if ahead is not None:
            ahead.discard()
        else:
            await self.seek_to_stored(list(owned))

    async def _transact(
        self, records: list[Delivered], advanced: dict[TopicPartition, int], *, apply: bool = True
    ) -> None:
        """Apply records and save the advanced offsets in one transaction, or neither."""
        started = time.perf_counter()
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                if apply:
                    await self.projection.apply(connection, records)
                folded = time.perf_counter()
                await save_offsets(connection, self.projection.name, advanced, self.expected)
        except BaseException:
            self.projection.forget()
            raise
        self.projection.committed()
        committed = time.perf_counter()
        self.expected.update(advanced)
        self.stats.batches += 1
        self.stats.records += len(records)
        self.stats.positions.update(advanced)
        self.sizer.observe(len(records), committed - started)
        _record_batch(records, started, folded, committed)

    def _conflicted(self, conflict: OffsetConflict) -> None:
        self.stats.conflicts += 1
        metrics.PROJECTOR_OFFSET_CONFLICTS.inc()
        log.warning("%s; re-seeking to stored offsets", conflict)

    async def _isolate_unstorable(
        self,
        records: list[Delivered],
        raw: dict[tuple[str, int, int], ConsumerRecord[Any, Any]],
        error: Exception,
    ) -> None:
        """The batch `records` failed for its data: commit the longest prefix half
        that applies, or, when a record fails alone, dead-letter it and move past it.

        The caller re-seeks afterwards, so what follows is fetched and applied in
        ordinary batches; a bad record deep in a batch takes a few halvings, each
        committing progress.
        """
        log.warning(
            "%s: a batch of %d records failed for its data (%s); isolating the record",
            self.group_id,
            len(records),
            error,
        )
        prefix = records
        while len(prefix) > 1:
            prefix = prefix[: len(prefix) // 2]
            try:
                await self._transact(prefix, _last_offsets(prefix))
            except UNSTORABLE as again:
                error = again
                continue
            except OffsetConflict as conflict:
                self._conflicted(conflict)
            return
        [bad] = prefix
        await self._dead_letter(
            raw[(bad.topic, bad.partition, bad.offset)], f"PostgreSQL cannot store it: {error}"
        )
        try:
            await self._transact([], _last_offsets(prefix), apply=False)
        except OffsetConflict as conflict:
            self._conflicted(conflict)
            return
        self.stats.dead_letters += 1

    async def _commit_for_monitoring(self, advanced: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None
        try:
            async with asyncio.timeout(5):
                await self.consumer.commit({tp: offset + 1 for tp, offset in advanced.items()})
        except (KafkaError, TimeoutError) as error:
            # Monitoring only: PostgreSQL holds the offsets that matter.
            log.debug("offset commit to Kafka failed (monitoring only): %r", error)

    async def _dead_letter(self, record: ConsumerRecord[Any, Any], reason: str) -> None:
        headers = dead_letter_headers(
            list(record.headers or ()),
            reason,
            record.topic,
            record.partition,
            record.offset,
            self.group_id,
        )
        await produce(
            self.producer,
            self.dead_letter_topic,
            EncodedRecord(record.key or b"", record.value or b"", headers),
            self.kafka.request_timeout_s,
        )
        metrics.PROJECTOR_DEAD_LETTERS.labels(record.topic).inc()
        with structlog.contextvars.bound_contextvars(event_id=_header(record, HEADER_EVENT_ID)):
            log.warning(
                "dead-lettered %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                reason,
            )


def _last_offsets(records: Sequence[Delivered]) -> dict[TopicPartition, int]:
    """The offset of the last of `records` in each partition (records in log order)."""
    return {TopicPartition(r.topic, r.partition): r.offset for r in records}


def _header(record: ConsumerRecord[Any, Any], name: str) -> str:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value).decode(errors="replace")
    return ""


def _traceparents(batches: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> list[str]:
    """The trace contexts the records of a batch carry (their `traceparent` headers);
    none unless tracing is on."""
    if not tracing.enabled():
        return []
    found = (_header(record, HEADER_TRACEPARENT) for rs in batches.values() for record in rs)
    return [traceparent for traceparent in found if traceparent]


def _record_batch(
    delivered: Sequence[Delivered], started: float, folded: float, committed: float
) -> None:
    """Metrics of one committed batch."""
    metrics.PROJECTOR_BATCHES.inc()
    metrics.PROJECTOR_BATCH_RECORDS.observe(len(delivered))
    metrics.PROJECTOR_FOLD_LATENCY.observe(folded - started)
    metrics.PROJECTOR_COMMIT_LATENCY.observe(committed - folded)
    metrics.PROJECTOR_BATCH_LATENCY.observe(committed - started)
    per_topic: dict[str, int] = {}
    oldest: float | None = None
    for record in delivered:
        per_topic[record.topic] = per_topic.get(record.topic, 0) + 1
        accepted = record.envelope.recorded_at
        if accepted.seconds and (oldest is None or accepted.seconds < oldest):
            oldest = accepted.seconds + accepted.nanos / 1e9
    if oldest is not None:
        # Freshness needs the wall clock (recorded_at is one); the latencies above use
        # the monotonic one.
        metrics.PROJECTOR_FRESHNESS.observe(max(time.time() - oldest, 0.0))
    for topic, count in per_topic.items():
        metrics.PROJECTOR_RECORDS.labels(topic).inc(count)


async def wait_caught_up(
    pool: asyncpg.Pool,
    projection: str,
    end_offsets: dict[TopicPartition, int],
    timeout_s: float = 30.0,
) -> None:
    """Wait until the stored offsets reach end_offsets (Kafka's next offsets); for tests,
    benchmarks and rebuilds. Raises TimeoutError naming each partition behind with its
    stored offset and the last offset it must reach (-1: nothing stored)."""
    targets = {tp: end - 1 for tp, end in end_offsets.items() if end > 0}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with pool.acquire() as connection:
            stored = await load_offsets(connection, projection, list(targets))
        behind = {
            f"{tp.topic}[{tp.partition}]": f"{stored.get(tp, -1)} of {last}"
            for tp, last in targets.items()
            if stored.get(tp, -1) < last
        }
        if not behind:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{projection} not caught up (stored of last): {behind}")
        await asyncio.sleep(0.05)
