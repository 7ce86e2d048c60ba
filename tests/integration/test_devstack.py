"""The local stack against the real thing: a real Kafka broker, a real PostgreSQL, no mocks.

These prove what the rest of the suite and ``cargotrack dev`` rely on: the broker
honours idempotent produce and consumer-group commits, PostgreSQL round-trips in a
per-test schema, both survive a restart (and a crash) with their data, and expected
failures are one clear line.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devtools.devstack import DevStackError, KafkaBroker, LocalStack, PostgresServer
from devtools.devstack.ports import KAFKA_PORT_ENV, POSTGRES_PORT_ENV

# -- helpers ----------------------------------------------------------------------


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()


async def consume(consumer: AIOKafkaConsumer, count: int, within: float = 30.0) -> list[Any]:
    """Fetch with ``getmany`` until ``count`` records arrived (fails after ``within`` s)."""
    records: list[Any] = []
    async with asyncio.timeout(within):
        while len(records) < count:
            batches = await consumer.getmany(timeout_ms=500)
            for batch in batches.values():
                records.extend(batch)
    return records


async def read_partition(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """Values of the first ``count`` records of partition 0 of ``topic`` (no group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        return [record.value for record in await consume(consumer, count)]
    finally:
        await consumer.stop()


async def produce(bootstrap: str, topic: str, value: bytes, *, key: bytes = b"k") -> None:
    """Produce one record with an idempotent, acks=all producer and wait for the ack."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


@pytest.fixture
def listening_socket() -> Iterator[int]:
    """A port on 127.0.0.1 held by a listening socket for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# -- the session stack ----------------------------------------------------------


async def test_idempotent_producer_and_consumer_group_keep_per_key_order(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic, group = f"{topic_prefix}events", f"{topic_prefix}group"
    await create_topic(kafka_bootstrap, topic, partitions=3)
    keys = [b"vehicle-a", b"vehicle-b", b"vehicle-c", b"vehicle-d"]

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all"
    )
    await producer.start()
    try:
        # All 20 in flight at once: ordering must come from the idempotent producer,
        # not from waiting for each acknowledgement.
        pending = [
            await producer.send(topic, str(i).encode(), key=keys[i % len(keys)]) for i in range(20)
        ]
        sent = await asyncio.gather(*pending)
    finally:
        await producer.stop()
    partition_of_key: dict[bytes, set[int]] = defaultdict(set)
    for i, metadata in enumerate(sent):
        partition_of_key[keys[i % len(keys)]].add(metadata.partition)
    assert all(len(partitions) == 1 for partitions in partition_of_key.values())

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        records = await consume(consumer, 20)
        await consumer.commit()
        assignment = sorted(consumer.assignment())
        committed = {tp: await consumer.committed(tp) for tp in assignment}
        end_offsets = await consumer.end_offsets(assignment)
    finally:
        await consumer.stop()

    assert len(records) == 20
    assert sorted(int(r.value) for r in records) == list(range(20))
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for record in records:
        by_key[record.key].append(int(record.value))
    assert {key: values for key, values in by_key.items()} == {
        key: list(range(k, 20, len(keys))) for k, key in enumerate(keys)
    }
    assert len(assignment) == 3
    assert committed == end_offsets

    # A new member of the same group resumes exactly where the commit left off.
    await produce(kafka_bootstrap, topic, b"20", key=keys[0])
    successor = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await successor.start()
    try:
        successor.assign(assignment)
        for tp in assignment:
            assert await successor.committed(tp) == committed[tp]
            assert await successor.position(tp) == committed[tp]
        [record] = await consume(successor, 1)
    finally:
        await successor.stop()
    assert (record.key, record.value) == (keys[0], b"20")


async def test_postgres_round_trip_in_the_test_schema(
    db_pool: asyncpg.Pool[asyncpg.Record], pg_schema: str
) -> None:
    async with db_pool.acquire() as conn:
        await conn.execute("CREATE TABLE shipment (id text PRIMARY KEY, status text NOT NULL)")
        await conn.execute("INSERT INTO shipment VALUES ($1, $2)", "S-1", "created")
    async with db_pool.acquire() as conn:
        row = await conn.fetchrow("SELECT id, status FROM shipment")
        schema = await conn.fetchval(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'shipment'"
        )
    assert row is not None
    assert (row["id"], row["status"]) == ("S-1", "created")
    assert schema == pg_schema


# -- restarts and crashes (own servers: the session stack is left alone) ------------


async def test_broker_keeps_records_across_stop_and_kill_with_keep_data(
    tmp_path: Path, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}durable"
    broker = KafkaBroker(tmp_path / "kafka")
    try:
        await broker.start()
        bootstrap, cluster_id = broker.bootstrap_servers, broker.cluster_id
        await create_topic(bootstrap, topic, partitions=1)
        await produce(bootstrap, topic, b"before-stop")

        await broker.stop()
        assert not broker.running
        await broker.start(keep_data=True)
        assert (broker.bootstrap_servers, broker.cluster_id) == (bootstrap, cluster_id)
        assert await read_partition(bootstrap, topic, 1) == [b"before-stop"]

        # A crash: acks=all records were in the page cache, so they survive it.
        await produce(bootstrap, topic, b"before-kill")
        await broker.kill()
        assert not broker.running
        await broker.start(keep_data=True)
        assert await read_partition(bootstrap, topic, 2) == [b"before-stop", b"before-kill"]
    finally:
        await broker.stop()
    assert broker.pid is None


async def test_postgres_keeps_committed_rows_across_stop_and_kill(state_dir: Path) -> None:
    server = PostgresServer(state_dir / "postgres", fsync=False)
    try:
        await server.start()
        dsn = server.dsn
        conn = await asyncpg.connect(dsn)
        await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        await conn.close()

        await server.stop()
        await server.start()
        conn = await asyncpg.connect(dsn)
        await conn.execute("INSERT INTO t VALUES (2)")
        await conn.close()

        await server.kill()
        assert not server.running
        await server.start()  # crash recovery
        assert server.dsn == dsn
        conn = await asyncpg.connect(dsn)
        assert [r["x"] for r in await conn.fetch("SELECT x FROM t ORDER BY x")] == [1, 2]
        await conn.close()
    finally:
        await server.stop()


# -- expected failures are one line naming the fix ----------------------------------


async def test_taken_kafka_port_is_a_one_line_error(tmp_path: Path, listening_socket: int) -> None:
    broker = KafkaBroker(tmp_path / "kafka", port=listening_socket)
    with pytest.raises(DevStackError) as caught:
        await broker.start()
    message = str(caught.value)
    assert "\n" not in message
    assert f"port {listening_socket} (Kafka) is already in use" in message
    assert KAFKA_PORT_ENV in message
    assert not broker.running


async def test_taken_postgres_port_is_a_one_line_error(
    state_dir: Path, listening_socket: int
) -> None:
    server = PostgresServer(state_dir / "postgres", port=listening_socket)
    with pytest.raises(DevStackError) as caught:
        await server.start()
    message = str(caught.value)
    assert "\n" not in message
    assert f"port {listening_socket} (PostgreSQL) is already in use" in message
    assert POSTGRES_PORT_ENV in message
    assert not server.running


async def test_missing_java_and_maven_name_the_package_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_java = shutil.which("java")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    with pytest.raises(DevStackError, match="install a Java 17\\+ runtime: apt-get install"):
        await KafkaBroker(tmp_path / "k1").start()

    # Java present, jar cache empty, no Maven.
    if real_java is None:
        pytest.skip("no java on PATH to build the no-Maven case with")
    java_only = tmp_path / "java-only"
    java_only.mkdir()
    (java_only / "java").symlink_to(real_java)
    monkeypatch.setenv("PATH", str(java_only))
    broker = KafkaBroker(tmp_path / "k2", cache_dir=tmp_path / "empty-cache")
    with pytest.raises(DevStackError, match="apt-get install maven") as caught:
        await broker.start()
    assert "\n" not in str(caught.value)
    assert not broker.running


def test_malformed_port_variable_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(DevStackError, match=f"{KAFKA_PORT_ENV} must be a TCP port"):
        LocalStack.for_dev(tmp_path, environ={KAFKA_PORT_ENV: "nine"})


async def test_servers_named_in_the_environment_are_used_not_started(tmp_path: Path) -> None:
    environ = {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka.invalid:9092",
        "DATABASE_URL": "postgresql://app@db.invalid/app",
    }
    external = LocalStack.for_tests(tmp_path, environ)
    async with external:
        assert external.kafka is None
        assert external.postgres is None
        assert external.env() == environ
    assert not (tmp_path / "kafka").exists()
    assert not (tmp_path / "postgres").exists()
