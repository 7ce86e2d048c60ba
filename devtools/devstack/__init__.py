"""The local stack: a real Apache Kafka broker (or cluster) and a real PostgreSQL, no Docker.

Used by ``cargotrack dev`` (fixed ports, durable data: :meth:`LocalStack.for_dev`) and
by the test fixtures (free ports, fresh data: :meth:`LocalStack.for_tests`). Expected
failures raise :class:`DevStackError`, whose message is one line naming the fix.
"""

from devtools.devstack.errors import DevStackError
from devtools.devstack.kafka import (
    DEFAULT_KAFKA_VERSION,
    KafkaBroker,
    KafkaCluster,
    PartitionState,
    ensure_kafka_jars,
)
from devtools.devstack.postgres import PostgresServer, PostgresStandby, multi_host_dsn
from devtools.devstack.stack import LocalStack

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "DevStackError",
    "KafkaBroker",
    "KafkaCluster",
    "LocalStack",
    "PartitionState",
    "PostgresServer",
    "PostgresStandby",
    "ensure_kafka_jars",
    "multi_host_dsn",
]
