"""DeliveryConfirmationsService: proofs of delivery onto the delivery confirmations topic.

- One record per confirmation, keyed by shipment id: the topic is co-partitioned
  with shipment events (same key, same partition count), so one consumer sees a
  shipment's events and its confirmation on the same partition number.
- The envelope event id is the client's `confirmation_id` (required): confirming
  twice has the effect of confirming once downstream.
- A driver confirms only for its own vehicle: `vehicle_id` is required with a
  driver token and must be the token's (else PERMISSION_DENIED); ops may confirm
  for any vehicle of their tenant. The tenant is the token's.
- With a read model configured (DATABASE_URL), a confirmation naming a vehicle is
  first pre-checked against it (precheck.py): one for a shipment assigned to
  another vehicle is refused (PERMISSION_DENIED for a driver, FAILED_PRECONDITION
  for ops), one for a shipment whose proof is settled too (FAILED_PRECONDITION);
  nothing is written then. The projection's fold stays the authority.
- The answer goes out after Kafka acknowledged the record.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import grpc
import structlog

from services.delivery_confirmations.precheck import Outcome, ReadModelPrecheck, skipped
from shared.auth import Principal, Role, current_principal
from shared.domain.validation import Violation, validate_delivery_confirmation
from shared.envelopes import encode, timestamp, utc_now
from shared.ingest import KafkaLink, TopicWriter, envelope_for, traceparent
from shared.pb import delivery_pb2, delivery_pb2_grpc
from shared.rpc import Context, abort_invalid, abort_with_reason

#: google.rpc.ErrorInfo reasons of the pre-check's refusals.
NOT_ASSIGNED_REASON = "SHIPMENT_NOT_ASSIGNED_TO_VEHICLE"
SETTLED_REASON = "PROOF_ALREADY_SETTLED"


class DeliveryConfirmationsServicer(
    TopicWriter, delivery_pb2_grpc.DeliveryConfirmationsServiceServicer
):
    def __init__(
        self,
        kafka: KafkaLink,
        topic: str,
        kafka_timeout_s: float,
        *,
        precheck: ReadModelPrecheck | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(kafka, topic, kafka_timeout_s, clock=clock)
        self._precheck = precheck

    async def _check_against_read_model(
        self,
        principal: Principal,
        confirmation: delivery_pb2.DeliveryConfirmation,
        context: Context,
    ) -> None:
        """Refuse (abort) a confirmation the read model shows the fold would not apply."""
        if self._precheck is None:
            return
        if not confirmation.vehicle_id:
            skipped()
            return
        result = await self._precheck.check(
            principal.tenant_id,
            confirmation.shipment_id,
            confirmation.vehicle_id,
            confirmation.confirmation_id,
        )
        if result.reason is None:
            return
        if result.outcome is Outcome.NOT_ASSIGNED:
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if principal.role is Role.DRIVER
                else grpc.StatusCode.FAILED_PRECONDITION
            )
            reason, field = NOT_ASSIGNED_REASON, "confirmation.vehicle_id"
        else:
            code, reason = grpc.StatusCode.FAILED_PRECONDITION, SETTLED_REASON
            field = "confirmation.shipment_id"
        await abort_with_reason(
            context,
            code,
            f"{result.reason}; nothing recorded",
            reason,
            {"field": field, "shipment_id": confirmation.shipment_id},
        )

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
        await self._check_against_read_model(principal, confirmation, context)
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
