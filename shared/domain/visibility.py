"""Who sees which fields of a shipment: the one decision every reader goes through.

Issue 12, finding 2: a customer saw the vehicle's live position, its id and the
driver's id from ASSIGNED on, before anyone had picked the goods up (the van was then
serving other customers). The rule now: what a caller sees is a pure function of its
**audience** (derived from the token's role, or none for the public tracking page)
and the shipment's **status** at the moment of reading. The table is
`visible_fields` / `visible_timeline`; docs/query.md ("Visibility") prints the same
table, and tests/unit/test_visibility.py checks every cell of it against this code
(it parses the doc's table, so the two cannot drift apart).

The live part of a shipment (the vehicle's position, the progress along the route,
the vehicle and driver ids, the ETA) is shown to a customer only while the goods are
on the way to it: PICKED_UP, IN_TRANSIT, OUT_FOR_DELIVERY. Before pickup the van
carries other customers' goods; after delivery (or a failed attempt, when the van
carries on with its round) where it goes is none of this customer's business. The
public (anyone holding the tracking token: the tracking page) never sees a vehicle id,
driver or customer; it sees the destination, and while the goods are on the way the
ETA, the progress and the planned route up to its own destination (cut there by the
reader: `clip_route`), and the vehicle's position only while it is in transit or out
for delivery (issue 15). Back-office matters
(anomalies, event ids, the planned route, which can pass other customers' stops) are
staff-only.

Nothing here does I/O; `redact_shipment` / `redact_timeline` clear fields of
generated messages in place and return them.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from typing import TypeAlias

from google.protobuf.message import Message

from shared.pb import shipment_pb2, tracking_pb2

Status: TypeAlias = shipment_pb2.ShipmentStatus.ValueType


class Audience(enum.StrEnum):
    """Whom a reader answers. Roles map onto these (services decide which roles may
    call at all: drivers read nothing in tracking-query)."""

    #: ops, shipper, dispatcher: the tenant's own staff.
    STAFF = "staff"
    #: A customer token: its own shipments only.
    CUSTOMER = "customer"
    #: No token, a tracking token: the public tracking page.
    PUBLIC = "public"


#: The goods are on their way to the customer: the live fields are shown.
ON_THE_WAY = frozenset(
    {
        shipment_pb2.SHIPMENT_STATUS_PICKED_UP,
        shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT,
        shipment_pb2.SHIPMENT_STATUS_OUT_FOR_DELIVERY,
    }
)
ALL_STATUSES = frozenset(shipment_pb2.ShipmentStatus.values())

#: Every field of the Shipment message (the staff view).
SHIPMENT_FIELDS = frozenset(field.name for field in tracking_pb2.Shipment.DESCRIPTOR.fields)
#: Every field of a TimelineEntry.
TIMELINE_FIELDS = frozenset(field.name for field in tracking_pb2.TimelineEntry.DESCRIPTOR.fields)

#: Fields a customer sees of its own shipment in every status.
_CUSTOMER_ALWAYS = frozenset(
    {
        "shipment_id",
        "customer_id",
        "status",
        "origin",
        "destination",
        "promised_window",
        "reference",
        "created_at",
        "updated_at",
        "delivered_at",
        "tracking_token",
        "delivery_attempts",
    }
)
#: Fields the public sees in every status (the PublicShipment message's own fields).
_PUBLIC_ALWAYS = frozenset(
    {"status", "reference", "promised_window", "delivered_at", "updated_at", "destination"}
)
#: Shown to a customer only while the goods are on the way.
_CUSTOMER_ON_THE_WAY = frozenset({"vehicle_id", "driver_id", "last_position", "progress", "eta"})
#: Shown to the public only while the goods are on the way.
_PUBLIC_ON_THE_WAY = frozenset({"eta", "progress", "planned_route"})
#: The vehicle is moving towards the recipient: the public sees where it is.
MOVING = frozenset(
    {shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT, shipment_pb2.SHIPMENT_STATUS_OUT_FOR_DELIVERY}
)
_PUBLIC_MOVING = frozenset({"last_position"})

#: Subfields cleared inside a visible field (the proof names the vehicle that confirmed).
HIDDEN_SUBFIELDS: dict[Audience, dict[str, frozenset[str]]] = {
    Audience.STAFF: {},
    Audience.CUSTOMER: {"proof": frozenset({"vehicle_id"})},
    Audience.PUBLIC: {},
}


def visible_fields(audience: Audience, status: Status) -> frozenset[str]:
    """The Shipment fields `audience` may see of a shipment in `status`.

    Staff see every field in every status. A customer sees `_CUSTOMER_ALWAYS`, plus the
    live fields while ON_THE_WAY, plus the proof (without its vehicle id) once
    DELIVERED. The public sees `_PUBLIC_ALWAYS`, plus ETA, progress and (clipped)
    route while ON_THE_WAY, plus the vehicle's position while MOVING. A
    field not listed is cleared, whatever the stored state holds. Total: every
    (audience, status number) has an answer, an unknown status the most restrictive.
    """
    if audience is Audience.STAFF:
        return SHIPMENT_FIELDS
    on_the_way = status in ON_THE_WAY
    if audience is Audience.CUSTOMER:
        fields = _CUSTOMER_ALWAYS
        if on_the_way:
            fields |= _CUSTOMER_ON_THE_WAY
        if status == shipment_pb2.SHIPMENT_STATUS_DELIVERED:
            fields |= {"proof"}
        return fields
    fields = _PUBLIC_ALWAYS | (_PUBLIC_ON_THE_WAY if on_the_way else frozenset())
    return fields | (_PUBLIC_MOVING if status in MOVING else frozenset())


def visible_timeline(audience: Audience) -> tuple[frozenset[str], bool]:
    """(the TimelineEntry fields `audience` sees, whether it sees anomaly entries).

    Staff see everything, anomalies included (marked). A customer sees kind, times,
    status and detail (detail texts never name a vehicle, driver or person: see
    shared.domain.tracking), without event ids and without the entries recorded as
    anomalies. The public sees kind, times and status only.
    """
    if audience is Audience.STAFF:
        return TIMELINE_FIELDS, True
    basic = frozenset({"kind", "occurred_at", "recorded_at", "status"})
    if audience is Audience.CUSTOMER:
        return basic | {"detail"}, False
    return basic, False


def redact_shipment(message: tracking_pb2.Shipment, audience: Audience) -> tracking_pb2.Shipment:
    """Clear, in place, every field `audience` may not see of `message` (by its own
    status); returns `message`."""
    allowed = visible_fields(audience, message.status)
    generic: Message = message  # field names come from the descriptor, as str
    for field in tracking_pb2.Shipment.DESCRIPTOR.fields:
        if field.name not in allowed:
            generic.ClearField(field.name)
    for name, subfields in HIDDEN_SUBFIELDS[audience].items():
        if generic.HasField(name):
            inner: Message = getattr(message, name)
            for subfield in subfields:
                inner.ClearField(subfield)
    return message


def redact_timeline(
    entries: Iterable[tracking_pb2.TimelineEntry], audience: Audience
) -> list[tracking_pb2.TimelineEntry]:
    """The entries `audience` may see, each cleared of the fields it may not see (in place)."""
    fields, anomalies = visible_timeline(audience)
    shown = []
    for entry in entries:
        if entry.anomaly and not anomalies:
            continue
        generic: Message = entry
        for field in tracking_pb2.TimelineEntry.DESCRIPTOR.fields:
            if field.name not in fields:
                generic.ClearField(field.name)
        shown.append(entry)
    return shown


def clip_route(
    route: Sequence[tuple[float, float]], destination: tuple[float, float]
) -> list[tuple[float, float]]:
    """The route's points up to the one nearest `destination` (inclusive), then the
    destination itself (unless that point is it): what the public sees of a
    multi-drop round's planned route. The stops after this shipment's are other
    customers' business. Empty in, empty out."""
    if not route:
        return []
    lat, lon = destination
    scale = math.cos(math.radians(lat))
    nearest = min(
        range(len(route)),
        key=lambda i: (route[i][0] - lat) ** 2 + ((route[i][1] - lon) * scale) ** 2,
    )
    clipped = list(route[: nearest + 1])
    return clipped if clipped[-1] == (lat, lon) else [*clipped, (lat, lon)]
