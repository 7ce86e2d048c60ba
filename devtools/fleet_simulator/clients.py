"""The TMS and the drivers' confirmations: unary clients that retry safely.

Every event and confirmation carries an id fixed by the plan (a UUIDv5 of the
shipment, the kind and the attempt), so a retry after UNAVAILABLE or a lost answer
records the fact once downstream. INVALID_ARGUMENT is final: the refusal is logged
with the fields the service named, and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from devtools.fleet_simulator.stats import SimulatorStats
from devtools.fleet_simulator.uplink import Metadata
from shared.auth import Role, mint_token
from shared.pb import delivery_pb2, delivery_pb2_grpc, shipment_pb2, shipment_pb2_grpc
from shared.rpc import field_violations
from shared.runtime import Backoff

__all__ = ["DriverApp", "Tms", "TokenSource", "call_with_retry", "event_id"]

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
CALL_TIMEOUT_S = 10.0
#: The simulator's own namespace for the ids it derives (not the services').
SIMULATOR_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cargotrack:fleet-simulator")


def event_id(tenant: str, shipment_id: str, kind: str, attempt: int = 1) -> str:
    """The id of one planned fact: the same for every retry of it."""
    return str(uuid.uuid5(SIMULATOR_NAMESPACE, f"{tenant}/{shipment_id}/{kind}/{attempt}"))


class TokenSource:
    """Bearer-token metadata for one principal, re-minted before it expires."""

    def __init__(
        self,
        secret: str,
        *,
        role: Role,
        tenant: str,
        subject: str,
        vehicle_id: str | None = None,
        ttl_s: int = 3600,
    ) -> None:
        def mint() -> str:
            return mint_token(
                secret,
                role=role,
                tenant_id=tenant,
                subject=subject,
                vehicle_id=vehicle_id,
                ttl_s=ttl_s,
            )

        self._mint = mint
        self._ttl_s = ttl_s
        self._token = ""
        self._minted_at = 0.0

    def metadata(self) -> Metadata:
        now = time.monotonic()
        if not self._token or now - self._minted_at > self._ttl_s / 2:
            self._token = self._mint()
            self._minted_at = now
        return (("authorization", f"Bearer {self._token}"),)


async def call_with_retry(
    call: Callable[[], Awaitable[T]],
    what: str,
    *,
    backoff_s: tuple[float, float] = (0.2, 5.0),
) -> T:
    """Run `call` until it succeeds; retry RETRYABLE errors after a `Backoff` of
    `backoff_s` = (first, most) seconds, doubling.

    Other errors are raised at once. Retries forever: the caller bounds it with a
    timeout or by cancelling (the simulator's stop).
    """
    backoff = Backoff(*backoff_s)
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE:
                raise
            delay = backoff.next()
            log.info("%s: %s; retrying in %.1fs", what, error.code().name, delay)
        await asyncio.sleep(delay)


def _refusal(error: grpc.aio.AioRpcError) -> str:
    fields = field_violations(error)
    if fields:
        return "; ".join(f"{name}: {why}" for name, why in fields)
    details: str = error.details() or ""
    return details or error.code().name


class Tms:
    """The shipper's transport management system, recording lifecycle events (ops)."""

    def __init__(
        self, channel: grpc.aio.Channel, tokens: TokenSource, stats: SimulatorStats
    ) -> None:
        self._stub = shipment_pb2_grpc.ShipmentEventsServiceStub(channel)
        self._tokens = tokens
        self.stats = stats

    async def record(self, events: Sequence[shipment_pb2.ShipmentEvent]) -> bool:
        """Record `events` (at most 500) in one call; False if the service refused them.

        Retries transient failures (same event ids: safe); raises other errors.
        """
        if not events:
            return True
        request = shipment_pb2.RecordEventsRequest(events=events)
        try:
            await call_with_retry(
                lambda: self._stub.RecordEvents(
                    request, metadata=self._tokens.metadata(), timeout=CALL_TIMEOUT_S
                ),
                "shipment-events",
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            self.stats.events_refused += len(events)
            log.warning(
                "shipment-events refused %d event(s) of %s: %s",
                len(events),
                ", ".join(sorted({e.shipment_id for e in events})),
                _refusal(error),
            )
            return False
        self.stats.events_recorded += len(events)
        return True


class DriverApp:
    """A driver's app confirming deliveries for its own vehicle (driver token)."""

    def __init__(
        self, channel: grpc.aio.Channel, tokens: TokenSource, stats: SimulatorStats
    ) -> None:
        self._stub = delivery_pb2_grpc.DeliveryConfirmationsServiceStub(channel)
        self._tokens = tokens
        self.stats = stats

    async def confirm(self, confirmation: delivery_pb2.DeliveryConfirmation) -> bool:
        """Record one proof of delivery; False if the service refused it."""
        request = delivery_pb2.ConfirmDeliveryRequest(confirmation=confirmation)
        try:
            await call_with_retry(
                lambda: self._stub.ConfirmDelivery(
                    request, metadata=self._tokens.metadata(), timeout=CALL_TIMEOUT_S
                ),
                "delivery-confirmations",
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            self.stats.events_refused += 1
            log.warning(
                "delivery-confirmations refused %s: %s",
                confirmation.shipment_id,
                _refusal(error),
            )
            return False
        self.stats.confirmations += 1
        return True
