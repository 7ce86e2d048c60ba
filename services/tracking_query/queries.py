"""The query service's reads of the tracking projection (SQL: shared/readmodel/shipments.py).

Every read takes a `Scope`, built from the caller's verified token: the tenant, and
for a customer its customer id. A shipment outside the scope reads exactly like one
that does not exist (None, or absent from a listing), so the service can answer
NOT_FOUND without telling which. Only `by_tracking_token` reads across tenants: the
public tracking token is the secret.

Statements are parameterized (shared/readmodel/shipments.py holds them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.tracking_query.paging import Cursor
from shared import statecodec
from shared.auth import Principal, Role
from shared.db import Connection
from shared.domain.tracking import ShipmentState
from shared.domain.visibility import Audience, redact_shipment, redact_timeline
from shared.pb import tracking_pb2
from shared.readmodel import messages, shipment_tracking, shipments
from shared.readmodel.rows import TrackingView


@dataclass(frozen=True, slots=True)  # slots: the response cache keeps one per key
class Scope:
    """What a caller may read: one tenant and, if `customer_id` is set, only that
    customer's shipments within it."""

    tenant_id: str
    customer_id: str | None = None

    @property
    def audience(self) -> Audience:
        """Whose view of a shipment this caller gets (shared.domain.visibility): a
        customer's when the scope is one customer's, else the tenant staff's."""
        return Audience.CUSTOMER if self.customer_id is not None else Audience.STAFF

    @classmethod
    def of(cls, principal: Principal) -> Scope:
        """The scope of a token: its tenant; a customer additionally its own shipments."""
        if principal.role is Role.CUSTOMER:
            assert principal.customer_id, "verify_token guarantees a customer's id"
            return cls(principal.tenant_id, principal.customer_id)
        return cls(principal.tenant_id)


@dataclass(frozen=True)
class ShipmentView:
    """One stored shipment: its folded state and its live tracking row (None if none).

    Read with ``whole_state=False``, `state` lacks what `message()` does not show
    (`_NOT_IN_MESSAGE`: the timeline and the applied event ids, which were half of
    decoding a state): use such a view for `message()` and `cursor` only.
    """

    state: ShipmentState
    tracking: TrackingView | None
    #: The row's updated_at column: the sort key of listings.
    updated_at: datetime

    def message(self) -> tracking_pb2.Shipment:
        """Every field (the staff view); callers answer with `message_for`."""
        return messages.shipment_message(self.state, self.tracking)

    def message_for(self, audience: Audience) -> tracking_pb2.Shipment:
        """The fields `audience` may see, as shared.domain.visibility decides."""
        return redact_shipment(self.message(), audience)

    def timeline_for(self, audience: Audience) -> list[tracking_pb2.TimelineEntry]:
        """The timeline entries and fields `audience` may see (needs a whole-state view)."""
        return redact_timeline(messages.timeline_messages(self.state), audience)

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.updated_at, self.state.shipment_id)


@dataclass(frozen=True)
class ListFilter:
    """The filters of one listing, with the scope they apply in.

    `statuses` is sorted and without repeats; empty means every status.
    `updated_since` is inclusive.
    """

    scope: Scope
    statuses: tuple[int, ...] = ()
    customer_id: str | None = None
    updated_since: datetime | None = None

    def fingerprint(self) -> str:
        """A short digest of everything that decides which rows the listing holds; a
        page token is valid only for the fingerprint it was issued for."""
        document = {
            "tenant": self.scope.tenant_id,
            "scope_customer": self.scope.customer_id,
            "statuses": list(self.statuses),
            "customer": self.customer_id,
            "since": self.updated_since.isoformat() if self.updated_since else None,
        }
        canonical = json.dumps(document, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:24]


#: State fields a Shipment message does not show (the timeline has its own RPC).
_NOT_IN_MESSAGE = ("timeline", "applied_event_ids")


def _view(row: asyncpg.Record | Mapping[str, Any], whole_state: bool = True) -> ShipmentView:
    """A row of shared.readmodel.shipments' query reads as a view."""
    data = json.loads(row["state"])
    if not whole_state:
        for name in _NOT_IN_MESSAGE:
            data.pop(name, None)
    state = statecodec.decode_as(ShipmentState, data)
    return ShipmentView(state, shipment_tracking.view_of(row), row["updated_at"])


async def get_shipment(
    connection: Connection, scope: Scope, shipment_id: str, *, whole_state: bool = True
) -> ShipmentView | None:
    """The shipment with its live tracking; None if absent or outside the scope.
    `whole_state=False`: a view for `message()` only (see ShipmentView)."""
    row = await shipments.fetch_with_tracking(
        connection, scope.tenant_id, shipment_id, scope.customer_id
    )
    return _view(row, whole_state) if row is not None else None


async def by_tracking_token(connection: Connection, token: str) -> ShipmentView | None:
    """The shipment whose public tracking token is `token`, in any tenant; None if none."""
    row = await shipments.fetch_by_tracking_token(connection, token)
    return _view(row) if row is not None else None


async def list_shipments(
    connection: Connection,
    filters: ListFilter,
    after: Cursor | None,
    limit: int,
    *,
    whole_state: bool = True,
) -> list[ShipmentView]:
    """Up to `limit` shipments matching `filters`, newest change first
    (updated_at DESC, shipment_id DESC), starting strictly after `after`.
    `whole_state=False`: views for `message()` and `cursor` only (see ShipmentView).

    Served by the index shipments_by_update (see shared.readmodel.shipments.fetch_page):
    a page costs the same however deep it is. Empty when nothing (more) matches.
    """
    customers = [filters.scope.customer_id, filters.customer_id]
    rows = await shipments.fetch_page(
        connection,
        filters.scope.tenant_id,
        customer_ids=[c for c in customers if c is not None],
        statuses=filters.statuses,
        updated_since=filters.updated_since,
        after=(after.updated_at, after.shipment_id) if after is not None else None,
        limit=limit,
    )
    return [_view(row, whole_state) for row in rows]
