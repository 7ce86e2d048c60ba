"""The Kafka record format: an Envelope value plus routing headers.

Every record cargotrack writes has the value `cargotrack.v1.Envelope` (protobuf)
and the headers `ct-schema-type`, `ct-event-id` and `ct-tenant-id`, so a consumer
can route or reject a record without decoding its value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from shared.pb import envelope_pb2

HEADER_SCHEMA_TYPE = "ct-schema-type"
HEADER_EVENT_ID = "ct-event-id"
HEADER_TENANT_ID = "ct-tenant-id"
HEADER_TRACEPARENT = "traceparent"

#: The payload field of Envelope for each schema type cargotrack produces.
PAYLOAD_FIELDS: dict[str, str] = {
    "cargotrack.v1.GpsBatch": "gps_batch",
    "cargotrack.v1.ShipmentEvent": "shipment_event",
    "cargotrack.v1.DeliveryConfirmation": "delivery_confirmation",
    "cargotrack.v1.Alert": "alert",
}
SCHEMA_TYPES: dict[str, str] = {field: schema for schema, field in PAYLOAD_FIELDS.items()}

Headers = list[tuple[str, bytes]]


class PoisonRecord(Exception):
    """A record that cannot be decoded or has an unknown schema; it goes to dead letters."""


def timestamp(moment: datetime) -> Timestamp:
    """A protobuf Timestamp for a tz-aware datetime."""
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def to_datetime(stamp: Timestamp) -> datetime:
    """The tz-aware UTC datetime of a protobuf Timestamp."""
    return stamp.ToDatetime(tzinfo=UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


def headers_for(envelope: envelope_pb2.Envelope) -> Headers:
    """The routing headers that accompany an envelope on Kafka."""
    headers: Headers = [
        (HEADER_SCHEMA_TYPE, envelope.schema_type.encode()),
        (HEADER_EVENT_ID, envelope.event_id.encode()),
        (HEADER_TENANT_ID, envelope.tenant_id.encode()),
    ]
    if envelope.traceparent:
        headers.append((HEADER_TRACEPARENT, envelope.traceparent.encode()))
    return headers


@dataclass(frozen=True)
class EncodedRecord:
    key: bytes
    value: bytes
    headers: Headers


def encode(envelope: envelope_pb2.Envelope, key: str) -> EncodedRecord:
    """Serialise an envelope; sets schema_type from the payload when it is empty.

    Fields this schema does not know (a client built from a newer or a forged .proto
    may send any; CopyFrom carries them along) are discarded first, at every depth:
    only what cargotrack validated is stored, and the record's size is the size of
    known fields."""
    payload = envelope.WhichOneof("payload")
    if payload is None:
        raise ValueError("envelope has no payload")
    envelope.DiscardUnknownFields()
    if not envelope.schema_type:
        envelope.schema_type = SCHEMA_TYPES[payload]
    return EncodedRecord(key.encode(), envelope.SerializeToString(), headers_for(envelope))


def decode(value: bytes | None, headers: Headers | None = None) -> envelope_pb2.Envelope:
    """Parse a record value; raises PoisonRecord when it is not a usable envelope.

    A usable envelope has an event id, a tenant, a known schema type, and the
    payload that schema type names. The header, when present, must agree.
    """
    if value is None:
        raise PoisonRecord("empty value (tombstone)")
    envelope = envelope_pb2.Envelope()
    try:
        envelope.ParseFromString(value)
    except DecodeError as error:
        raise PoisonRecord(f"undecodable envelope: {error}") from None
    field = PAYLOAD_FIELDS.get(envelope.schema_type)
    if field is None:
        raise PoisonRecord(f"unknown schema type {envelope.schema_type!r}")
    if envelope.WhichOneof("payload") != field:
        raise PoisonRecord(f"schema type {envelope.schema_type} without its payload")
    if not envelope.event_id or not envelope.tenant_id:
        raise PoisonRecord("envelope without event id or tenant")
    for name, raw in headers or ():
        if name == HEADER_SCHEMA_TYPE and raw.decode(errors="replace") != envelope.schema_type:
            raise PoisonRecord("schema type header disagrees with the envelope")
    return envelope
