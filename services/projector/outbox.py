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
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer

from shared import metrics
from shared.config import Settings
from shared.envelopes import encode, timestamp
from shared.kafka import produce_many
from shared.pb import alerts_pb2, envelope_pb2
from shared.readmodel import alert_outbox

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        *,
        batch_size: int = 500,
        idle_s: float = 0.1,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.batch_size = batch_size
        self.idle_s = idle_s
        self.published = 0

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
        """Relay until cancelled; Kafka or database errors end the loop (the supervisor
        restarts nothing: the process exits and its orchestrator restarts it)."""
        while True:
            if await self.publish_pending() < self.batch_size:
                await asyncio.sleep(self.idle_s)
