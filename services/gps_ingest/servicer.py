"""GpsIngestService.StreamPoints: drivers' apps stream GPS batches, one Kafka record each.

Contract of one stream (docs/ingest.md has the client's view):

- Batches are handled in the order they arrive and answered in that order, one
  response per batch.
- A batch for a vehicle other than the driver token's ends the stream with
  PERMISSION_DENIED (batches before it are stored and answered first).
- A batch with batch-level violations (ids, sequence, no points or more than 1000),
  without a single valid point, or whose record would be over the topic's
  max.message.bytes (violation on "batch") is answered REJECTED with its
  violations; nothing is stored and the stream goes on.
- Otherwise its valid points become ONE record on the GPS topic, keyed by vehicle
  id, with event id = gps_batch_event_id(tenant, device, sequence), so a resent
  batch has the id of the original; the answer (ACCEPTED or PARTIALLY_ACCEPTED with
  a violation per refused point) goes out only after Kafka acknowledged the record.
- If Kafka does not acknowledge in time (settings.kafka.request_timeout_s, or less
  to stay within the client's deadline) the stream ends with UNAVAILABLE and nothing
  after that batch is written: the client resends every unanswered batch on a new
  stream, and the device's sequences stay in order on the topic.

Pipelining: a client may send many batches before reading answers. While one group
of batches is being written, the next batches are read, validated and encoded;
when the write is acknowledged, all batches queued meanwhile form the next group.
A group is written with KafkaLink.write_in_order, so a failure stores a prefix of
it and nothing after: acknowledging in groups costs no ordering guarantee.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog

from shared import metrics, tracing
from shared.auth import Principal, Role, current_principal
from shared.domain.ids import gps_batch_event_id
from shared.domain.validation import Violation, as_field_violations, validate_gps_batch
from shared.envelopes import EncodedRecord, encode, timestamp
from shared.ingest import TopicWriter, deadline_budget, envelope_for, traceparent
from shared.kafka import KafkaUnavailable
from shared.pb import gps_pb2, gps_pb2_grpc
from shared.rpc import Context

log = logging.getLogger(__name__)

#: Batches read ahead of the Kafka writes; a client sending faster is slowed by
#: gRPC flow control, not buffered without bound.
MAX_QUEUED_BATCHES = 64
#: Upper bounds of one group written and acknowledged together.
MAX_GROUP_BATCHES = 64
MAX_GROUP_BYTES = 1 << 20


@dataclass(frozen=True)
class _Write:
    """An accepted batch: its record, then its answer once Kafka acknowledged it.

    `span` (tracing on) covers the batch from validation to acknowledgement; the
    record carries its traceparent."""

    record: EncodedRecord
    response: gps_pb2.StreamPointsResponse
    span: tracing.SpanHandle = field(default_factory=tracing.SpanHandle)


@dataclass(frozen=True)
class _Answer:
    """A rejected batch: nothing to write, answered in turn."""

    response: gps_pb2.StreamPointsResponse


@dataclass(frozen=True)
class _Deny:
    """A batch the caller may not post: the stream ends here."""

    details: str


@dataclass(frozen=True)
class _End:
    """The client closed its side (error None), or reading failed."""

    error: Exception | None = None


_Item = _Write | _Answer | _Deny | _End


class GpsIngestServicer(TopicWriter, gps_pb2_grpc.GpsIngestServiceServicer):
    """Writes each accepted batch to `topic` through `kafka` (see the module docstring)."""

    async def StreamPoints(
        self,
        request_iterator: AsyncIterator[gps_pb2.StreamPointsRequest],
        context: Context,
    ) -> AsyncIterator[gps_pb2.StreamPointsResponse]:
        principal = current_principal()
        # This call's own task: every log line of the stream names the vehicle.
        structlog.contextvars.bind_contextvars(vehicle_id=principal.vehicle_id)
        queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=MAX_QUEUED_BATCHES)
        reader = asyncio.create_task(
            self._admit_all(request_iterator, principal, traceparent(context), queue),
            name="gps-stream-reader",
        )
        try:
            held: _Item | None = None
            while True:
                item = held if held is not None else await queue.get()
                held = None
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                if isinstance(item, _Deny):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, item.details)
                if isinstance(item, _Answer):
                    yield item.response
                    continue
                assert isinstance(item, _Write)
                group = [item]
                size = len(item.record.value)
                while (
                    not queue.empty() and len(group) < MAX_GROUP_BATCHES and size < MAX_GROUP_BYTES
                ):
                    following = queue.get_nowait()
                    if isinstance(following, _Write) and following.record.key == item.record.key:
                        group.append(following)
                        size += len(following.record.value)
                    else:
                        held = following
                        break
                try:
                    await self._kafka.write_in_order(
                        self._topic,
                        item.record.key,
                        [write.record for write in group],
                        deadline_budget(context, self._timeout_s),
                    )
                except KafkaUnavailable as error:
                    for write in group:
                        write.span.end(f"not stored: {error}")
                    log.warning(
                        "GPS stream of %s ends at sequence %d: %s",
                        principal.subject,
                        item.response.sequence,
                        error,
                    )
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"batch {item.response.sequence} was not stored ({error}); "
                        "resend it and every later batch on a new stream",
                    )
                for write in group:
                    _count_stored(write.response)
                    write.span.end()
                for write in group:
                    yield write.response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _admit_all(
        self,
        requests: AsyncIterator[gps_pb2.StreamPointsRequest],
        principal: Principal,
        trace: str,
        queue: asyncio.Queue[_Item],
    ) -> None:
        """Read, authorise, validate and encode batches in order, until the client
        closes its side or a batch is denied."""
        try:
            async for request in requests:
                item = self._admit(request.batch, principal, trace)
                await queue.put(item)
                if isinstance(item, _Deny):
                    return
        except Exception as error:  # handed to the writer, which ends the stream with it
            await queue.put(_End(error))
            return
        await queue.put(_End())

    def _admit(self, batch: gps_pb2.GpsBatch, principal: Principal, trace: str) -> _Item:
        """Decide about one batch: deny it, reject it, or encode its record."""
        # An empty vehicle id is a validation error, reported as such below.
        if (
            principal.role is Role.DRIVER
            and batch.vehicle_id
            and batch.vehicle_id != principal.vehicle_id
        ):
            return _Deny(
                f"this driver token is for vehicle {principal.vehicle_id!r}; "
                f"batch {batch.sequence} is for vehicle {batch.vehicle_id!r}"
            )
        metrics.GPS_BATCH_POINTS.observe(len(batch.points))
        now = self._clock()
        verdict = validate_gps_batch(batch, now)
        violations = as_field_violations(verdict.violations())
        refused = len(batch.points) - (len(verdict.valid_points) if verdict.accepted else 0)
        if refused:
            metrics.GPS_POINTS_REJECTED.inc(refused)
        if not verdict.accepted:
            metrics.GPS_BATCHES.labels("rejected").inc()
            return _Answer(
                gps_pb2.StreamPointsResponse(
                    sequence=batch.sequence,
                    outcome=gps_pb2.BATCH_OUTCOME_REJECTED,
                    violations=violations,
                )
            )
        newest = verdict.newest  # the valid point recorded last
        assert newest is not None, "an accepted batch has a valid point"
        event_id = gps_batch_event_id(principal.tenant_id, batch.device_id, batch.sequence)
        # A child of the stream's span (this task inherited the call's context).
        span = tracing.start_span(
            "gps batch",
            kind="producer",
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": self._topic,
                "cargotrack.event_id": event_id,
                "cargotrack.vehicle_id": batch.vehicle_id,
                "cargotrack.batch.points": len(batch.points),
            },
        )
        envelope = envelope_for(
            principal,
            event_id=event_id,
            occurred_at=newest.recorded_at,
            recorded_at=timestamp(now),
            traceparent=span.traceparent or trace,
        )
        stored = envelope.gps_batch
        stored.vehicle_id = batch.vehicle_id
        stored.device_id = batch.device_id
        stored.sequence = batch.sequence
        stored.points.extend(verdict.valid_points)
        record = encode(envelope, batch.vehicle_id)
        too_large = self._kafka.oversized(self._topic, [record])
        if too_large:
            span.end(f"not stored: {too_large[0]}")
            metrics.GPS_BATCHES.labels("rejected").inc()
            return _Answer(
                gps_pb2.StreamPointsResponse(
                    sequence=batch.sequence,
                    outcome=gps_pb2.BATCH_OUTCOME_REJECTED,
                    violations=as_field_violations(
                        [Violation("batch", f"over the topic's record size limit: {too_large[0]}")]
                    ),
                )
            )
        return _Write(
            record,
            gps_pb2.StreamPointsResponse(
                sequence=batch.sequence,
                outcome=verdict.outcome,
                accepted_points=len(verdict.valid_points),
                violations=violations,
            ),
            span,
        )


_OUTCOMES = {
    gps_pb2.BATCH_OUTCOME_ACCEPTED: "accepted",
    gps_pb2.BATCH_OUTCOME_PARTIALLY_ACCEPTED: "partially_accepted",
    gps_pb2.BATCH_OUTCOME_REJECTED: "rejected",
}


def _count_stored(response: gps_pb2.StreamPointsResponse) -> None:
    """Metrics of a batch Kafka acknowledged (refused points were counted at admission)."""
    metrics.GPS_BATCHES.labels(_OUTCOMES.get(response.outcome, "accepted")).inc()
    metrics.GPS_POINTS_INGESTED.inc(response.accepted_points)
