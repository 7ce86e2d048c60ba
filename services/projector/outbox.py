"""Publishes alerts from the outbox table to the alerts topic.

Transactional outbox: the projection decides an alert in the same transaction
as the state that caused it; this relay then publishes it and marks it
published after Kafka acknowledged. A crash between the two publishes the alert
again with the same alert id (at least once); subscribers deduplicate by id.

Order: alerts reach the topic in outbox order (the order they were decided), so
a shipment's LATE is never published after its RECOVERED. Every projector
instance runs a relay, but one batch is published at a time: each batch's
transaction first takes a transaction-scoped advisory lock of the schema's
outbox, and a relay that finds it taken publishes nothing this round. (Claiming
disjoint rows with SKIP LOCKED instead would let a second relay publish a
shipment's later alerts while the first is still sending its earlier ones.)

Kafka outages: a batch Kafka did not acknowledge in time stays unpublished and is sent
again after a backoff, by the same producer (which recovers from a leader change by
itself), so a partition leader's failover does not restart the projector. Only Kafka
refusing for longer than `give_up_after_s` ends the relay (and the process: its
orchestrator restarts it with a new producer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer

from shared import metrics
from shared.config import Settings
from shared.envelopes import encode, timestamp
from shared.kafka import KafkaUnavailable, produce_many
from shared.pb import alerts_pb2, envelope_pb2
from shared.readmodel import alert_outbox
from shared.runtime import Backoff

log = logging.getLogger(__name__)

#: How long the relay goes on retrying while Kafka acknowledges nothing: past a partition
#: leader's failover (seconds), short of hiding an outage from the orchestrator.
GIVE_UP_AFTER_S = 60.0
#: The waits between two attempts while Kafka does not acknowledge.
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0


class OutboxRelay:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        *,
        batch_size: int = 500,
        idle_s: float = 0.1,
        give_up_after_s: float = GIVE_UP_AFTER_S,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.batch_size = batch_size
        self.idle_s = idle_s
        self.give_up_after_s = give_up_after_s
        self.published = 0
        #: Batches Kafka did not acknowledge in time (each sent again later).
        self.retries = 0

    async def publish_pending(self) -> int:
        """Publish one batch of unpublished alerts; return how many (0 also when another
        relay is publishing right now)."""
        async with self.pool.acquire() as connection, connection.transaction():
            if not await alert_outbox.try_lock_relay(connection):
                # The relay holding the lock reports the backlog; max() over pods reads it.
                metrics.OUTBOX_BACKLOG_AGE.set(0)
                return 0
            rows = await alert_outbox.claim_unpublished(connection, self.batch_size)
            if not rows:
                metrics.OUTBOX_BACKLOG_AGE.set(0)
                return 0
            oldest = rows[0].created_at
            metrics.OUTBOX_BACKLOG_AGE.set(max((datetime.now(UTC) - oldest).total_seconds(), 0))
            records = []
            kinds = []
            for row in rows:
                alert = alerts_pb2.Alert.FromString(row.payload)
                kinds.append(alert.kind)
                envelope = envelope_pb2.Envelope(
                    event_id=row.alert_id,
                    tenant_id=row.tenant_id,
                    principal="projector",
                    alert=alert,
                )
                envelope.occurred_at.CopyFrom(alert.detected_at)
                envelope.recorded_at.CopyFrom(timestamp(datetime.now(UTC)))
                records.append(encode(envelope, key=row.shipment_id))
            await produce_many(
                self.producer,
                self.settings.topics.shipment_alerts,
                records,
                self.settings.kafka.request_timeout_s,
            )
            await alert_outbox.mark_published(connection, [row.id for row in rows])
        self.published += len(rows)
        metrics.count_alerts_published(kinds)
        return len(rows)

    async def run(self) -> None:
        """Relay until cancelled. A batch Kafka does not acknowledge is retried (see the
        module doc) until Kafka has refused for `give_up_after_s`; then, or on a
        database error, the error ends the loop (the process exits and its orchestrator
        restarts it)."""
        backoff = Backoff(RETRY_FIRST_S, RETRY_MAX_S)
        failing_since: float | None = None
        while True:
            try:
                published = await self.publish_pending()
            except KafkaUnavailable as error:
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= self.give_up_after_s:
                    raise
                self.retries += 1
                log.warning("alerts not published, retrying: %s", error)
                await backoff.sleep()
                continue
            failing_since = None
            backoff.reset()
            if published < self.batch_size:
                await asyncio.sleep(self.idle_s)
