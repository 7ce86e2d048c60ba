"""The alert hub: one shared reader of the alerts topic, fanning out to subscribers.

Reading
    The hub reads the alerts topic with ONE aiokafka consumer per process, without
    a consumer group: every partition is assigned manually and the reader starts at
    the end. No offsets are committed anywhere: a subscriber's position travels in
    its resume token (see `tokens`), so any dispatch instance can resume any stream.
    Each record is decoded once; its alert is offered to the live subscribers of
    its envelope's tenant whose filter matches.

Positions and tokens
    The reader keeps `position`, the next offset of every partition it has fanned
    out. Fan-out of a poll is synchronous (no await between taking a record and
    offering it to every subscriber), so at every await point "all records below
    `position` have been offered to every live subscriber" holds. An alert's token
    is the position vector right after its record (element-wise at least the
    subscriber's own start), so resuming from it re-reads nothing the client had
    and skips nothing it had not.

Where a subscription starts
    * no token: the end offsets at subscribe time ("from now");
    * `from_beginning`: the oldest retained offsets;
    * a token: its offsets.
    A start at or past the reader's position on every partition joins the shared
    reader at once; the reader skips, for this subscriber, records below its start.
    A start behind the reader on some partition needs the records the reader has
    already passed, so the subscription gets its own CATCH-UP reader: a temporary
    consumer seeked to the start that delivers into the same buffer (waiting for
    room: it only slows itself) until its position is at or past the shared
    reader's on every partition. At that moment, with no await between the check
    and the switch, it joins the shared reader with its own position as start and
    closes. Records below that start were delivered by the catch-up, records at or
    above it will be offered by the shared reader: no gap, no repeat. At most
    `max_catchups` catch-up readers run at once; further resumes wait their turn.

Slow subscribers
    The shared reader never waits for a subscriber: it appends to the subscriber's
    bounded buffer, and a full buffer ends that subscription (OVERFLOW); the stream
    then fails with RESOURCE_EXHAUSTED and the client resumes with the token of the
    last alert it received. Other subscribers and the reader are unaffected.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.dispatch import tokens
from services.dispatch.filters import AlertMatcher
from shared.config import KafkaSettings
from shared.envelopes import HEADER_TENANT_ID, PoisonRecord, decode
from shared.kafka import TopicSpec, ensure_topics
from shared.pb import alerts_pb2, envelope_pb2
from shared.runtime import Backoff

log = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE = 1000
DEFAULT_MAX_CATCHUPS = 16
#: Records taken per poll by a reader (the shared one takes at most half a buffer).
READ_BATCH = 500
#: Back-off between attempts to connect to Kafka at start-up (doubling up to the max).
CONNECT_BACKOFF_S = 0.2
CONNECT_BACKOFF_MAX_S = 5.0


class HubUnavailable(Exception):
    """The hub is not connected to Kafka (yet), or is shutting down."""


class EndReason(enum.Enum):
    #: The subscriber's buffer overflowed: it reads too slowly.
    OVERFLOW = "overflow"
    #: The service is shutting down.
    SHUTDOWN = "shutdown"
    #: Its catch-up reader failed (Kafka unavailable).
    FAILED = "failed"


@dataclass(frozen=True)
class Delivery:
    """One alert for one subscriber, and the next offsets right after it."""

    alert: alerts_pb2.Alert
    offsets: tuple[int, ...]

    @property
    def resume_token(self) -> str:
        return tokens.encode(self.offsets)


class Subscription:
    """One subscriber's stream: a bounded buffer of deliveries, in order.

    Iterate it to receive deliveries; iteration stops when the subscription ends
    (`ended` says why; queued deliveries are dropped, the token of the last one
    received is the place to resume). `close()` is idempotent and must be called
    when the consumer of the stream goes away.
    """

    def __init__(self, hub: AlertHub, tenant_id: str, matcher: AlertMatcher, capacity: int) -> None:
        self.hub = hub
        self.tenant_id = tenant_id
        self.matcher = matcher
        self.capacity = capacity
        #: Next offset per partition below which the shared reader skips records.
        self.start: tuple[int, ...] = ()
        self.ended: EndReason | None = None
        self.catch_up: asyncio.Task[None] | None = None
        self._items: collections.deque[Delivery] = collections.deque()
        #: Set when a delivery was added or the subscription ended.
        self._available = asyncio.Event()
        #: Set when a delivery was taken out or the subscription ended.
        self._room = asyncio.Event()

    # -- producer side (the hub) -------------------------------------------------------

    def offer_live(
        self, partition: int, offset: int, alert: alerts_pb2.Alert, position: tuple[int, ...]
    ) -> None:
        """From the shared reader: never waits; a full buffer ends the subscription."""
        if self.ended is not None or offset < self.start[partition]:
            return
        if not self.matcher.matches(alert):
            return
        if len(self._items) >= self.capacity:
            self.end(EndReason.OVERFLOW)
            return
        offsets = tuple(max(a, b) for a, b in zip(self.start, position, strict=True))
        self._items.append(Delivery(alert, offsets))
        self._available.set()

    async def put(self, delivery: Delivery) -> None:
        """From a catch-up reader: waits for room (it only slows its own reader)."""
        while len(self._items) >= self.capacity and self.ended is None:
            self._room.clear()
            await self._room.wait()
        if self.ended is None:
            self._items.append(delivery)
            self._available.set()

    def end(self, reason: EndReason) -> None:
        """End the subscription (first reason wins) and leave the hub."""
        if self.ended is None:
            self.ended = reason
            self._items.clear()
            self._available.set()
            self._room.set()
        self.hub._leave(self)

    # -- consumer side (the stream) ----------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self._deliveries()

    async def _deliveries(self) -> AsyncIterator[Delivery]:
        while self.ended is None:
            if self._items:
                delivery = self._items.popleft()
                self._room.set()
                yield delivery
                continue
            self._available.clear()
            await self._available.wait()

    def close(self) -> None:
        """The stream is gone: leave the hub and stop any catch-up reader. Idempotent."""
        self.end(EndReason.SHUTDOWN)
        if self.catch_up is not None:
            self.catch_up.cancel()


class AlertHub:
    """Reads the alerts topic once per process and fans alerts out to subscribers.

    Lifecycle: `start()` returns at once and connects in the background (creating
    the topic if needed, retrying with back-off); `ready` is true once the reader
    is positioned. `start()` twice is an error. `close_subscriptions()` ends every
    stream with SHUTDOWN (the server calls it before draining); `stop()` also
    stops the reader and every catch-up reader, is idempotent and safe before
    `start()`. `wait()` returns only by raising the reader's error.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: TopicSpec,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        max_catchups: int = DEFAULT_MAX_CATCHUPS,
        poll_timeout_ms: int = 200,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self.kafka = kafka
        self.topic = topic
        self.buffer_size = buffer_size
        self.read_batch = max(1, min(READ_BATCH, buffer_size // 2))
        self.poll_timeout_ms = poll_timeout_ms
        #: Next offset of each partition the shared reader has fanned out.
        self.position: list[int] = []
        self._partitions: list[TopicPartition] = []
        #: Offset lookups and probes (the shared reader has its own connection).
        self._consumer: AIOKafkaConsumer | None = None
        self._live: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._catchups = asyncio.Semaphore(max_catchups)
        self._catchup_tasks: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.records_read = 0

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._closing

    @property
    def subscriber_count(self) -> int:
        return len(self._all)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("AlertHub.start() called twice")
        self._task = asyncio.create_task(self._run(), name="alert-hub")

    async def wait(self) -> None:
        """Wait on the reader task (it only ends by failing or being stopped)."""
        assert self._task is not None, "start() first"
        await asyncio.shield(self._task)

    async def probe(self, timeout_s: float = 2.0) -> None:
        """Raise unless Kafka answers a metadata request listing the alerts topic."""
        consumer = self._consumer
        if consumer is None or not self.ready:
            raise HubUnavailable("not connected to Kafka")
        async with asyncio.timeout(timeout_s):
            topics = await consumer.topics()
        if self.topic.name not in topics:
            raise HubUnavailable(f"topic {self.topic.name} is missing")

    # -- subscribing -------------------------------------------------------------------

    async def subscribe(
        self,
        tenant_id: str,
        matcher: AlertMatcher,
        *,
        resume_from: Sequence[int] | None = None,
        from_beginning: bool = False,
        wait_ready_s: float | None = None,
    ) -> Subscription:
        """A new subscription (see the module docstring for where it starts).

        Raises HubUnavailable when not connected within wait_ready_s (default: the
        Kafka request timeout), and tokens.ResumeTokenError when `resume_from` does
        not fit the topic (another partition count, or offsets past the end: a token
        of another topic).
        """
        if self._closing:
            raise HubUnavailable("shutting down")
        try:
            async with asyncio.timeout(wait_ready_s or self.kafka.request_timeout_s):
                await self._ready.wait()
        except TimeoutError:
            raise HubUnavailable("not connected to Kafka yet") from None
        consumer = self._consumer
        if consumer is None:  # the reader stopped since (the process is going down)
            raise HubUnavailable("not connected to Kafka")
        count = len(self._partitions)
        try:
            async with asyncio.timeout(self.kafka.request_timeout_s):
                if resume_from is not None:
                    if len(resume_from) != count:
                        raise tokens.ResumeTokenError(
                            f"made for {len(resume_from)} partitions, the topic has {count}"
                        )
                    ends = await consumer.end_offsets(self._partitions)
                    for tp in self._partitions:
                        if resume_from[tp.partition] > ends[tp]:
                            raise tokens.ResumeTokenError(
                                f"offset past the end of partition {tp.partition}"
                            )
                    firsts = await consumer.beginning_offsets(self._partitions)
                    # Retention may have removed what the token points at: start at the
                    # oldest retained record (those in between are gone for everyone).
                    start = [max(resume_from[tp.partition], firsts[tp]) for tp in self._partitions]
                elif from_beginning:
                    firsts = await consumer.beginning_offsets(self._partitions)
                    start = [firsts[tp] for tp in self._partitions]
                else:
                    ends = await consumer.end_offsets(self._partitions)
                    start = [ends[tp] for tp in self._partitions]
        except (KafkaError, TimeoutError) as error:
            raise HubUnavailable(f"Kafka did not answer: {error!r}") from error
        if self._closing:
            raise HubUnavailable("shutting down")
        subscription = Subscription(self, tenant_id, matcher, self.buffer_size)
        self._all.add(subscription)
        if all(s >= p for s, p in zip(start, self.position, strict=True)):
            self._join_live(subscription, tuple(start))
        else:
            task = asyncio.create_task(
                self._catch_up(subscription, start), name="alert-hub-catch-up"
            )
            subscription.catch_up = task
            self._catchup_tasks.add(task)
            task.add_done_callback(self._catchup_tasks.discard)
        return subscription

    def _join_live(self, subscription: Subscription, start: tuple[int, ...]) -> None:
        if subscription.ended is not None:
            return
        subscription.start = start
        self._live.setdefault(subscription.tenant_id, set()).add(subscription)

    def _leave(self, subscription: Subscription) -> None:
        self._all.discard(subscription)
        tenant = self._live.get(subscription.tenant_id)
        if tenant is not None:
            tenant.discard(subscription)
            if not tenant:
                del self._live[subscription.tenant_id]

    async def _catch_up(self, subscription: Subscription, start: list[int]) -> None:
        """Read from `start` for one subscriber until the shared reader is reached."""
        try:
            async with self._catchups:
                consumer = self._new_consumer()
                await consumer.start()
                try:
                    consumer.assign(self._partitions)
                    for tp in self._partitions:
                        consumer.seek(tp, start[tp.partition])
                    await self._read_until_live(consumer, subscription, list(start))
                finally:
                    await consumer.stop()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # Kafka trouble: the client resumes elsewhere or later
            log.warning("catch-up reader failed: %r", error)
            subscription.end(EndReason.FAILED)

    async def _read_until_live(
        self, consumer: AIOKafkaConsumer, subscription: Subscription, position: list[int]
    ) -> None:
        while subscription.ended is None:
            if all(c >= p for c, p in zip(position, self.position, strict=True)):
                # No await between this check and joining: the shared reader has
                # offered nothing at or past `position` yet.
                self._join_live(subscription, tuple(position))
                return
            batches = await consumer.getmany(
                timeout_ms=self.poll_timeout_ms, max_records=READ_BATCH
            )
            for tp, records in sorted(batches.items()):
                for record in records:
                    position[tp.partition] = record.offset + 1
                    alert = self._alert_of(record, subscription.tenant_id)
                    if alert is not None and subscription.matcher.matches(alert):
                        await subscription.put(Delivery(alert, tuple(position)))
                        if subscription.ended is not None:
                            return
            for tp in self._partitions:
                # Past retention gaps and records that are not messages (markers).
                position[tp.partition] = max(position[tp.partition], await consumer.position(tp))

    # -- the shared reader -------------------------------------------------------------

    def _new_consumer(self, *topics: str) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            *topics,
            **self.kafka.client_options(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=max(1000, int(self.kafka.request_timeout_s * 1000)),
        )

    async def _connect(self) -> tuple[AIOKafkaConsumer, AIOKafkaConsumer]:
        """The shared reader, positioned at the end, and a client for offset lookups.

        Lookups get their own connection: on the reader's, a ListOffsets request
        would queue behind the broker's long-polled Fetch (up to fetch_max_wait_ms).
        """
        backoff = Backoff(CONNECT_BACKOFF_S, CONNECT_BACKOFF_MAX_S)
        attempt = 0
        while True:
            attempt += 1
            # Subscribed at first only so that start() waits for the topic's metadata;
            # then unsubscribed: it never fetches records.
            lookup = self._new_consumer(self.topic.name)
            reader = self._new_consumer()
            try:
                async with asyncio.timeout(self.kafka.request_timeout_s):
                    await ensure_topics(self.kafka, [self.topic])
                    await lookup.start()
                    partitions = sorted(lookup.partitions_for_topic(self.topic.name) or [])
                    if not partitions:
                        raise KafkaError(f"no partitions known for {self.topic.name}")
                    if partitions != list(range(len(partitions))):
                        raise KafkaError(f"unexpected partition numbers {partitions}")
                    lookup.unsubscribe()
                    self._partitions = [TopicPartition(self.topic.name, p) for p in partitions]
                    await reader.start()
                    reader.assign(self._partitions)
                    await reader.seek_to_end(*self._partitions)
                    self.position = [await reader.position(tp) for tp in self._partitions]
            except (KafkaError, OSError, TimeoutError) as error:
                for consumer in (reader, lookup):
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "cannot read %s (attempt %d), retrying: %r",
                        self.topic.name,
                        attempt,
                        error,
                    )
                await backoff.sleep()
                continue
            return reader, lookup

    async def _run(self) -> None:
        reader, lookup = await self._connect()
        self._consumer = lookup
        try:
            log.info(
                "reading %s (%d partitions) from %s",
                self.topic.name,
                len(self._partitions),
                self.position,
            )
            self._ready.set()
            while True:
                batches = await reader.getmany(
                    timeout_ms=self.poll_timeout_ms, max_records=self.read_batch
                )
                for tp, records in batches.items():
                    self._fan_out(tp.partition, records)
                # Let the streams write before the next poll, which may be served from
                # the prefetched buffer without suspending.
                await asyncio.sleep(0)
        finally:
            self._ready.clear()
            self._consumer = None
            await reader.stop()
            await lookup.stop()

    def _fan_out(self, partition: int, records: list[ConsumerRecord[Any, Any]]) -> None:
        # Synchronous on purpose: see "Positions and tokens" in the module docstring.
        for record in records:
            self.position[partition] = record.offset + 1
            self.records_read += 1
            tenant = _tenant_header(record)
            if tenant is not None and tenant not in self._live:
                continue  # nobody of that tenant listens: skip decoding
            envelope = self._envelope_of(record)
            if envelope is None:
                continue
            listeners = self._live.get(envelope.tenant_id)
            if not listeners:
                continue
            snapshot = tuple(self.position)
            for subscription in list(listeners):
                subscription.offer_live(partition, record.offset, envelope.alert, snapshot)

    @staticmethod
    def _envelope_of(record: ConsumerRecord[Any, Any]) -> envelope_pb2.Envelope | None:
        try:
            envelope = decode(record.value, list(record.headers or ()))
        except PoisonRecord as error:
            where = f"{record.topic}[{record.partition}]@{record.offset}"
            log.warning("skipping %s: %s", where, error)
            return None
        if envelope.WhichOneof("payload") != "alert":
            return None
        return envelope

    def _alert_of(
        self, record: ConsumerRecord[Any, Any], tenant_id: str
    ) -> alerts_pb2.Alert | None:
        tenant = _tenant_header(record)
        if tenant is not None and tenant != tenant_id:
            return None
        envelope = self._envelope_of(record)
        if envelope is None or envelope.tenant_id != tenant_id:
            return None
        alert: alerts_pb2.Alert = envelope.alert
        return alert

    # -- shutdown ----------------------------------------------------------------------

    def close_subscriptions(self) -> None:
        """End every subscription with SHUTDOWN; refuse new ones. Idempotent."""
        self._closing = True
        for subscription in list(self._all):
            subscription.end(EndReason.SHUTDOWN)
            if subscription.catch_up is not None:
                subscription.catch_up.cancel()

    async def stop(self) -> None:
        """End every subscription and stop every reader. Idempotent."""
        self.close_subscriptions()
        catchups = list(self._catchup_tasks)
        for task in catchups:
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in catchups:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _tenant_header(record: ConsumerRecord[Any, Any]) -> str | None:
    for name, value in record.headers or ():
        if name == HEADER_TENANT_ID:
            return bytes(value).decode(errors="replace")
    return None
