"""DispatchService.SubscribeDelays: a dispatcher's live feed of delay alerts.

Contract of one stream (docs/alerts.md has the client's view):

- Only alerts of the caller's tenant (from its token, never from the request),
  matching the filter, in topic order (so in order per shipment).
- Each response carries the alert and a resume token. A new stream with that
  token gets every matching alert after it: at least once (an alert may repeat
  after a resume; `alert.alert_id` identifies it), never a gap.
- No token: alerts from now on; `from_beginning`: from the oldest retained alert.
- Initial metadata (`cargotrack-subscription: live` or `catching-up`) is sent
  as soon as the subscription exists: every alert written after the client
  received it reaches a "from now" stream.
- A malformed token or filter: INVALID_ARGUMENT naming the field
  (`resume_token`, `filter.region`, `filter.kinds[i]`, ...), before anything is
  streamed.
- A subscriber that lets its buffer fill up: RESOURCE_EXHAUSTED; resume with the
  last token received. Server shutdown or a lost Kafka connection during catch-up:
  UNAVAILABLE; resume the same way (on any instance).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from services.dispatch import tokens
from services.dispatch.filters import compile_filter
from services.dispatch.hub import AlertHub, EndReason, HubUnavailable
from shared.auth import current_principal
from shared.domain.validation import Violation
from shared.pb import dispatch_pb2, dispatch_pb2_grpc
from shared.rpc import Context, abort_invalid

log = logging.getLogger(__name__)

RESUME_HINT = "resubscribe with the resume_token of the last alert you received"


class DispatchServicer(dispatch_pb2_grpc.DispatchServiceServicer):
    def __init__(self, hub: AlertHub) -> None:
        self.hub = hub

    async def SubscribeDelays(
        self, request: dispatch_pb2.SubscribeDelaysRequest, context: Context
    ) -> AsyncIterator[dispatch_pb2.SubscribeDelaysResponse]:
        principal = current_principal()
        matcher, violations = compile_filter(request.filter)
        resume_from: tuple[int, ...] | None = None
        if request.resume_token:
            try:
                resume_from = tokens.decode(request.resume_token)
            except tokens.ResumeTokenError as error:
                violations.append(Violation("resume_token", f"malformed resume token: {error}"))
        if violations:
            await abort_invalid(context, violations, "invalid subscription")
        try:
            subscription = await self.hub.subscribe(
                principal.tenant_id,
                matcher,
                resume_from=resume_from,
                from_beginning=request.from_beginning and resume_from is None,
            )
        except tokens.ResumeTokenError as error:
            await abort_invalid(
                context,
                [Violation("resume_token", f"not a token of this alerts topic: {error}")],
                "invalid subscription",
            )
        except HubUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"alerts are unavailable: {error}")
        phase = "catching-up" if subscription.catch_up is not None else "live"
        # Initial metadata now, before any alert: the client knows it is subscribed
        # (a "from now" stream gets every alert written after this point).
        await context.send_initial_metadata((("cargotrack-subscription", phase),))
        log.info(
            "subscriber %s of %s joined (%s)",
            principal.subject,
            principal.tenant_id,
            "resumed" if resume_from else "from beginning" if request.from_beginning else "live",
        )
        try:
            async for delivery in subscription:
                yield dispatch_pb2.SubscribeDelaysResponse(
                    alert=delivery.alert, resume_token=delivery.resume_token
                )
        finally:
            subscription.close()
        reason = subscription.ended
        if context.done():
            return  # the client went away first (e.g. cancelled during shutdown)
        if reason is EndReason.OVERFLOW:
            log.info("subscriber %s too slow: stream ended", principal.subject)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too slow: more than {self.hub.buffer_size} alerts waited for you; {RESUME_HINT}",
            )
        why = "dispatch is shutting down" if reason is EndReason.SHUTDOWN else "Kafka unavailable"
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{why}; {RESUME_HINT}")
