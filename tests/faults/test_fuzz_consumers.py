"""Bad records on every input topic: the projector dead-letters or tolerates them, and
goes on.

The projector (the production runner and projection, in-process) consumes its three
input topics while the test writes, on each topic, poison interleaved with valid
"canary" records:

- undecodable values: random bytes, empty, a tombstone, a truncated envelope,
  protobuf nested past the parser's limit, 900 KB of garbage;
- envelopes that decode but are unusable: unknown schema type, schema header
  contradicting the value, no event id or tenant;
- valid envelopes with absurd content (Hypothesis-built payloads: NaN and
  out-of-range points, timestamps outside any range, unknown enum numbers, ids and
  texts of any length, NUL characters): the folds must not raise for any content,
  and what PostgreSQL cannot store is dead-lettered;
- valid envelopes on the wrong topic (a GPS batch on shipment events, an alert on
  an input topic): dead-lettered.

Every undecodable or unusable record must be on the dead-letter topic with a
reason header (and where it came from), every canary applied, and the runner still
running.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from aiokafka import AIOKafkaConsumer
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from services.projector.live import LiveTracker
from services.projector.projection import TrackingProjection
from shared import tracking_store as store
from shared.config import Settings
from shared.db import create_pool
from shared.envelopes import HEADER_SCHEMA_TYPE, encode, utc_now
from shared.kafka import (
    HEADER_DLQ_OFFSET,
    HEADER_DLQ_PARTITION,
    HEADER_DLQ_REASON,
    HEADER_DLQ_TOPIC,
)
from shared.pb import alerts_pb2, envelope_pb2
from shared.projection import ProjectionRunner
from tests.faults.inputs import FUZZ_EXAMPLES, messages, nested
from tests.projection_helpers import (
    end_offsets,
    envelope_for,
    gps_envelope,
    lifecycle,
    prepare,
    producer_for,
    projector_settings,
)

pytestmark = pytest.mark.timeout(300)

TENANT = "acme"
#: As in test_fuzz_grpc.py: the full run sets more.
EXAMPLES = FUZZ_EXAMPLES


@dataclass
class Projector:
    settings: Settings
    runner: ProjectionRunner
    task: asyncio.Task[None]

    def assert_alive(self) -> None:
        if self.task.done():
            error = None if self.task.cancelled() else self.task.exception()
            raise AssertionError(f"the projector stopped: {error!r}")

    async def caught_up(self, timeout_s: float = 60.0) -> None:
        """Until the stored offsets reach Kafka's end offsets (fails at once if the
        runner died)."""
        topics = list(self.runner.projection.topics)
        targets = {
            tp: end - 1 for tp, end in (await end_offsets(self.settings, topics)).items() if end > 0
        }
        async with asyncio.timeout(timeout_s):
            while True:
                self.assert_alive()
                async with self.runner.pool.acquire() as connection:
                    rows = await connection.fetch(
                        "SELECT topic, partition, last_offset FROM projection_offsets"
                    )
                stored = {(r["topic"], r["partition"]): r["last_offset"] for r in rows}
                if all(
                    stored.get((tp.topic, tp.partition), -1) >= end for tp, end in targets.items()
                ):
                    return
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def projector(settings: Settings) -> AsyncIterator[Projector]:
    await prepare(settings)
    pool = await create_pool(settings.database)
    async with producer_for(settings) as producer:
        runner = ProjectionRunner(
            TrackingProjection(settings.topics, LiveTracker(settings.alerts)),
            pool,
            settings.kafka,
            settings.topics.dead_letters,
            producer,
            topic_prefix=settings.topics.prefix,
            max_records=50,
        )
        task = asyncio.create_task(runner.run())
        try:
            yield Projector(settings, runner, task)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await pool.close()


@pytest.fixture
async def running(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> AsyncIterator[Projector]:
    settings = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    async with projector(settings) as running:
        yield running


async def dead_letters(settings: Settings, count: int) -> list[dict[str, bytes]]:
    """The headers of the first `count` dead letters (waits for them)."""
    consumer = AIOKafkaConsumer(
        settings.topics.dead_letters,
        **settings.kafka.client_options(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[dict[str, bytes]] = []
    try:
        async with asyncio.timeout(30):
            while len(found) < count:
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    found += [dict(r.headers) for r in records]
    finally:
        await consumer.stop()
    return found


def _poison(rng: random.Random, canary: envelope_pb2.Envelope) -> list[tuple[bytes | None, str]]:
    """(value, what) pairs that no consumer can use."""
    valid = encode(canary, "x").value
    unknown_schema = envelope_pb2.Envelope()
    unknown_schema.CopyFrom(canary)
    unknown_schema.schema_type = "cargotrack.v9.Teleport"
    no_ids = envelope_pb2.Envelope()
    no_ids.CopyFrom(canary)
    no_ids.event_id = ""
    no_ids.tenant_id = ""
    return [
        (bytes(rng.getrandbits(8) for _ in range(17)), "random bytes"),
        (bytes(rng.getrandbits(8) for _ in range(1000)), "random kilobyte"),
        (b"", "empty value"),
        (None, "tombstone"),
        (valid[: len(valid) // 2], "truncated envelope"),
        (nested(1000), "nested past the recursion limit"),
        (b"\xff" * 900_000, "900 KB of garbage"),
        (unknown_schema.SerializeToString(), "unknown schema type"),
        (no_ids.SerializeToString(), "no event id, no tenant"),
    ]


async def test_poison_on_every_topic_is_dead_lettered_and_the_projector_goes_on(
    running: Projector,
) -> None:
    settings = running.settings
    topics = settings.topics
    rng = random.Random(5)
    start = utc_now() - timedelta(hours=1)
    events = lifecycle(TENANT, "canary", "veh-canary", start)
    gps = [
        gps_envelope(
            TENANT,
            "veh-canary",
            "phone",
            s,
            [(start + timedelta(seconds=10 * s), 52.5 + 0.0001 * s, 13.4)],
        )
        for s in range(1, 5)
    ]
    expected_poison = 0
    async with producer_for(settings) as producer:
        for topic, canaries in (
            (topics.shipment_events, events),
            (topics.gps_points, gps),
            (topics.delivery_confirmations, []),
        ):
            poison = _poison(rng, (canaries or events)[0])
            for i, (value, _what) in enumerate(poison):
                await producer.send_and_wait(topic, value, key=b"canary")
                if i < len(canaries):
                    record = encode(canaries[i], "canary")
                    await producer.send_and_wait(
                        topic, record.value, key=record.key, headers=record.headers
                    )
            # A valid envelope whose schema header contradicts it.
            record = encode((canaries or events)[0], "canary")
            await producer.send_and_wait(
                topic,
                record.value,
                key=b"canary",
                headers=[(HEADER_SCHEMA_TYPE, b"cargotrack.v1.Alert")],
            )
            expected_poison += len(poison) + 1
        await running.caught_up()
    running.assert_alive()
    async with running.runner.pool.acquire() as connection:
        shipments = await store.load_shipments(connection, [(TENANT, "canary")])
        vehicles = await store.load_vehicles(connection, [(TENANT, "veh-canary")])
    assert [e.event_id for e in shipments[(TENANT, "canary")].timeline] == [
        e.event_id for e in events
    ]
    assert vehicles[(TENANT, "veh-canary")].sequence_of("phone") == 4
    letters = await dead_letters(settings, expected_poison)
    assert len(letters) == expected_poison
    for headers in letters:
        assert headers[HEADER_DLQ_REASON], headers
        assert headers[HEADER_DLQ_TOPIC].decode() in running.runner.projection.topics
        assert int(headers[HEADER_DLQ_PARTITION]) >= 0
        assert int(headers[HEADER_DLQ_OFFSET]) >= 0
    assert running.runner.stats.dead_letters == expected_poison


_PAYLOADS = {
    "gps_batch": envelope_pb2.Envelope.DESCRIPTOR.fields_by_name["gps_batch"],
    "shipment_event": envelope_pb2.Envelope.DESCRIPTOR.fields_by_name["shipment_event"],
    "delivery_confirmation": envelope_pb2.Envelope.DESCRIPTOR.fields_by_name[
        "delivery_confirmation"
    ],
}


@st.composite
def absurd_envelopes(draw: st.DrawFn, payload: str) -> envelope_pb2.Envelope:
    """A decodable envelope of the payload kind with absurd content. Strings of at most
    300 characters (keeps examples quick; ids over PostgreSQL's index row limit have
    their own test below); NUL characters included (PostgreSQL refuses them in text:
    the record is dead-lettered)."""
    descriptor = _PAYLOADS[payload].message_type
    assert descriptor is not None
    body = draw(messages(descriptor, nul=True, longest=300))
    envelope = envelope_pb2.Envelope(
        event_id=f"absurd-{draw(st.integers(0, 10**9))}",
        tenant_id=draw(st.sampled_from([TENANT, "other", "x" * 300])),
    )
    getattr(envelope, payload).CopyFrom(body)
    occurred_at = draw(messages(Timestamp.DESCRIPTOR))
    assert isinstance(occurred_at, Timestamp)
    envelope.occurred_at.CopyFrom(occurred_at)
    return envelope


#: One projector serves every example (each writes its own canary), so an example
#: costs a catch-up, not a projector start: 4 examples per 10 of the endpoint fuzz.
ABSURD_EXAMPLES = max(10, EXAMPLES * 2 // 5)


@settings(
    max_examples=ABSURD_EXAMPLES,
    suppress_health_check=list(HealthCheck),
    # A failure is reported as found: shrinking would replay through the projector.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(data=st.data())
async def test_absurd_but_decodable_records_never_stop_the_projector(
    running: Projector, data: st.DataObject
) -> None:
    """Hypothesis-built envelopes of each topic's payload type, with absurd content,
    then canaries: the folds never raise, the canaries are applied."""
    settings = running.settings
    topics = settings.topics
    plan = [
        (topics.shipment_events, "shipment_event"),
        (topics.delivery_confirmations, "delivery_confirmation"),
        (topics.gps_points, "gps_batch"),
    ]
    canary = f"canary-{uuid.uuid4().hex[:8]}"
    events = lifecycle(TENANT, canary, "veh-canary", utc_now() - timedelta(hours=1))
    async with producer_for(settings) as producer:
        for topic, payload in plan:
            for envelope in data.draw(
                st.lists(absurd_envelopes(payload), min_size=10, max_size=10)
            ):
                record = encode(envelope, "absurd")
                await producer.send_and_wait(
                    topic, record.value, key=record.key, headers=record.headers
                )
        for envelope in events:
            record = encode(envelope, canary)
            await producer.send_and_wait(
                topics.shipment_events, record.value, key=record.key, headers=record.headers
            )
    await running.caught_up()
    async with running.runner.pool.acquire() as connection:
        shipments = await store.load_shipments(connection, [(TENANT, canary)])
    assert len(shipments[(TENANT, canary)].timeline) == len(events)
    running.assert_alive()


async def test_a_valid_envelope_on_the_wrong_topic_is_dead_lettered(running: Projector) -> None:
    settings = running.settings
    start = utc_now() - timedelta(hours=1)
    gps = gps_envelope(TENANT, "veh-x", "phone", 1, [(start, 52.5, 13.4)])
    alert = envelope_for(TENANT, "alert-1", start)
    alert.alert.CopyFrom(alerts_pb2.Alert(alert_id="alert-1", shipment_id="s"))
    async with producer_for(settings) as producer:
        for envelope in (gps, alert):
            record = encode(envelope, "x")
            await producer.send_and_wait(
                settings.topics.shipment_events,
                record.value,
                key=record.key,
                headers=record.headers,
            )
        await running.caught_up()
    running.assert_alive()
    assert running.runner.stats.dead_letters == 2
    reasons = [h[HEADER_DLQ_REASON].decode() for h in await dead_letters(settings, 2)]
    assert [reason.split(" does not belong")[0] for reason in reasons] == [
        "a gps_batch payload",
        "a alert payload",
    ]


def _unstorable(case: str) -> list[envelope_pb2.Envelope]:
    start = utc_now() - timedelta(hours=1)
    if case == "nul-in-text":
        events = lifecycle(TENANT, "bad", "veh-bad", start)
        events[0].shipment_event.created.reference = "order \x00 42"
        return events
    # Random, so that PostgreSQL cannot compress it under the index row limit (2704 B).
    long_id = random.Random(case).randbytes(4000).hex()
    if case == "long-shipment-id":
        return lifecycle(TENANT, long_id, "veh-bad", start)
    return [gps_envelope(TENANT, long_id, "phone", 1, [(start, 52.5, 13.4)])]


@pytest.mark.parametrize("case", ["nul-in-text", "long-shipment-id", "long-vehicle-id"])
async def test_a_record_postgres_cannot_store_does_not_stop_the_projector(
    running: Projector, case: str
) -> None:
    settings = running.settings
    canary = lifecycle(TENANT, "after-bad", "veh-bad", utc_now() - timedelta(hours=1))
    async with producer_for(settings) as producer:
        for envelope in _unstorable(case):
            topic = (
                settings.topics.gps_points
                if envelope.WhichOneof("payload") == "gps_batch"
                else settings.topics.shipment_events
            )
            record = encode(envelope, "x")
            await producer.send_and_wait(
                topic, record.value, key=b"same-partition", headers=record.headers
            )
        for envelope in canary:
            record = encode(envelope, "x")
            await producer.send_and_wait(
                settings.topics.shipment_events,
                record.value,
                key=b"same-partition",
                headers=record.headers,
            )
        await running.caught_up(timeout_s=30)
    running.assert_alive()
    # The bad records alone are dead-lettered, with the reason; everything else applied.
    unstorable = {"nul-in-text": 1, "long-shipment-id": 4, "long-vehicle-id": 1}[case]
    assert running.runner.stats.dead_letters == unstorable
    for headers in await dead_letters(settings, unstorable):
        assert headers[HEADER_DLQ_REASON].decode().startswith("PostgreSQL cannot store it: ")
    async with running.runner.pool.acquire() as connection:
        states = await store.load_shipments(connection, [(TENANT, "after-bad")])
    assert states[(TENANT, "after-bad")].vehicle_id == "veh-bad"
