"""Kafka plumbing shared by every service: topics, the producer, dead letters.

The producer is always idempotent with acks=all: a record counts as written only
when every in-sync replica has it, and retries inside the producer never
duplicate it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from shared import metrics
from shared.config import KafkaSettings, TopicSettings
from shared.envelopes import EncodedRecord, Headers

log = logging.getLogger(__name__)

HEADER_DLQ_REASON = "ct-dlq-reason"
HEADER_DLQ_TOPIC = "ct-dlq-topic"
HEADER_DLQ_PARTITION = "ct-dlq-partition"
HEADER_DLQ_OFFSET = "ct-dlq-offset"
HEADER_DLQ_CONSUMER = "ct-dlq-consumer"


#: The most bytes a producer puts in one record batch; a single larger record still
#: gets a batch of its own, up to the topic's max.message.bytes.
MAX_BATCH_BYTES = 1 << 20

#: Broker answers meaning "this record (batch) is bigger than the topic accepts":
#: permanent, a retry of the same record can never succeed.
TOO_LARGE_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError)


class KafkaUnavailable(Exception):
    """Kafka did not acknowledge a write within the configured time."""


class RecordTooLarge(Exception):
    """A record is bigger than its topic accepts (max.message.bytes): permanent.

    `index` is the record's position in the write (0 for a single record), `size`
    its encoded size as a batch of its own (an upper bound, see `record_size`),
    `limit` the topic's max.message.bytes, or None when the broker refused the
    record and the limit is not known here.
    """

    def __init__(self, topic: str, index: int, size: int, limit: int | None) -> None:
        self.topic = topic
        self.index = index
        self.size = size
        self.limit = limit
        over = f"the limit of {limit} bytes" if limit is not None else "what the broker accepts"
        super().__init__(
            f"record {index} for {topic} encodes to {size} bytes, over {over} "
            "(the topic's max.message.bytes)"
        )


def record_size(record: EncodedRecord) -> int:
    """The bytes `record` takes on Kafka as a record batch of its own, as the broker
    compares it with max.message.bytes (uncompressed; an upper bound by at most
    21 bytes of varint overhead, so a record this close to the limit is refused
    here rather than by the broker)."""
    return int(
        DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, record.headers)
    )


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    retention_hours: int
    #: With acks=all (every producer here), a write is acknowledged only once this
    #: many replicas have it; below that many in sync, writes are refused.
    min_insync_replicas: int = 1

    def config(self) -> dict[str, str]:
        """The topic configs set at creation: retention and min.insync.replicas."""
        retention_ms = -1 if self.retention_hours < 0 else self.retention_hours * 3_600_000
        return {
            "retention.ms": str(retention_ms),
            "min.insync.replicas": str(self.min_insync_replicas),
        }


def topic_specs(topics: TopicSettings) -> list[TopicSpec]:
    """Every topic cargotrack uses, with its partitions, replication and retention.

    Shipment events and delivery confirmations have the same partition count and
    are both keyed by shipment id, so the records of one shipment land on the same
    partition number of each: they are co-partitioned.
    """

    def spec(name: str, hours: int) -> TopicSpec:
        return TopicSpec(
            name, topics.partitions, topics.replication_factor, hours, topics.min_insync_replicas
        )

    return [
        spec(topics.gps_points, topics.gps_retention_hours),
        spec(topics.shipment_events, topics.events_retention_hours),
        spec(topics.delivery_confirmations, topics.events_retention_hours),
        spec(topics.shipment_alerts, topics.alerts_retention_hours),
        spec(topics.dead_letters, topics.alerts_retention_hours),
    ]


async def ensure_topics(kafka: KafkaSettings, specs: Iterable[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    Idempotent: existing topics are left as they are (their partition count is
    never changed here, since that would move keys between partitions).
    """
    admin = AIOKafkaAdminClient(
        **kafka.client_options(), request_timeout_ms=int(kafka.request_timeout_s * 1000)
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if not missing:
            return []
        new_topics = [
            NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=s.config())
            for s in missing
        ]
        # Another instance may create them first: the outcome we wanted.
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(new_topics)
        # Creation is asynchronous in the controller; wait until metadata shows them.
        for _ in range(100):
            if {s.name for s in missing} <= set(await admin.list_topics()):
                break
            await asyncio.sleep(0.05)
        return [s.name for s in missing]
    finally:
        await admin.close()


async def topic_record_limits(kafka: KafkaSettings, topics: Iterable[str]) -> dict[str, int]:
    """Each topic's max.message.bytes, as the broker reports it (DescribeConfigs).

    Topics the broker does not describe (missing, or an error for that topic) are
    left out; a KafkaError for the whole request propagates.
    """
    admin = AIOKafkaAdminClient(
        **kafka.client_options(), request_timeout_ms=int(kafka.request_timeout_s * 1000)
    )
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, name, {"max.message.bytes": None})
                for name in topics
            ]
        )
    finally:
        await admin.close()
    limits: dict[str, int] = {}
    for response in responses:
        for error_code, _message, _type, name, entries, *_ in response.resources:
            if error_code:
                continue
            for entry in entries:
                if entry[0] == "max.message.bytes":
                    limits[name] = int(entry[1])
    return limits


def make_producer(kafka: KafkaSettings, **overrides: object) -> AIOKafkaProducer:
    """An idempotent acks=all producer; start() it before use, stop() flushes it."""
    options: dict[str, object] = {
        **kafka.client_options(),
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 2,
        "max_batch_size": MAX_BATCH_BYTES,
        "max_request_size": 8 << 20,
        "request_timeout_ms": max(1000, int(kafka.request_timeout_s * 1000)),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


async def produce(
    producer: AIOKafkaProducer, topic: str, record: EncodedRecord, timeout_s: float
) -> None:
    """Write one record and wait for Kafka's acknowledgement.

    Raises RecordTooLarge when the broker refuses the record as too large
    (permanent), KafkaUnavailable when there is no acknowledgement within
    timeout_s. In the latter case the record may still be written later; callers
    tell their client to retry, and downstream deduplication by event id makes the
    retry harmless.
    """
    try:
        with metrics.produce_timer(topic, 1):
            async with asyncio.timeout(timeout_s):
                future = await producer.send(
                    topic, record.value, key=record.key, headers=record.headers
                )
                await future
    except TOO_LARGE_ERRORS as error:
        raise RecordTooLarge(topic, 0, record_size(record), None) from error
    except (TimeoutError, KafkaError) as error:
        raise KafkaUnavailable(
            f"Kafka did not acknowledge within {timeout_s:g}s: {error!r}"
        ) from error


async def produce_many(
    producer: AIOKafkaProducer, topic: str, records: list[EncodedRecord], timeout_s: float
) -> None:
    """Write records and wait until Kafka acknowledged all of them (see produce)."""
    try:
        with metrics.produce_timer(topic, len(records)):
            async with asyncio.timeout(timeout_s):
                futures = [
                    await producer.send(topic, r.value, key=r.key, headers=r.headers)
                    for r in records
                ]
                await asyncio.gather(*futures)
    except TOO_LARGE_ERRORS as error:
        largest = max(range(len(records)), key=lambda index: len(records[index].value))
        raise RecordTooLarge(topic, largest, record_size(records[largest]), None) from error
    except (TimeoutError, KafkaError) as error:
        raise KafkaUnavailable(
            f"Kafka did not acknowledge within {timeout_s:g}s: {error!r}"
        ) from error


def dead_letter_headers(
    original: Headers, reason: str, topic: str, partition: int, offset: int, consumer: str
) -> Headers:
    """The original headers plus where the record came from and why it was refused."""
    return [
        *original,
        (HEADER_DLQ_REASON, reason.encode()[:1000]),
        (HEADER_DLQ_TOPIC, topic.encode()),
        (HEADER_DLQ_PARTITION, str(partition).encode()),
        (HEADER_DLQ_OFFSET, str(offset).encode()),
        (HEADER_DLQ_CONSUMER, consumer.encode()),
    ]
