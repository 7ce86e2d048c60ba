"""The local stack: a real Apache Kafka broker and a real PostgreSQL server, no Docker.

Used by ``cargotrack dev`` (fixed ports, durable data: :meth:`LocalStack.for_dev`) and
by the test fixtures (free ports, fresh data: :meth:`LocalStack.for_tests`). Expected
failures raise :class:`DevStackError`, whose message is one line naming the fix.
"""

from shared.devstack.errors import DevStackError
from shared.devstack.kafka import DEFAULT_KAFKA_VERSION, KafkaBroker, ensure_kafka_jars
from shared.devstack.postgres import PostgresServer
from shared.devstack.stack import LocalStack

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "DevStackError",
    "KafkaBroker",
    "LocalStack",
    "PostgresServer",
    "ensure_kafka_jars",
]
