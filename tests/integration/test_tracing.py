"""One trace across gRPC → Kafka → projector, recorded by the SDK's in-memory exporter.

A driver's app calls StreamPoints with a traceparent; gps-ingest (CARGOTRACK_TRACING=1)
continues it in a server span, gives each batch a child span, and writes that span's
context into the envelope and the Kafka `traceparent` header; the projector applies
the records under a batch span linked to those contexts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="tracing needs opentelemetry-sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.projector.live import LiveTracker
from services.projector.projection import TrackingProjection
from shared import tracing
from shared.auth import Role
from shared.db import create_pool
from shared.envelopes import HEADER_TRACEPARENT
from shared.pb import gps_pb2, gps_pb2_grpc, shipment_pb2, shipment_pb2_grpc
from shared.projection import ProjectionRunner, wait_caught_up
from tests.ingest_helpers import (
    bearer,
    consume_envelopes,
    gps_batch,
    running_service,
    service_settings,
    shipment_event,
)
from tests.projection_helpers import end_offsets, prepare, producer_for, projector_settings

pytestmark = pytest.mark.timeout(120)

#: The caller's context: trace 0af7..., span b7ad..., sampled.
CLIENT_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN_ID = 0xB7AD6B7169203331
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID:032x}-{CLIENT_SPAN_ID:016x}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, into memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def parse(traceparent: str) -> tuple[int, int]:
    _version, trace_id, span_id, _flags = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


async def test_a_gps_batch_is_traced_from_the_call_through_kafka_into_the_projector(
    spans: InMemorySpanExporter,
    kafka_bootstrap: str,
    database_url: str,
    topic_prefix: str,
    pg_schema: str,
) -> None:
    settings = service_settings(kafka_bootstrap, topic_prefix, CARGOTRACK_TRACING=1)
    assert settings.tracing
    async with running_service("gps-ingest", settings) as service:
        call = gps_pb2_grpc.GpsIngestServiceStub(service.channel).StreamPoints(
            iter(gps_pb2.StreamPointsRequest(batch=gps_batch("veh-1", n)) for n in (1, 2, 3)),
            metadata=(
                *bearer(Role.DRIVER, vehicle_id="veh-1"),
                ("traceparent", CLIENT_TRACEPARENT),
            ),
            timeout=30,
        )
        assert len([answer async for answer in call]) == 3

    # The server span continues the caller's trace.
    (server,) = named(spans, "cargotrack.v1.GpsIngestService/StreamPoints")
    assert server.kind is SpanKind.SERVER
    assert server.context is not None
    assert server.parent is not None
    assert server.context.trace_id == CLIENT_TRACE_ID
    assert server.parent.span_id == CLIENT_SPAN_ID
    assert server.attributes is not None
    assert server.attributes["rpc.grpc.status_code"] == 0
    # One span per batch, children of the server span, ended once Kafka acknowledged.
    batches = named(spans, "gps batch")
    assert len(batches) == 3
    assert all(b.parent is not None and b.parent.span_id == server.context.span_id for b in batches)
    batch_contexts = {(b.context.trace_id, b.context.span_id) for b in batches if b.context}

    # Each record carries its batch span's context, in the envelope and in the header.
    records = await consume_envelopes(kafka_bootstrap, settings.topics.gps_points, 3)
    carried = set()
    for record in records:
        header = dict(record.headers)[HEADER_TRACEPARENT].decode()
        assert header == record.envelope.traceparent
        carried.add(parse(header))
    assert carried == batch_contexts

    # The projector applies them under a batch span that links to each record's context.
    projector = projector_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(projector)
    pool = await create_pool(projector.database)
    try:
        async with producer_for(projector) as producer:
            runner = ProjectionRunner(
                TrackingProjection(projector.topics, LiveTracker(projector.alerts)),
                pool,
                projector.kafka,
                projector.topics.dead_letters,
                producer,
                topic_prefix=projector.topics.prefix,
            )
            task = asyncio.create_task(runner.run())
            try:
                ends = await end_offsets(projector, runner.projection.topics)
                await wait_caught_up(pool, runner.projection.name, ends, timeout_s=60)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await pool.close()
    applied = named(spans, "tracking apply")
    assert applied
    assert all(span.kind is SpanKind.CONSUMER for span in applied)
    linked = {
        (link.context.trace_id, link.context.span_id) for span in applied for link in span.links
    }
    assert linked == batch_contexts
    # A batch span starts its own trace: it folds records of many traces.
    assert all(span.context is not None for span in applied)
    assert CLIENT_TRACE_ID not in {span.context.trace_id for span in applied if span.context}


async def test_an_event_written_without_a_caller_trace_starts_one(
    spans: InMemorySpanExporter, kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = service_settings(kafka_bootstrap, topic_prefix, CARGOTRACK_TRACING=1)
    async with running_service("shipment-events", settings) as service:
        stub = shipment_pb2_grpc.ShipmentEventsServiceStub(service.channel)
        await stub.RecordEvent(
            shipment_pb2.RecordEventRequest(event=shipment_event("shp-1")),
            metadata=bearer(Role.SHIPPER),
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RecordEvent(
                shipment_pb2.RecordEventRequest(event=shipment_event("")),
                metadata=bearer(Role.SHIPPER),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ok, invalid = named(spans, "cargotrack.v1.ShipmentEventsService/RecordEvent")
    assert ok.parent is None  # a new trace
    assert ok.context is not None
    (record,) = await consume_envelopes(kafka_bootstrap, settings.topics.shipment_events, 1)
    assert parse(record.envelope.traceparent) == (ok.context.trace_id, ok.context.span_id)
    # A client error is not the server's fault: the span is not marked ERROR.
    assert invalid.attributes is not None
    assert invalid.attributes["rpc.grpc.status_code"] == 3
    assert invalid.status.status_code is not StatusCode.ERROR
    # Health checks are not traced.
    assert not [s for s in spans.get_finished_spans() if s.name.startswith("grpc.health")]
