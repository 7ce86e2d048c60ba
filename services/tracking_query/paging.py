"""Keyset page tokens of ListShipments: where the next page starts, bound to the filters.

A token is base64url (no padding) of compact JSON
``{"updated_at": ISO 8601, "shipment_id": str, "filter": fingerprint}``: the sort key
of the last shipment returned and a fingerprint of the filters (and the caller's
scope) it was issued for. It is opaque to clients but not secret and not signed: a
forged token can only name a position in a listing the caller may read anyway,
because the tenant and customer scope always come from the bearer token, never from
the page token.

Nothing here does I/O; `decode_page_token` raises `PageTokenError` (with a
description for the client) for anything but a token this module produced for the
same fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import datetime

#: Longer tokens are refused before decoding (a real one is ~150 characters).
MAX_TOKEN_LENGTH = 1024
#: As for any id cargotrack accepts (shared.domain.validation.MAX_ID_LENGTH).
MAX_SHIPMENT_ID_LENGTH = 128

_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class PageTokenError(ValueError):
    """The page token is malformed or was issued for other filters."""


@dataclass(frozen=True)
class Cursor:
    """The sort key (updated_at DESC, shipment_id DESC) of the last shipment of a page."""

    updated_at: datetime
    shipment_id: str


def encode_page_token(cursor: Cursor, fingerprint: str) -> str:
    """The token for the page after `cursor`, valid only with the same `fingerprint`."""
    if cursor.updated_at.tzinfo is None:
        raise ValueError("cursor.updated_at must be timezone-aware")
    document = {
        "updated_at": cursor.updated_at.isoformat(),
        "shipment_id": cursor.shipment_id,
        "filter": fingerprint,
    }
    raw = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, fingerprint: str) -> Cursor:
    """The cursor in `token`; PageTokenError unless it is well formed and was issued
    for `fingerprint` (the same filters, tenant and customer scope)."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise PageTokenError(f"must be at most {MAX_TOKEN_LENGTH} characters")
    if not _BASE64URL.fullmatch(token):
        raise PageTokenError("is not a page token from a previous response")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        document = json.loads(raw)
    except (binascii.Error, ValueError):
        raise PageTokenError("is not a page token from a previous response") from None
    if not isinstance(document, dict) or set(document) != {"updated_at", "shipment_id", "filter"}:
        raise PageTokenError("is not a page token from a previous response")
    updated_at, shipment_id, issued_for = (
        document["updated_at"],
        document["shipment_id"],
        document["filter"],
    )
    if not (
        isinstance(updated_at, str)
        and isinstance(shipment_id, str)
        and isinstance(issued_for, str)
        and 0 < len(shipment_id) <= MAX_SHIPMENT_ID_LENGTH
    ):
        raise PageTokenError("is not a page token from a previous response")
    if issued_for != fingerprint:
        raise PageTokenError(
            "was issued for other filters: repeat the first request's filters, or start over"
        )
    try:
        moment = datetime.fromisoformat(updated_at)
    except ValueError:
        raise PageTokenError("is not a page token from a previous response") from None
    if moment.tzinfo is None:
        raise PageTokenError("is not a page token from a previous response")
    return Cursor(moment, shipment_id)
