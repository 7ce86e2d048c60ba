"""gps-ingest against the session's real Kafka broker: what goes in comes out, in order."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest

from shared.auth import Role
from shared.domain.ids import gps_batch_event_id
from shared.envelopes import (
    HEADER_EVENT_ID,
    HEADER_SCHEMA_TYPE,
    HEADER_TENANT_ID,
    timestamp,
    utc_now,
)
from shared.pb import gps_pb2, gps_pb2_grpc
from tests.ingest_helpers import (
    ConsumedEnvelope,
    RunningService,
    bearer,
    consume_envelopes,
    gps_batch,
    gps_point,
    high_water_dedupe,
    running_service,
    service_settings,
    topic_end_offsets,
)

pytestmark = pytest.mark.timeout(90)

ACCEPTED = gps_pb2.BATCH_OUTCOME_ACCEPTED
PARTIAL = gps_pb2.BATCH_OUTCOME_PARTIALLY_ACCEPTED
REJECTED = gps_pb2.BATCH_OUTCOME_REJECTED


@pytest.fixture
async def gps(kafka_bootstrap: str, topic_prefix: str) -> AsyncIterator[RunningService]:
    async with running_service(
        "gps-ingest", service_settings(kafka_bootstrap, topic_prefix)
    ) as service:
        yield service


async def gps_records_stored(service: RunningService, kafka_bootstrap: str) -> int:
    topics = service.settings.topics
    return await topic_end_offsets(kafka_bootstrap, topics.gps_points, topics.partitions)


def stub(service: RunningService) -> gps_pb2_grpc.GpsIngestServiceStub:
    return gps_pb2_grpc.GpsIngestServiceStub(service.channel)


def requests(*batches: gps_pb2.GpsBatch) -> list[gps_pb2.StreamPointsRequest]:
    return [gps_pb2.StreamPointsRequest(batch=b) for b in batches]


async def stream_all(
    service: RunningService, vehicle: str, batches: list[gps_pb2.GpsBatch], tenant: str = "tenant-a"
) -> list[gps_pb2.StreamPointsResponse]:
    """Send every batch before reading any answer (pipelined), then read them all."""
    call = stub(service).StreamPoints(
        iter(requests(*batches)),
        metadata=bearer(Role.DRIVER, tenant=tenant, vehicle_id=vehicle),
        timeout=30,
    )
    return [response async for response in call]


async def test_streamed_points_come_out_decodable_and_in_order_per_vehicle(
    gps: RunningService, kafka_bootstrap: str
) -> None:
    vehicles = ["veh-1", "veh-2", "veh-3"]
    sent = {v: [gps_batch(v, sequence, points=5) for sequence in range(1, 21)] for v in vehicles}

    answers = await asyncio.gather(*(stream_all(gps, v, sent[v]) for v in vehicles))

    for vehicle, responses in zip(vehicles, answers, strict=True):
        assert [r.sequence for r in responses] == list(range(1, 21)), vehicle
        assert {r.outcome for r in responses} == {ACCEPTED}
        assert all(r.accepted_points == 5 and not r.violations for r in responses)

    records = await consume_envelopes(kafka_bootstrap, gps.settings.topics.gps_points, 60)
    for vehicle in vehicles:
        mine = [r for r in records if r.key == vehicle.encode()]
        assert len({r.partition for r in mine}) == 1, "one vehicle, one partition"
        assert [r.envelope.gps_batch.sequence for r in mine] == list(range(1, 21))
        for record, batch in zip(mine, sent[vehicle], strict=True):
            envelope = record.envelope
            assert envelope.gps_batch == batch
            assert envelope.schema_type == "cargotrack.v1.GpsBatch"
            assert envelope.tenant_id == "tenant-a"
            assert envelope.principal == "driver@tenant-a"
            assert envelope.event_id == gps_batch_event_id(
                "tenant-a", batch.device_id, batch.sequence
            )
            assert envelope.occurred_at == batch.points[-1].recorded_at
            assert envelope.recorded_at.ToDatetime() >= envelope.occurred_at.ToDatetime()
            headers = dict(record.headers)
            assert headers[HEADER_SCHEMA_TYPE] == b"cargotrack.v1.GpsBatch"
            assert headers[HEADER_EVENT_ID] == envelope.event_id.encode()
            assert headers[HEADER_TENANT_ID] == b"tenant-a"


async def test_answers_arrive_one_by_one_as_batches_are_sent(gps: RunningService) -> None:
    """A client that waits for each answer before sending the next gets each in turn."""
    call = stub(gps).StreamPoints(metadata=bearer(Role.DRIVER, vehicle_id="veh-1"), timeout=30)
    for sequence in range(1, 4):
        await call.write(gps_pb2.StreamPointsRequest(batch=gps_batch("veh-1", sequence)))
        answer = await call.read()
        assert answer.sequence == sequence
        assert answer.outcome == ACCEPTED
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_resend_after_a_lost_ack_is_detectable_by_event_id_and_sequence(
    gps: RunningService, kafka_bootstrap: str
) -> None:
    """The client got no ack for 4 and 5 (the connection dropped), so it resends them."""
    batches = [gps_batch("veh-9", sequence) for sequence in range(1, 7)]
    first = stub(gps).StreamPoints(
        iter(requests(*batches[:5])), metadata=bearer(Role.DRIVER, vehicle_id="veh-9"), timeout=30
    )
    acked = [(await first.read()).sequence for _ in range(5)]  # the server acked all five...
    first.cancel()  # ...but the client lost the last two acks with the connection
    assert acked == [1, 2, 3, 4, 5]

    second = await stream_all(gps, "veh-9", batches[3:])
    assert [r.sequence for r in second] == [4, 5, 6]

    records = await consume_envelopes(kafka_bootstrap, gps.settings.topics.gps_points, 8)
    sequences = [r.envelope.gps_batch.sequence for r in records]
    assert sequences == [1, 2, 3, 4, 5, 4, 5, 6]
    ids: dict[int, set[str]] = {}
    for record in records:
        ids.setdefault(record.envelope.gps_batch.sequence, set()).add(record.envelope.event_id)
    assert all(len(found) == 1 for found in ids.values()), "a resend has the original's event id"
    # Either dedupe rule restores the device's batches, in order: by event id...
    seen: set[str] = set()
    deduped = []
    for record in records:
        if record.envelope.event_id not in seen:
            seen.add(record.envelope.event_id)
            deduped.append(record.envelope.gps_batch.sequence)
    assert deduped == [1, 2, 3, 4, 5, 6]
    # ...or by the device's highest stored sequence.
    assert high_water_dedupe(records) == [1, 2, 3, 4, 5, 6]


async def test_stream_cancelled_mid_flight_then_resent_loses_nothing(
    gps: RunningService, kafka_bootstrap: str
) -> None:
    """A drop at an arbitrary moment: after resending everything unacked, every sequence
    is stored, and each stored copy of a sequence carries the same event id."""
    batches = [gps_batch("veh-7", sequence) for sequence in range(1, 11)]
    call = stub(gps).StreamPoints(
        iter(requests(*batches)), metadata=bearer(Role.DRIVER, vehicle_id="veh-7"), timeout=30
    )
    acked = [(await call.read()).sequence for _ in range(3)]
    call.cancel()
    unacked = [b for b in batches if b.sequence not in acked]

    resent = await stream_all(gps, "veh-7", unacked)
    assert [r.sequence for r in resent] == [b.sequence for b in unacked]

    def complete(found: list[ConsumedEnvelope]) -> bool:
        return {r.envelope.gps_batch.sequence for r in found} == set(range(1, 11))

    records = await consume_envelopes(
        kafka_bootstrap, gps.settings.topics.gps_points, until=complete
    )
    by_sequence: dict[int, set[str]] = {}
    for record in records:
        by_sequence.setdefault(record.envelope.gps_batch.sequence, set()).add(
            record.envelope.event_id
        )
    assert all(len(ids) == 1 for ids in by_sequence.values())
    first_seen = list(dict.fromkeys(r.envelope.gps_batch.sequence for r in records))
    assert first_seen == list(range(1, 11)), "first copies are in sequence order"
    assert high_water_dedupe(records) == list(range(1, 11)), "so the high-water rule loses none"


async def test_a_client_dropping_streams_at_random_loses_nothing_under_either_dedupe(
    gps: RunningService, kafka_bootstrap: str
) -> None:
    """The client contract, end to end: pipeline everything unacknowledged, drop the
    stream at a random point, resend the rest on a new stream, repeat."""
    rng = random.Random(20261125)
    pending = [gps_batch("veh-5", sequence) for sequence in range(1, 61)]
    for round_ in itertools.count():
        call = stub(gps).StreamPoints(
            iter(requests(*pending)), metadata=bearer(Role.DRIVER, vehicle_id="veh-5"), timeout=30
        )
        last = round_ >= 6
        to_read = len(pending) if last else rng.randint(0, len(pending) // 2)
        for expected in pending[:to_read]:
            assert (await call.read()).sequence == expected.sequence
        call.cancel()
        pending = pending[to_read:]
        if not pending:
            break

    def complete(found: list[ConsumedEnvelope]) -> bool:
        return {r.envelope.gps_batch.sequence for r in found} == set(range(1, 61))

    records = await consume_envelopes(
        kafka_bootstrap, gps.settings.topics.gps_points, until=complete
    )
    assert high_water_dedupe(records) == list(range(1, 61))
    assert len({r.envelope.event_id for r in records}) == 60


async def test_bad_points_are_refused_by_name_and_good_ones_stored(
    gps: RunningService, kafka_bootstrap: str
) -> None:
    now = utc_now()
    batch = gps_batch("veh-1", 1, points=1)
    bad = [
        gps_point(latitude=91.0),  # 1: latitude out of range
        gps_point(latitude=math.nan),  # 2: NaN
        gps_point(longitude=math.inf),  # 3: infinity
        gps_pb2.GpsPoint(latitude=52.5, longitude=13.4),  # 4: no timestamp
        gps_point(now + timedelta(hours=1)),  # 5: in the future
        gps_point(longitude=-180.5),  # 6: longitude out of range
    ]
    batch.points.extend(bad)
    batch.points.append(gps_point())  # 7: valid

    [answer] = await stream_all(gps, "veh-1", [batch])

    assert answer.outcome == PARTIAL
    assert answer.accepted_points == 2
    fields = [v.field for v in answer.violations]
    assert fields == [
        "batch.points[1].latitude",
        "batch.points[2].latitude",
        "batch.points[3].longitude",
        "batch.points[4].recorded_at",
        "batch.points[5].recorded_at",
        "batch.points[6].longitude",
    ]
    assert all(v.description for v in answer.violations)
    [record] = await consume_envelopes(kafka_bootstrap, gps.settings.topics.gps_points, 1)
    stored = record.envelope.gps_batch
    assert list(stored.points) == [batch.points[0], batch.points[7]]
    assert record.envelope.occurred_at == max(
        (p.recorded_at for p in stored.points), key=lambda t: (t.seconds, t.nanos)
    )


async def test_rejected_batches_are_answered_and_the_stream_goes_on(
    gps: RunningService, kafka_bootstrap: str
) -> None:
    no_vehicle = gps_batch("veh-1", 1)
    no_vehicle.vehicle_id = ""
    too_many = gps_batch("veh-1", 2, points=1001)
    all_bad = gps_batch("veh-1", 3, points=2)
    for point in all_bad.points:
        point.latitude = -95.0
    no_sequence = gps_batch("veh-1", 0)
    no_device = gps_batch("veh-1", 4)
    no_device.device_id = ""
    good = gps_batch("veh-1", 5)

    answers = await stream_all(
        gps, "veh-1", [no_vehicle, too_many, all_bad, no_sequence, no_device, good]
    )

    assert [(a.sequence, a.outcome) for a in answers] == [
        (1, REJECTED),
        (2, REJECTED),
        (3, REJECTED),
        (0, REJECTED),
        (4, REJECTED),
        (5, ACCEPTED),
    ]
    assert [v.field for v in answers[0].violations] == ["batch.vehicle_id"]
    assert [v.field for v in answers[1].violations] == ["batch.points"]
    assert [v.field for v in answers[2].violations] == [
        "batch.points[0].latitude",
        "batch.points[1].latitude",
    ]
    assert [v.field for v in answers[3].violations] == ["batch.sequence"]
    assert [v.field for v in answers[4].violations] == ["batch.device_id"]
    assert all(a.accepted_points == 0 for a in answers[:5])
    records = await consume_envelopes(kafka_bootstrap, gps.settings.topics.gps_points, 1)
    assert [r.envelope.gps_batch.sequence for r in records] == [5]
    assert await gps_records_stored(gps, kafka_bootstrap) == 1


async def test_a_driver_posting_for_another_vehicle_is_denied_after_earlier_batches(
    gps: RunningService, kafka_bootstrap: str
) -> None:
    call = stub(gps).StreamPoints(
        iter(requests(gps_batch("veh-1", 1), gps_batch("veh-2", 2), gps_batch("veh-1", 3))),
        metadata=bearer(Role.DRIVER, vehicle_id="veh-1"),
        timeout=30,
    )
    first = await call.read()
    assert (first.sequence, first.outcome) == (1, ACCEPTED)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "veh-2" in (caught.value.details() or "")
    records = await consume_envelopes(kafka_bootstrap, gps.settings.topics.gps_points, 1)
    assert [r.key for r in records] == [b"veh-1"]
    assert await gps_records_stored(gps, kafka_bootstrap) == 1


async def test_a_message_over_the_size_limit_gets_resource_exhausted(gps: RunningService) -> None:
    huge = gps_batch("veh-1", 1, points=1)
    huge.device_id = "d" * (gps.settings.grpc.max_message_bytes + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream_all(gps, "veh-1", [huge])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_tenant_comes_from_the_token(gps: RunningService, kafka_bootstrap: str) -> None:
    await stream_all(gps, "veh-1", [gps_batch("veh-1", 1)], tenant="tenant-b")
    [record] = await consume_envelopes(kafka_bootstrap, gps.settings.topics.gps_points, 1)
    assert record.envelope.tenant_id == "tenant-b"
    assert record.envelope.event_id == gps_batch_event_id("tenant-b", "device-veh-1", 1)


async def test_a_timestamp_before_2000_or_with_bad_nanos_is_refused(gps: RunningService) -> None:
    batch = gps_batch("veh-1", 1, points=1)
    old = batch.points.add()
    old.CopyFrom(gps_point())
    old.recorded_at.CopyFrom(timestamp(utc_now() - timedelta(days=365 * 30)))
    [answer] = await stream_all(gps, "veh-1", [batch])
    assert answer.outcome == PARTIAL
    assert [v.field for v in answer.violations] == ["batch.points[1].recorded_at"]
