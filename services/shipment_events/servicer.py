"""ShipmentEventsService: lifecycle events onto the shipment events topic.

- Each event becomes one record keyed by shipment id. Its envelope event id is the
  client's `event_id` (the idempotency key: recording it twice has the effect of
  recording it once downstream); when the client left it empty, the service mints a
  UUIDv7 and returns it, and a retry of that call is then a new fact.
- RecordEvents takes 1 to 500 events. All are validated before any is written:
  one bad event fails the whole call with INVALID_ARGUMENT and a BadRequest naming
  each bad field ("events[3].shipment_id"). Then all are written and the call
  answers after Kafka acknowledged every one. The write is not atomic: on
  UNAVAILABLE some events may be stored, and the client retries the call with the
  same event ids.
- A `created` event gets its public tracking token here: a random 128-bit value
  (22 base64url characters) replaces whatever the client sent in
  `created.tracking_token`, so the token is unguessable whatever the client does.
  A retried `created` (same event id) carries a new token, but downstream keeps the
  first copy of an event id, hence its token.
- The tenant is the token's, never the payload's.
"""

from __future__ import annotations

import secrets
from datetime import datetime

import structlog

from shared.auth import Principal, current_principal
from shared.domain.ids import uuid7
from shared.domain.validation import Violation, validate_shipment_event
from shared.envelopes import EncodedRecord, encode, timestamp
from shared.ingest import TopicWriter, envelope_for, traceparent
from shared.pb import shipment_pb2, shipment_pb2_grpc
from shared.rpc import Context, abort_invalid

MAX_EVENTS_PER_CALL = 500


def mint_tracking_token() -> str:
    """A public tracking token: 128 random bits as 22 base64url characters."""
    return secrets.token_urlsafe(16)


class ShipmentEventsServicer(TopicWriter, shipment_pb2_grpc.ShipmentEventsServiceServicer):
    async def RecordEvent(
        self, request: shipment_pb2.RecordEventRequest, context: Context
    ) -> shipment_pb2.RecordEventResponse:
        principal = current_principal()
        # The call's own task: its log lines name what it is about.
        structlog.contextvars.bind_contextvars(
            shipment_id=request.event.shipment_id, event_id=request.event.event_id
        )
        now = self._clock()
        violations = validate_shipment_event(request.event, now)
        if violations:
            await abort_invalid(context, violations, "invalid shipment event")
        record, result = self._record(request.event, principal, now, traceparent(context))
        await self._write(context, [record], ["event"])
        return result

    async def RecordEvents(
        self, request: shipment_pb2.RecordEventsRequest, context: Context
    ) -> shipment_pb2.RecordEventsResponse:
        principal = current_principal()
        now = self._clock()
        count = len(request.events)
        if count > MAX_EVENTS_PER_CALL:
            too_many = f"must hold at most {MAX_EVENTS_PER_CALL} events, not {count}"
            await abort_invalid(context, [Violation("events", too_many)], "too many events")
        violations: list[Violation] = []
        first_index: dict[str, int] = {}
        for index, event in enumerate(request.events):
            violations.extend(validate_shipment_event(event, now, root=f"events[{index}]"))
            if event.event_id:
                seen = first_index.setdefault(event.event_id, index)
                if seen != index:
                    violations.append(
                        Violation(f"events[{index}].event_id", f"repeats events[{seen}].event_id")
                    )
        if violations:
            await abort_invalid(context, violations, "invalid shipment events")
        trace = traceparent(context)
        records: list[EncodedRecord] = []
        response = shipment_pb2.RecordEventsResponse()
        for event in request.events:
            record, result = self._record(event, principal, now, trace)
            records.append(record)
            response.results.append(result)
        await self._write(context, records, [f"events[{i}]" for i in range(len(records))])
        return response

    @staticmethod
    def _record(
        event: shipment_pb2.ShipmentEvent, principal: Principal, now: datetime, trace: str
    ) -> tuple[EncodedRecord, shipment_pb2.RecordEventResponse]:
        envelope = envelope_for(
            principal,
            event_id=event.event_id or uuid7(),
            occurred_at=event.occurred_at,
            recorded_at=timestamp(now),
            traceparent=trace,
        )
        stored = envelope.shipment_event
        stored.CopyFrom(event)
        stored.event_id = envelope.event_id
        if stored.WhichOneof("event") == "created":
            stored.created.tracking_token = mint_tracking_token()
        result = shipment_pb2.RecordEventResponse(
            event_id=envelope.event_id, recorded_at=envelope.recorded_at
        )
        return encode(envelope, event.shipment_id), result
