"""The producer every service writes with: idempotent, acks=all (docs/guarantees.md).

Checked on the producer object itself (aiokafka keeps no public accessor): no broker
needed. tests/integration/test_ingest_unavailable.py checks that ingest's KafkaLink
writes with this producer."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from shared.config import load_settings
from shared.kafka import make_producer

ACKS_ALL = -1  # how aiokafka stores acks="all"


def assert_idempotent_acks_all(producer: AIOKafkaProducer) -> None:
    """Every in-sync replica acknowledges a write, and retries never duplicate it."""
    assert producer._sender._acks == ACKS_ALL
    assert producer._txn_manager is not None, "idempotence is off"


async def test_make_producer_is_idempotent_with_acks_all() -> None:
    settings = load_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
            "DATABASE_URL": "postgresql://u:p@127.0.0.1:9/db",
            "CARGOTRACK_DEV_MODE": "1",
        }
    )
    producer = make_producer(settings.kafka)
    assert_idempotent_acks_all(producer)
