"""The projection runner's promises (shared/projection.py), each with a projection whose
effects are NOT idempotent, so that a replayed, skipped or misrouted record shows.

`Recorder` inserts one row per record it is given, tagged with the member that applied
it; nothing deduplicates. The tracking projection's folds forgive a replay (they are
idempotent), so tests built on them cannot tell "resume at stored + 1" from "replay
everything", nor a fenced batch rolled back from one applied twice. Here each of
those breaks leaves a row too many, a row missing, or a row from the wrong member.
Real Kafka and PostgreSQL, as in every integration test.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from shared.config import Settings
from shared.db import Connection, create_pool
from shared.envelopes import encode
from shared.kafka import HEADER_DLQ_OFFSET, HEADER_DLQ_PARTITION, HEADER_DLQ_REASON
from shared.pb import envelope_pb2, shipment_pb2
from shared.projection import Delivered, Polled, ProjectionRunner, _Rebalance, wait_caught_up
from tests.projection_helpers import (
    T0,
    end_offsets,
    envelope_for,
    prepare,
    producer_for,
    projector_settings,
)

NAME = "recorder"


@dataclass
class Recorder:
    """Inserts a row per record (no deduplication); counts forget() and committed()."""

    topics: Sequence[str]
    member: str
    name: str = NAME
    forgets: int = 0
    commits: int = 0
    #: apply() call number (1-based) to hold, before it inserts, until `gate` is set.
    hold_call: int | None = None
    calls: int = 0
    #: Per apply() call, the (partition, offset) of each record it was given.
    batches: list[list[tuple[int, int]]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    holding: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def payloads(self) -> Mapping[str, Collection[str]]:
        return {}

    async def apply(self, connection: Connection, records: Sequence[Delivered]) -> None:
        self.calls += 1
        self.batches.append([(r.partition, r.offset) for r in records])
        if self.calls == self.hold_call:
            self.holding.set()
            await self.gate.wait()
        await connection.executemany(
            "INSERT INTO recorded (member, topic, partition, record_offset, key, note)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [
                (
                    self.member,
                    r.topic,
                    r.partition,
                    r.offset,
                    (r.key or b"").decode(),
                    r.envelope.shipment_event.created.reference,
                )
                for r in records
            ],
        )

    def committed(self) -> None:
        self.commits += 1

    def forget(self) -> None:
        self.forgets += 1


def record(key: str, n: int, note: str | None = None) -> envelope_pb2.Envelope:
    """A shipment event whose `reference` the recorder stores (`note`, else its id)."""
    event_id = f"{key}-{n}"
    created = shipment_pb2.ShipmentCreated(reference=note if note is not None else event_id)
    event = shipment_pb2.ShipmentEvent(event_id=event_id, shipment_id=key, created=created)
    return envelope_for("acme", event_id, T0 + timedelta(seconds=n), shipment_event=event)


async def write(
    settings: Settings, topic: str, keyed: Sequence[tuple[str, int, str | None]]
) -> None:
    async with producer_for(settings) as producer:
        for key, n, note in keyed:
            encoded = encode(record(key, n, note), key)
            await producer.send_and_wait(
                topic, encoded.value, key=encoded.key, headers=encoded.headers
            )


@contextlib.asynccontextmanager
async def recording_settings(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> AsyncIterator[Settings]:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    connection = await asyncpg.connect(database_url, server_settings={"search_path": pg_schema})
    try:
        await connection.execute(
            "CREATE TABLE recorded (member text, topic text, partition int,"
            " record_offset bigint, key text, note text)"
        )
    finally:
        await connection.close()
    yield settings


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    projection: Recorder,
    *,
    group: str = "recorder",
    max_records: int = 50,
    fetched: list[int] | None = None,
) -> AsyncIterator[ProjectionRunner]:
    """A runner of `projection`; `fetched` collects the offset of every record the
    consumer handed to the runner, before it drops those applied already."""
    pool = await create_pool(settings.database)
    async with producer_for(settings) as producer:
        runner = ProjectionRunner(
            projection,
            pool,
            settings.kafka,
            settings.topics.dead_letters,
            producer,
            group_id=f"{settings.topics.prefix}{group}",
            max_records=max_records,
            pipelined=True,
        )
        if fetched is not None:
            apply_batches = runner._apply

            async def spy(polled: Polled) -> None:
                fetched.extend(f.record.offset for fs in polled.partitions.values() for f in fs)
                await apply_batches(polled)

            runner._apply = spy  # type: ignore[method-assign]
        task = asyncio.create_task(runner.run())
        try:
            yield runner
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pool.close()


async def caught_up(settings: Settings, topics: Sequence[str], timeout_s: float = 30) -> None:
    pool = await create_pool(settings.database)
    try:
        await wait_caught_up(pool, NAME, await end_offsets(settings, topics), timeout_s=timeout_s)
    finally:
        await pool.close()


async def recorded(settings: Settings) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(
        settings.database.url, server_settings={"search_path": settings.database.schema}
    )
    try:
        return await connection.fetch(
            "SELECT member, topic, partition, record_offset, key, note FROM recorded"
        )
    finally:
        await connection.close()


async def test_a_fenced_batch_rolls_back_and_the_runner_resumes_after_the_stored_offset(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """Another writer moves the offset while a batch is in its transaction: the batch
    rolls back (its rows are gone), the projection forgets its cache, and the runner
    re-seeks to the offset now stored, applying only what comes after it."""
    async with recording_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema) as s:
        topic = s.topics.shipment_events
        await write(s, topic, [("k", n, None) for n in range(10)])  # offsets 0..9, one partition
        recorder = Recorder([topic], "runner", hold_call=2)
        async with running(s, recorder, max_records=3) as runner:
            await asyncio.wait_for(recorder.holding.wait(), 30)
            [tp] = runner.expected  # the partition, offsets 0..2 committed
            assert runner.expected[tp] == 2
            forgets_before, commits_before = recorder.forgets, recorder.commits
            # A rebuild (or a zombie's successor) applied offsets 3..7 meanwhile.
            async with runner.pool.acquire() as connection:
                await connection.execute(
                    "UPDATE projection_offsets SET last_offset = 7"
                    " WHERE projection = $1 AND topic = $2 AND partition = $3",
                    NAME,
                    tp.topic,
                    tp.partition,
                )
                await connection.executemany(
                    "INSERT INTO recorded (member, topic, partition, record_offset, key, note)"
                    " VALUES ('other', $1, $2, $3, 'k', '')",
                    [(tp.topic, tp.partition, n) for n in range(3, 8)],
                )
            recorder.gate.set()
            await caught_up(s, [topic])
            conflicts = runner.stats.conflicts
        rows = await recorded(s)
    by_member = {
        member: sorted(r["record_offset"] for r in rows if r["member"] == member)
        for member in ("runner", "other")
    }
    assert conflicts == 1
    # The held batch (3..5) rolled back; after the re-seek only 8 and 9 were applied.
    assert by_member == {"runner": [0, 1, 2, 8, 9], "other": [3, 4, 5, 6, 7]}
    assert recorder.forgets > forgets_before, "the cache of a rolled-back batch was kept"
    assert recorder.commits > commits_before  # the run went on after the conflict


async def test_one_member_folds_a_shipments_events_and_confirmations(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """Two members of a group: partition N of both topics goes to the same member (the
    range assignor), so every shipment's events and confirmations meet in one fold."""
    async with recording_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema) as s:
        topics = [s.topics.shipment_events, s.topics.delivery_confirmations]
        first, second = Recorder(topics, "m1"), Recorder(topics, "m2")
        async with running(s, first) as r1, running(s, second) as r2:
            # Until the group settled with both members sharing the 6 partitions.
            async with asyncio.timeout(60):
                while not (  # noqa: ASYNC110 - polls the consumers' assignments
                    r1.consumer is not None
                    and r2.consumer is not None
                    and r1.consumer.assignment()
                    and r2.consumer.assignment()
                    and len(r1.consumer.assignment() | r2.consumer.assignment()) == 6
                ):
                    await asyncio.sleep(0.05)
            keys = [f"shp-{n}" for n in range(12)]
            for topic in topics:
                await write(s, topic, [(key, 0, None) for key in keys])
            await caught_up(s, topics)
        rows = await recorded(s)
    members_of = {key: {r["member"] for r in rows if r["key"] == key} for key in keys}
    applied = Counter((r["topic"], r["key"]) for r in rows)
    assert applied == Counter({(topic, key): 1 for topic in topics for key in keys})
    assert {r["member"] for r in rows} == {"m1", "m2"}, "one member did all the work"
    split = {key: members for key, members in members_of.items() if len(members) != 1}
    assert not split, f"events and confirmations folded by different members: {split}"


async def test_a_record_postgres_cannot_store_deep_in_a_batch_is_isolated_alone(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """One unstorable record (a NUL in a text) at offset 13 of a 20-record batch: it
    alone goes to the dead-letter topic; the 19 others are applied once each."""
    async with recording_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema) as s:
        topic = s.topics.shipment_events
        await write(s, topic, [("k", n, "bad \x00" if n == 13 else None) for n in range(20)])
        recorder = Recorder([topic], "runner")
        async with running(s, recorder, max_records=20) as runner:
            await caught_up(s, [topic])
            dead_letters = runner.stats.dead_letters
        rows = await recorded(s)
        consumer = AIOKafkaConsumer(
            s.topics.dead_letters, **s.kafka.client_options(), auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            dead = await asyncio.wait_for(consumer.getone(), 30)
            more = await consumer.getmany(timeout_ms=500)
        finally:
            await consumer.stop()
    assert sorted(r["record_offset"] for r in rows) == [n for n in range(20) if n != 13]
    assert dead_letters == 1
    assert not any(more.values()), "more than the bad record was dead-lettered"
    headers = dict(dead.headers)
    assert headers[HEADER_DLQ_OFFSET] == b"13"
    assert headers[HEADER_DLQ_PARTITION] == str(rows[0]["partition"]).encode()
    assert headers[HEADER_DLQ_REASON].startswith(b"PostgreSQL cannot store it: ")


async def test_a_new_member_resumes_at_stored_plus_one_and_commits_to_kafka_for_monitoring(
    kafka_bootstrap: str,
    database_url: str,
    topic_prefix: str,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A runner in a NEW consumer group (no offsets in Kafka) seeks to the offset
    stored in PostgreSQL + 1, not the beginning, and applies only what follows; after
    each batch it commits the next offsets to Kafka too (for lag exporters and KEDA),
    equal to the log's end.

    Before that seek lands, the consumer may already have fetched from the group's
    reset position (the beginning): such a poll is never applied (see
    `test_records_fetched_before_the_seek_to_stored_offsets_are_not_applied`), so the
    oracle is the seek itself and what was applied, not what was fetched."""
    sought: list[tuple[TopicPartition, int]] = []
    seek = AIOKafkaConsumer.seek

    def recording_seek(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        sought.append((tp, offset))
        seek(consumer, tp, offset)

    monkeypatch.setattr(AIOKafkaConsumer, "seek", recording_seek)
    async with recording_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema) as s:
        topic = s.topics.shipment_events
        await write(s, topic, [("k", n, None) for n in range(5)])
        async with running(s, Recorder([topic], "first"), group="first"):
            await caught_up(s, [topic])
        await write(s, topic, [("k", n, None) for n in range(5, 8)])
        second = Recorder([topic], "second")
        fetched: list[int] = []
        async with running(s, second, group="second", fetched=fetched):
            tp = TopicPartition(topic, (await recorded(s))[0]["partition"])
            await caught_up(s, [topic])
            ends = await end_offsets(s, [topic])
            # Best effort after the PostgreSQL commit: wait for it, do not assume it.
            monitor = AIOKafkaConsumer(
                **s.kafka.client_options(), group_id=f"{s.topics.prefix}second"
            )
            await monitor.start()
            try:
                async with asyncio.timeout(30):
                    while (await monitor.committed(tp)) != ends[tp]:  # noqa: ASYNC110 - polls Kafka
                        await asyncio.sleep(0.1)
            except TimeoutError:
                raise AssertionError(
                    f"Kafka holds {await monitor.committed(tp)} for monitoring, not {ends[tp]}"
                ) from None
            finally:
                await monitor.stop()
        rows = await recorded(s)
    assert ends[tp] == 8
    assert (tp, 5) in sought, f"the new member did not seek to stored + 1: {sought}"
    assert {5, 6, 7} <= set(fetched), "the new member did not fetch what follows the stored offset"
    applied = sorted((r["member"], r["record_offset"]) for r in rows)
    assert applied == [("first", n) for n in range(5)] + [("second", n) for n in range(5, 8)]


async def test_records_fetched_before_the_seek_to_stored_offsets_are_not_applied(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """A projection store new to a consumer group whose Kafka offsets are ahead (another
    schema's runner in the same group committed them for monitoring, as the crash test's
    reference projector does): the consumer starts fetching at Kafka's committed offset
    until the runner's seek to the stored offsets lands. What it fetched meanwhile must
    not be applied: it would put the log's tail before its head (a vehicle's last GPS
    records before its first: live tracking then decides from the tail), and the head,
    then at or below the applied offset, would be dropped as applied already."""
    async with recording_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema) as s:
        topic = s.topics.shipment_events
        await write(s, topic, [("k", n, None) for n in range(10)])
        [(tp, end)] = [(tp, end) for tp, end in (await end_offsets(s, [topic])).items() if end]
        group = f"{s.topics.prefix}recorder"
        other = AIOKafkaConsumer(
            **s.kafka.client_options(), group_id=group, enable_auto_commit=False
        )
        await other.start()
        try:
            other.assign([tp])
            await other.commit({tp: 6})
        finally:
            await other.stop()
        projection = Recorder([topic], "fresh")
        async with running(s, projection, group="recorder") as runner:
            seek = runner.seek_to_stored

            async def slow_seek(partitions: Sequence[TopicPartition]) -> None:
                # A slow database at assignment: the fetch at Kafka's offset lands first.
                await asyncio.sleep(1.0)
                await seek(partitions)

            runner.seek_to_stored = slow_seek  # type: ignore[method-assign]
            await caught_up(s, [topic])
        rows = await recorded(s)
    assert end == 10
    assert [r["record_offset"] for r in rows] == list(range(10))


async def write_to(settings: Settings, topic: str, partitions: Mapping[int, Sequence[int]]) -> None:
    """Records `k{p}-{n}` straight to partition p (the key does not choose it)."""
    async with producer_for(settings) as producer:
        for partition, numbers in partitions.items():
            for n in numbers:
                encoded = encode(record(f"k{partition}", n), f"k{partition}")
                await producer.send_and_wait(
                    topic,
                    encoded.value,
                    key=encoded.key,
                    headers=encoded.headers,
                    partition=partition,
                )


async def until(condition: Any, what: str, timeout_s: float = 30) -> None:
    """Wait for `condition()` to hold (a state the test reaches, not a duration)."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():  # noqa: ASYNC110 - polls the runner's state
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never reached: {what}") from None


async def test_records_polled_ahead_from_a_revoked_partition_are_never_applied(
    kafka_bootstrap: str,
    database_url: str,
    topic_prefix: str,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While its batch on partition 0 is in its transaction, the first member polls the
    next batch ahead: every record of partitions 1 and 2 (no offsets stored yet, so the
    fencing would let an apply through). A second member joins; the revocation waits
    for the batch in flight to commit. Between the revocation and the new assignment the
    consumer still reports the old partitions as assigned: the batch polled ahead must
    not be applied then, and the records of the partitions the second member takes are
    applied by it, once each."""
    revoking = asyncio.Event()
    firsts: list[ProjectionRunner] = []
    revoke = _Rebalance.on_partitions_revoked

    async def noting_revoke(listener: _Rebalance, revoked: list[TopicPartition]) -> None:
        if revoked and firsts and listener._runner is firsts[0]:
            revoking.set()
        await revoke(listener, revoked)

    monkeypatch.setattr(_Rebalance, "on_partitions_revoked", noting_revoke)
    async with recording_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema) as s:
        topic = s.topics.shipment_events
        await write_to(s, topic, {0: range(3)})
        first = Recorder([topic], "first", hold_call=1)
        # A ceiling of 10: the batch polled ahead fills with the 10 records below and
        # stops polling, so nothing else (a poll waiting out the rebalance) stales it.
        async with running(s, first, group="shared", max_records=10) as runner:
            firsts.append(runner)
            await asyncio.wait_for(first.holding.wait(), 30)
            await write_to(s, topic, {1: range(5), 2: range(5)})
            await until(lambda: runner.prefetched == 10, "the next batch polled ahead")
            assert runner._ahead is not None
            ahead = {
                (tp.partition, f.record.offset)
                for tp, fetched in runner._ahead.polled.partitions.items()
                for f in fetched
            }
            second = Recorder([topic], "second")
            async with running(s, second, group="shared", max_records=10) as other:
                await asyncio.wait_for(revoking.wait(), 60)
                first.gate.set()
                await until(
                    lambda: (
                        other.consumer is not None
                        and runner.consumer is not None
                        and other.consumer.assignment()
                        and len(runner.consumer.assignment() | other.consumer.assignment()) == 3
                    ),
                    "the group settled with both members",
                    timeout_s=60,
                )
                await caught_up(s, [topic])
                assert other.consumer is not None
                taken = {tp.partition for tp in other.consumer.assignment()}
            dropped = runner.stats.dropped
        rows = await recorded(s)
    held = set(first.batches[0])
    assert held == {(0, n) for n in range(3)}
    assert ahead == {(p, n) for p in (1, 2) for n in range(5)}
    assert taken & {1, 2}, f"the second member took none of the partitions polled ahead: {taken}"
    applied = Counter((r["partition"], r["record_offset"]) for r in rows)
    assert applied == Counter(held | ahead), "a record lost or applied twice"
    by = {(r["partition"], r["record_offset"]): r["member"] for r in rows}
    misapplied = sorted(at for at in ahead if at[0] in taken and by[at] != "second")
    assert not misapplied, f"revoked partitions' records applied by the first member: {misapplied}"
    assert dropped >= 1, "the batch polled ahead was never dropped"


async def test_a_batch_failing_with_the_next_one_polled_ahead_loses_and_repeats_nothing(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """Batch 4..7 fails for its data (a NUL at offset 5) while 8 and 9 were polled ahead.
    The batch polled ahead follows records that were not applied: it is dropped and the
    consumer seeks to the stored offsets. Applying it instead would store offset 9 and
    lose 5, 6 and 7. In the end every record but the bad one is applied once and the bad
    one is dead-lettered."""
    async with recording_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema) as s:
        topic = s.topics.shipment_events
        await write(s, topic, [("k", n, "bad \x00" if n == 5 else None) for n in range(10)])
        recorder = Recorder([topic], "runner", hold_call=2)
        async with running(s, recorder, max_records=4) as runner:
            await asyncio.wait_for(recorder.holding.wait(), 30)
            await until(lambda: runner.prefetched == 2, "8 and 9 polled ahead")
            recorder.gate.set()
            await caught_up(s, [topic])
            dead_letters, dropped = runner.stats.dead_letters, runner.stats.dropped
        rows = await recorded(s)
    assert [offset for _, offset in recorder.batches[1]] == [4, 5, 6, 7]
    applied = Counter(r["record_offset"] for r in rows)
    assert applied == Counter(n for n in range(10) if n != 5), "a record lost or applied twice"
    assert dead_letters == 1
    assert dropped >= 1, "the batch polled ahead was never dropped"


async def test_a_runner_whose_consumer_cannot_start_closes_it(
    database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """No broker at the address: run() raises, and the consumer it made is closed
    (aiokafka warns "Unclosed AIOKafkaConsumer" when one is dropped unclosed)."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = projector_settings(f"127.0.0.1:{port}", database_url, topic_prefix, pg_schema)
    runner = ProjectionRunner(
        Recorder([s.topics.shipment_events], "runner"),
        None,  # type: ignore[arg-type]  # the pool and the producer are never reached
        s.kafka,
        s.topics.dead_letters,
        None,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KafkaError):
            await runner.run()
        del runner
        gc.collect()
    unclosed = [w for w in caught if "Unclosed AIOKafkaConsumer" in str(w.message)]
    assert not unclosed
