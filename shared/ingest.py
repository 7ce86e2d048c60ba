"""What the three ingest services share: a Kafka link, ordered writes, the server shell.

An ingest service authenticates a request, validates it, writes it to Kafka and
answers only after Kafka acknowledged the write. The pieces here are the parts that
do not depend on which payload is ingested:

- `KafkaLink` owns the service's producer. It connects in the background (creating
  the topics first), so a service started while Kafka is down still serves: health
  reports NOT_SERVING and every write fails with `KafkaUnavailable` (UNAVAILABLE)
  after a bounded wait, never a hang.
- `KafkaLink.write_in_order` writes several records of one key so that none is
  stored unless every record before it is: the GPS stream relies on it.
- `IngestServer` is one running service (a `shared.runtime.ServiceServer`): Kafka
  link, `GrpcApp`, readiness check. It is what `app.run` serves until SIGTERM and
  what the tests start in-process, so the tests exercise the production wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from aiokafka.partitioner import DefaultPartitioner
from google.protobuf.timestamp_pb2 import Timestamp

from shared import metrics, runtime, tracing
from shared.auth import Principal, Role
from shared.config import KafkaSettings, Settings
from shared.domain.validation import Violation
from shared.envelopes import HEADER_TRACEPARENT, EncodedRecord, utc_now
from shared.kafka import (
    MAX_BATCH_BYTES,
    TOO_LARGE_ERRORS,
    KafkaUnavailable,
    RecordTooLarge,
    TopicSpec,
    ensure_topics,
    make_producer,
    produce,
    produce_many,
    record_size,
    topic_record_limits,
    topic_specs,
)
from shared.lifecycle import Lifecycle
from shared.pb import envelope_pb2
from shared.rpc import Context, GrpcApp, Registrar, abort_invalid
from shared.runtime import Backoff, ServiceServer

log = logging.getLogger(__name__)

#: How often readiness asks Kafka for metadata, and how long one probe may take.
READINESS_INTERVAL_S = 2.0
READINESS_PROBE_TIMEOUT_S = 1.5
#: Back-off between attempts to connect to Kafka at start-up (doubling up to the max).
CONNECT_BACKOFF_S = 0.2
CONNECT_BACKOFF_MAX_S = 5.0
#: Errors after which an idempotent producer never writes to the partition again.
#: aiokafka gives a batch that expires while its partition has no leader (a broker
#: restart longer than the Kafka timeout) a sequence number and fails it unsent; every
#: later batch of the partition is then refused as out of order, until the producer
#: is replaced (aio-libs/aiokafka#1017). KafkaLink replaces it. A batch the broker
#: refuses as too large leaves the same gap in the sequence, so it replaces the
#: producer too (the size check before producing makes that rare: see KafkaLink).
BROKEN_PRODUCER_ERRORS = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
    *TOO_LARGE_ERRORS,
)


def deadline_budget(context: Context, limit_s: float) -> float:
    """Seconds a write may wait for Kafka: limit_s, or less so that the client's
    deadline is not reached first.

    With a deadline of d seconds left, the budget leaves 10 % of d (at least 50 ms,
    at most 1 s) for the UNAVAILABLE answer to travel back, so a client sees
    UNAVAILABLE within its deadline instead of DEADLINE_EXCEEDED. Never below 1 ms.
    """
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return limit_s
    margin = min(1.0, max(0.05, remaining * 0.1))
    return max(0.001, min(limit_s, remaining - margin))


def traceparent(context: Context) -> str:
    """The W3C traceparent to write with this call's records: the current span's when
    tracing is on (the call's server span, itself a child of the caller's), else the
    caller's traceparent metadata passed through, or "" when it sent none."""
    current = tracing.current_traceparent()
    if current:
        return current
    for key, value in context.invocation_metadata() or ():
        if key == HEADER_TRACEPARENT:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return ""


def envelope_for(
    principal: Principal,
    *,
    event_id: str,
    occurred_at: Timestamp,
    recorded_at: Timestamp,
    traceparent: str = "",
) -> envelope_pb2.Envelope:
    """An Envelope without payload: tenant and principal from the caller's token, never
    from the payload. The caller sets the payload; shared.envelopes.encode fills
    schema_type from it."""
    return envelope_pb2.Envelope(
        event_id=event_id,
        tenant_id=principal.tenant_id,
        occurred_at=occurred_at,
        recorded_at=recorded_at,
        principal=principal.subject,
        traceparent=traceparent,
    )


class KafkaLink(Lifecycle):
    """The service's connection to Kafka: topics, one idempotent acks=all producer.

    Lifecycle: `start()` returns at once and connects in the background (ensure the
    topics, start the producer), retrying with back-off until it succeeds or `stop()`
    is called. `start()` twice is an error; `stop()` is idempotent and safe before
    `start()`; `async with` does both. `stop()` flushes what the producer holds
    within the Kafka timeout; what it cannot flush was never acknowledged to a
    client, which resends it.

    Every write waits at most its `timeout_s` in total (connecting included) and
    raises `KafkaUnavailable` when Kafka did not acknowledge within it. A write that
    fails with one of BROKEN_PRODUCER_ERRORS replaces the producer: the old one is
    closed in the background (what it still holds was never acknowledged), a new one
    connects, and later writes use it.

    Record size: every (re)connection reads each topic's max.message.bytes from the
    broker (DescribeConfigs) before the producer starts. Every write checks each
    record's encoded size against it BEFORE producing and raises `RecordTooLarge`
    (permanent; nothing of that write is produced), so an oversized record never
    reaches the producer, never takes a sequence number, and never disturbs the
    next write of its partition. Should the broker still refuse a record as too
    large (its topic's limit lowered since the connection), the write raises
    `RecordTooLarge` too and the producer is replaced at once (its sequence has a
    gap), re-reading the limits.
    """

    def __init__(self, kafka: KafkaSettings, topics: Sequence[TopicSpec]) -> None:
        self._kafka = kafka
        self._topics = list(topics)
        self._producer: AIOKafkaProducer | None = None
        self._connected = asyncio.Event()
        self._connect_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False
        self._closing: set[asyncio.Task[None]] = set()
        #: max.message.bytes of each topic, as the broker said at the last connection.
        self._record_limits: dict[str, int] = {}

    @property
    def connected(self) -> bool:
        """True once the producer has started (it reconnects by itself afterwards)."""
        return self._producer is not None

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("KafkaLink.start() called twice")
        self._started = True
        self._connect_task = asyncio.create_task(self._connect(), name="kafka-connect")

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected; False if that did not happen within timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    async def _connect(self) -> None:
        backoff = Backoff(CONNECT_BACKOFF_S, CONNECT_BACKOFF_MAX_S)
        attempt = 0
        while True:
            attempt += 1
            producer: AIOKafkaProducer | None = None
            try:
                async with asyncio.timeout(self._kafka.request_timeout_s):
                    created = await ensure_topics(self._kafka, self._topics)
                    limits = await topic_record_limits(
                        self._kafka, [spec.name for spec in self._topics]
                    )
                    # A batch of several records stays within every topic's limit.
                    producer = make_producer(
                        self._kafka, max_batch_size=min([MAX_BATCH_BYTES, *limits.values()])
                    )
                    await producer.start()
            except (KafkaError, OSError, TimeoutError) as error:
                if producer is not None:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "cannot connect to Kafka at %s (attempt %d), retrying: %r",
                        self._kafka.bootstrap_servers,
                        attempt,
                        error,
                    )
                await backoff.sleep()
                continue
            if created:
                log.info("created topics %s", ", ".join(created))
            log.info(
                "connected to Kafka at %s; record limits (max.message.bytes) %s",
                self._kafka.bootstrap_servers,
                limits,
            )
            self._record_limits = limits
            self._producer = producer
            self._connected.set()
            return

    def raise_if_failed(self) -> None:
        """Re-raise the error that ended the background connection, if one did.

        Transient failures (KafkaError, OSError, timeouts) are retried forever; any
        other error (a configuration the client library refuses, a bug) ends the
        connection attempts, and the service should fail rather than stay
        NOT_SERVING in silence: the readiness task calls this.
        """
        task = self._connect_task
        if task is not None and task.done() and not task.cancelled():
            task.result()

    async def producer(self, timeout_s: float) -> AIOKafkaProducer:
        """The started producer; KafkaUnavailable if not connected within timeout_s."""
        if self._stopped:
            raise KafkaUnavailable("the service is shutting down")
        task = self._connect_task
        if self._producer is None and task is not None and task.done():
            raise KafkaUnavailable("connecting to Kafka failed; see the service log")
        if self._producer is None and not await self.wait_connected(timeout_s):
            raise KafkaUnavailable(f"not connected to Kafka at {self._kafka.bootstrap_servers} yet")
        assert self._producer is not None
        return self._producer

    async def probe(self, timeout_s: float = READINESS_PROBE_TIMEOUT_S) -> bool:
        """True when a metadata request succeeds within timeout_s and lists our topics."""
        producer = self._producer
        if producer is None or self._stopped:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                metadata = await producer.client.fetch_all_metadata()
        except (KafkaError, OSError, TimeoutError):
            return False
        return {spec.name for spec in self._topics} <= set(metadata.topics())

    def record_limit(self, topic: str) -> int | None:
        """The topic's max.message.bytes as read at the last connection (None before)."""
        return self._record_limits.get(topic)

    def oversized(self, topic: str, records: Sequence[EncodedRecord]) -> list[RecordTooLarge]:
        """One RecordTooLarge per record over the topic's limit, in order (empty when
        all fit, or when the limit is not known yet: the write checks again)."""
        limit = self._record_limits.get(topic)
        if limit is None:
            return []
        sizes = ((index, record_size(record)) for index, record in enumerate(records))
        return [RecordTooLarge(topic, index, size, limit) for index, size in sizes if size > limit]

    def _check_sizes(self, topic: str, records: Sequence[EncodedRecord]) -> None:
        too_large = self.oversized(topic, records)
        if too_large:
            raise too_large[0]

    async def write(self, topic: str, record: EncodedRecord, timeout_s: float) -> None:
        """Write one record and wait for its acknowledgement (see shared.kafka.produce).

        RecordTooLarge (nothing produced) when it is over the topic's max.message.bytes.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        producer = await self.producer(timeout_s)
        self._check_sizes(topic, [record])
        try:
            await produce(producer, topic, record, self._left(deadline))
        except (KafkaUnavailable, RecordTooLarge) as error:
            self._replace_if_broken(producer, error.__cause__)
            raise

    async def write_many(self, topic: str, records: list[EncodedRecord], timeout_s: float) -> None:
        """Write records (any keys) and wait until every one is acknowledged.

        Not atomic: on KafkaUnavailable some may be stored; the caller's client
        retries them all and downstream deduplication by event id absorbs the rest.
        RecordTooLarge (nothing produced) when any record is over the topic's limit.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        producer = await self.producer(timeout_s)
        self._check_sizes(topic, records)
        try:
            await produce_many(producer, topic, records, self._left(deadline))
        except (KafkaUnavailable, RecordTooLarge) as error:
            self._replace_if_broken(producer, error.__cause__)
            raise

    async def write_in_order(
        self, topic: str, key: bytes, records: Sequence[EncodedRecord], timeout_s: float
    ) -> None:
        """Write records of one key so that none is stored unless all before it are.

        The records go out as consecutive Kafka record batches on the key's partition
        (chosen as the default partitioner chooses it, so `write` and this method put
        a key on the same partition). Kafka appends a record batch atomically, and the
        next batch is handed to the producer only after the previous one was
        acknowledged, so on KafkaUnavailable the stored records are a prefix of
        `records` (possibly empty), never a later record without an earlier one.
        Usually all of them fit in one batch (the producer's max_batch_size).
        RecordTooLarge (nothing produced) when any record is over the topic's limit.
        """
        if not records:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        producer = await self.producer(timeout_s)
        self._check_sizes(topic, records)
        try:
            with metrics.produce_timer(topic, len(records)):
                await self._write_batches(producer, topic, key, records, deadline)
        except TOO_LARGE_ERRORS as error:
            self._replace_if_broken(producer, error)
            largest = max(range(len(records)), key=lambda index: len(records[index].value))
            raise RecordTooLarge(
                topic, largest, record_size(records[largest]), self.record_limit(topic)
            ) from error
        except (TimeoutError, KafkaError) as error:
            self._replace_if_broken(producer, error)
            raise KafkaUnavailable(
                f"Kafka did not acknowledge within {timeout_s:g}s: {error!r}"
            ) from error

    def _replace_if_broken(self, producer: AIOKafkaProducer, error: BaseException | None) -> None:
        """Replace the producer if the error says it cannot write any more."""
        if not isinstance(error, BROKEN_PRODUCER_ERRORS):
            return
        if self._producer is not producer or self._stopped:
            return  # already replaced (another write saw it first), or shutting down
        log.warning("the Kafka producer is out of sync with the broker (%r); replacing it", error)
        self._producer = None
        self._connected.clear()
        closing = asyncio.create_task(
            _close_producer(producer, self._kafka.request_timeout_s), name="kafka-close-broken"
        )
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        self._connect_task = asyncio.create_task(self._connect(), name="kafka-reconnect")

    @staticmethod
    async def _write_batches(
        producer: AIOKafkaProducer,
        topic: str,
        key: bytes,
        records: Sequence[EncodedRecord],
        deadline: float,
    ) -> None:
        async with asyncio.timeout_at(deadline):
            partitions = sorted(await producer.partitions_for(topic))
            partition = DefaultPartitioner()(key, partitions, partitions)
            pending = list(records)
            while pending:
                builder = producer.create_batch()
                taken = 0
                for record in pending:
                    appended = builder.append(
                        timestamp=None,
                        key=record.key,
                        value=record.value,
                        headers=record.headers,
                    )
                    if appended is None:
                        break  # full; the first record of a batch always fits
                    taken += 1
                future = await producer.send_batch(builder, topic, partition=partition)
                # Shielded: the future is the producer's own batch future, which it
                # still needs if our deadline passes first (cancelling it corrupts
                # the producer's bookkeeping of batches in flight).
                future.add_done_callback(_retrieve)
                await asyncio.shield(future)
                pending = pending[taken:]

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.001, deadline - asyncio.get_running_loop().time())

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._connect_task is not None:
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
        producer, self._producer = self._producer, None
        if producer is not None:
            await _close_producer(producer, self._kafka.request_timeout_s)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _retrieve(future: asyncio.Future[object]) -> None:
    """Mark a batch future's outcome as seen (nobody awaits it after a timeout)."""
    if not future.cancelled():
        future.exception()


async def _close_producer(producer: AIOKafkaProducer, timeout_s: float) -> None:
    """Flush within timeout_s, then close.

    An idempotent aiokafka producer retries a batch until Kafka takes it, so with
    Kafka gone its stop() would wait forever. After the bounded flush we stop its
    sender task instead: whatever is still unsent was never acknowledged to a client.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await producer.flush()
    except (TimeoutError, KafkaError) as error:
        log.warning("Kafka producer not flushed, dropping unacknowledged records: %r", error)
        sender_task = getattr(getattr(producer, "_sender", None), "sender_task", None)
        if sender_task is not None:
            sender_task.cancel()
    try:
        async with asyncio.timeout(timeout_s):
            await producer.stop()
    except (TimeoutError, KafkaError) as error:
        log.warning("Kafka producer did not close cleanly: %r", error)


@dataclass(frozen=True)
class IngestService:
    """What one ingest service adds to the common shell.

    `name` is the full gRPC service name; `register` adds the servicer to a server;
    `roles` maps each full method name to the roles that may call it (a method
    missing from it is refused); `resources` are what the servicer uses besides
    Kafka (delivery-confirmations: its read-model pool), entered before the gRPC
    server starts and exited after it stopped.
    """

    name: str
    register: Registrar
    roles: Mapping[str, Collection[Role]]
    resources: Sequence[contextlib.AbstractAsyncContextManager[object]] = ()


#: Builds a service's servicer around the shared Kafka link.
ServiceBuilder = Callable[[Settings, KafkaLink], IngestService]


class TopicWriter:
    """What an ingest servicer needs to put a client's records on its topic: the
    service's Kafka link, the topic, the most a write may wait for Kafka's
    acknowledgement (less when the client's deadline is nearer), and the clock that
    stamps `recorded_at` (injectable in tests)."""

    def __init__(
        self,
        kafka: KafkaLink,
        topic: str,
        kafka_timeout_s: float,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._kafka = kafka
        self._topic = topic
        self._timeout_s = kafka_timeout_s
        self._clock = clock

    async def _write(
        self, context: Context, records: Sequence[EncodedRecord], fields: Sequence[str]
    ) -> None:
        """Write records in order; returns once Kafka acknowledged every one (raises
        KafkaUnavailable when it did not within the budget).

        `fields` names the request field of each record ("event", "events[3]"). A
        record over the topic's max.message.bytes aborts the call with
        INVALID_ARGUMENT naming its field, before anything of the call is written.
        """
        too_large = self._kafka.oversized(self._topic, records)
        if too_large:
            await abort_invalid(
                context,
                [
                    Violation(
                        fields[error.index],
                        f"encodes to a {error.size}-byte record, over the topic's "
                        f"{error.limit}-byte limit",
                    )
                    for error in too_large
                ],
                "a record is too large for Kafka",
            )
        budget = deadline_budget(context, self._timeout_s)
        if len(records) == 1:
            await self._kafka.write(self._topic, records[0], budget)
        else:
            await self._kafka.write_many(self._topic, list(records), budget)


class IngestServer(ServiceServer):
    """One ingest service, running: Kafka link, gRPC server, readiness (a
    `ServiceServer`).

    `topic` is the one topic the service writes: the Kafka link creates (if need
    be), describes and probes that topic only. `start()` starts the Kafka link (in
    the background), builds the service, starts
    the gRPC server on settings.grpc (port 0 picks a free one: see `port`) with
    health NOT_SERVING, and the readiness check, which probes Kafka every
    READINESS_INTERVAL_S (at once when the link connects) and sets health SERVING
    or NOT_SERVING. A connection failure that is not transient (see
    `KafkaLink.raise_if_failed`) fails the service.

    `stop()` shuts down in order: health NOT_SERVING, readiness, server.stop(grace)
    (in-flight RPCs finish), the service's resources, then the producer is flushed
    and closed. Idempotent and safe after a failed start; `async with` does both.
    """

    def __init__(
        self, settings: Settings, builder: ServiceBuilder, label: str, topic: str | None = None
    ) -> None:
        super().__init__(settings, label, readiness_interval_s=READINESS_INTERVAL_S)
        self._builder = builder
        # Only the topic the service writes (all of them when None): with one Kafka
        # user per service, its ACLs let it see and write that topic and no other.
        specs = [spec for spec in topic_specs(settings.topics) if topic in (None, spec.name)]
        self.kafka = KafkaLink(settings.kafka, specs)

    async def _start(self) -> None:
        await self.enter(self.kafka)
        service = self._builder(self.settings, self.kafka)
        for resource in service.resources:
            await self.enter(resource)
        await self.serve_grpc(
            GrpcApp(
                self.settings.grpc,
                self.settings.auth,
                [(service.name, service.register)],
                service.roles,
            )
        )
        self.check("kafka", self._kafka_ready, pause=self._until_next_probe)
        self.spawn("kafka-link", self._watch_link())

    async def _kafka_ready(self) -> None:
        if not await self.kafka.probe():
            raise ConnectionError("Kafka is unreachable")

    async def _until_next_probe(self, interval_s: float) -> None:
        if self.kafka.connected:
            await asyncio.sleep(interval_s)
        else:  # probe again as soon as the link connects
            await self.kafka.wait_connected(interval_s)

    async def _watch_link(self) -> None:
        """Fail the service when the link's connection attempts ended in an error."""
        while True:
            self.kafka.raise_if_failed()
            await asyncio.sleep(READINESS_INTERVAL_S)


async def serve(
    settings: Settings, builder: ServiceBuilder, label: str, topic: str | None = None
) -> None:
    """Run one ingest service until SIGTERM/SIGINT, then shut down in order
    (`shared.runtime.serve`)."""
    await runtime.serve(IngestServer(settings, builder, label, topic))
