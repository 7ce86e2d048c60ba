"""DeliveryConfirmationsService: proofs of delivery onto the delivery confirmations topic.

- One record per confirmation, keyed by shipment id: the topic is co-partitioned
  with shipment events (same key, same partition count), so one consumer sees a
  shipment's events and its confirmation on the same partition number.
- The envelope event id is the client's `confirmation_id` (required): confirming
  twice has the effect of confirming once downstream.
- A driver confirms only for its own vehicle: `vehicle_id` is required with a
  driver token and must be the token's (else PERMISSION_DENIED); ops may confirm
  for any vehicle of their tenant. The tenant is the token's.
- The answer goes out after Kafka acknowledged the record.
"""

from __future__ import annotations

import grpc
import structlog

from shared.auth import Role, current_principal
from shared.domain.validation import Violation, validate_delivery_confirmation
from shared.envelopes import encode, timestamp
from shared.ingest import TopicWriter, envelope_for, traceparent
from shared.pb import delivery_pb2, delivery_pb2_grpc
from shared.rpc import Context, abort_invalid


class DeliveryConfirmationsServicer(
    TopicWriter, delivery_pb2_grpc.DeliveryConfirmationsServiceServicer
):
    async def ConfirmDelivery(
        self, request: delivery_pb2.ConfirmDeliveryRequest, context: Context
    ) -> delivery_pb2.ConfirmDeliveryResponse:
        principal = current_principal()
        confirmation = request.confirmation
        # The call's own task: its log lines name what it is about.
        structlog.contextvars.bind_contextvars(
            shipment_id=confirmation.shipment_id,
            event_id=confirmation.confirmation_id,
            vehicle_id=confirmation.vehicle_id,
        )
        is_driver = principal.role is Role.DRIVER
        vehicle_id = confirmation.vehicle_id
        if is_driver and vehicle_id and vehicle_id != principal.vehicle_id:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this driver token is for vehicle {principal.vehicle_id!r}, not {vehicle_id!r}",
            )
        now = self._clock()
        violations = validate_delivery_confirmation(confirmation, now)
        if is_driver and not confirmation.vehicle_id:
            violations.append(
                Violation("confirmation.vehicle_id", "is required with a driver token")
            )
        if violations:
            await abort_invalid(context, violations, "invalid delivery confirmation")
        envelope = envelope_for(
            principal,
            event_id=confirmation.confirmation_id,
            occurred_at=confirmation.confirmed_at,
            recorded_at=timestamp(now),
            traceparent=traceparent(context),
        )
        envelope.delivery_confirmation.CopyFrom(confirmation)
        await self._write(context, [encode(envelope, confirmation.shipment_id)], ["confirmation"])
        return delivery_pb2.ConfirmDeliveryResponse(
            confirmation_id=confirmation.confirmation_id, recorded_at=envelope.recorded_at
        )
