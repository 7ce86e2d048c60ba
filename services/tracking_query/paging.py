"""Keyset page tokens of ListShipments: where the next page starts, bound to the filters.

A token is base64url (no padding) of ``MAC (16 bytes) || JSON``, where the JSON is
``{"updated_at": ISO 8601 UTC, "shipment_id": str, "filter": fingerprint}``: the sort
key of the last shipment returned and a fingerprint of the filters (and the caller's
scope) it was issued for. The MAC is HMAC-SHA256 (truncated to 128 bits) of the JSON
under the service's page-token key (`Settings.page_token_key_bytes`): a client cannot
forge or edit a token (issue 12, finding 5), so a cursor is always one the service
itself produced. It is opaque but not secret (the JSON is readable), and the tenant
and customer scope always come from the bearer token, never from the page token.

Even a token with a valid MAC is checked field by field (a key leak, or a token of an
older version, must still not reach PostgreSQL with values it refuses): the time must
be a UTC ISO 8601 instant (an offset could push year 1 or 9999 out of range when
the database driver converts it), the shipment id 1 to 128 characters without NUL or
lone surrogate (PostgreSQL refuses both).

Nothing here does I/O; `decode_page_token` raises `PageTokenError` (with a
description for the client) for anything but a token this module produced with the
same key for the same fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

#: Longer tokens are refused before decoding (a real one is ~150 characters).
MAX_TOKEN_LENGTH = 1024
#: As for any id cargotrack accepts (shared.domain.validation.MAX_ID_LENGTH).
MAX_SHIPMENT_ID_LENGTH = 128

_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
#: Bytes of HMAC-SHA256 kept in a token: 128 bits, far beyond guessing.
MAC_BYTES = 16
_NOT_OURS = "is not a page token from a previous response"


def _mac(key: bytes, document: bytes) -> bytes:
    return hmac.new(key, document, hashlib.sha256).digest()[:MAC_BYTES]


def _is_storable_id(value: str) -> bool:
    """1..128 characters PostgreSQL can compare: no NUL, no lone surrogate. (Not the
    stricter rules of request ids: a cursor names a stored row, and a row written by
    another producer than ingest may hold, say, a space, which must not break paging.)"""
    return 0 < len(value) <= MAX_SHIPMENT_ID_LENGTH and not any(
        ch == "\x00" or 0xD800 <= ord(ch) <= 0xDFFF for ch in value
    )


class PageTokenError(ValueError):
    """The page token is malformed or was issued for other filters."""


@dataclass(frozen=True)
class Cursor:
    """The sort key (updated_at DESC, shipment_id DESC) of the last shipment of a page."""

    updated_at: datetime
    shipment_id: str


def encode_page_token(cursor: Cursor, fingerprint: str, key: bytes) -> str:
    """The token for the page after `cursor`, valid only with the same `fingerprint`
    and MAC `key`."""
    if cursor.updated_at.tzinfo is None:
        raise ValueError("cursor.updated_at must be timezone-aware")
    document = {
        "updated_at": cursor.updated_at.astimezone(UTC).isoformat(),
        "shipment_id": cursor.shipment_id,
        "filter": fingerprint,
    }
    raw = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(_mac(key, raw) + raw).decode().rstrip("=")


def decode_page_token(token: str, fingerprint: str, key: bytes) -> Cursor:
    """The cursor in `token`; PageTokenError unless it carries a valid MAC under `key`,
    is well formed and was issued for `fingerprint` (the same filters, tenant and
    customer scope). Never raises anything else, whatever the token holds."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise PageTokenError(f"must be at most {MAX_TOKEN_LENGTH} characters")
    if not _BASE64URL.fullmatch(token):
        raise PageTokenError(_NOT_OURS)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise PageTokenError(_NOT_OURS) from None
    mac, body = raw[:MAC_BYTES], raw[MAC_BYTES:]
    if len(mac) < MAC_BYTES or not hmac.compare_digest(mac, _mac(key, body)):
        raise PageTokenError(_NOT_OURS + " (or was altered)")
    try:
        document = json.loads(body)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        raise PageTokenError(_NOT_OURS) from None
    if not isinstance(document, dict) or set(document) != {"updated_at", "shipment_id", "filter"}:
        raise PageTokenError(_NOT_OURS)
    updated_at, shipment_id, issued_for = (
        document["updated_at"],
        document["shipment_id"],
        document["filter"],
    )
    if not (
        isinstance(updated_at, str)
        and isinstance(shipment_id, str)
        and isinstance(issued_for, str)
        and _is_storable_id(shipment_id)
    ):
        raise PageTokenError(_NOT_OURS)
    if issued_for != fingerprint:
        raise PageTokenError(
            "was issued for other filters: repeat the first request's filters, or start over"
        )
    try:
        moment = datetime.fromisoformat(updated_at)
    except ValueError:
        raise PageTokenError(_NOT_OURS) from None
    # Only UTC, as encoded: an offset could move year 1 or 9999 out of range when the
    # database driver converts it (OverflowError, which used to answer INTERNAL).
    if moment.tzinfo is None or moment.utcoffset() != timedelta(0):
        raise PageTokenError(_NOT_OURS)
    return Cursor(moment, shipment_id)
