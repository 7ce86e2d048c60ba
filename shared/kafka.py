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
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from shared import metrics
from shared.config import KafkaSettings, TopicSettings
from shared.envelopes import EncodedRecord, Headers

log = logging.getLogger(__name__)

HEADER_DLQ_REASON = "ct-dlq-reason"
HEADER_DLQ_TOPIC = "ct-dlq-topic"
HEADER_DLQ_PARTITION = "ct-dlq-partition"
HEADER_DLQ_OFFSET = "ct-dlq-offset"
HEADER_DLQ_CONSUMER = "ct-dlq-consumer"


class KafkaUnavailable(Exception):
    """Kafka did not acknowledge a write within the configured time."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    retention_hours: int

    def config(self) -> dict[str, str]:
        retention_ms = -1 if self.retention_hours < 0 else self.retention_hours * 3_600_000
        return {"retention.ms": str(retention_ms)}


def topic_specs(topics: TopicSettings) -> list[TopicSpec]:
    """Every topic cargotrack uses, with its partitions and retention.

    Shipment events and delivery confirmations have the same partition count and
    are both keyed by shipment id, so the records of one shipment land on the same
    partition number of each: they are co-partitioned.
    """

    def spec(name: str, hours: int) -> TopicSpec:
        return TopicSpec(name, topics.partitions, topics.replication_factor, hours)

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


def make_producer(kafka: KafkaSettings, **overrides: object) -> AIOKafkaProducer:
    """An idempotent acks=all producer; start() it before use, stop() flushes it."""
    options: dict[str, object] = {
        **kafka.client_options(),
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 2,
        "max_batch_size": 1 << 20,
        "max_request_size": 8 << 20,
        "request_timeout_ms": max(1000, int(kafka.request_timeout_s * 1000)),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


async def produce(
    producer: AIOKafkaProducer, topic: str, record: EncodedRecord, timeout_s: float
) -> None:
    """Write one record and wait for Kafka's acknowledgement.

    Raises KafkaUnavailable when there is no acknowledgement within timeout_s. The
    record may still be written later; callers tell their client to retry, and
    downstream deduplication by event id makes the retry harmless.
    """
    try:
        with metrics.produce_timer(topic, 1):
            async with asyncio.timeout(timeout_s):
                future = await producer.send(
                    topic, record.value, key=record.key, headers=record.headers
                )
                await future
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
