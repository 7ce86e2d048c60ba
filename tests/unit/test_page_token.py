"""ListShipments page tokens: round trip, bound to the filters, MAC'd, garbage refused.

`signed_token` builds a token with a valid MAC around any JSON, so the semantic
checks behind the MAC are tested too (a leaked key, an older token version);
`unsigned_token` is what a client could forge before issue 12 (finding 5).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.tracking_query.paging import (
    MAC_BYTES,
    MAX_TOKEN_LENGTH,
    Cursor,
    PageTokenError,
    decode_page_token,
    encode_page_token,
)
from services.tracking_query.queries import ListFilter, Scope

FINGERPRINT = ListFilter(Scope("acme")).fingerprint()
MOMENT = datetime(2026, 11, 25, 8, 0, 0, 123456, tzinfo=UTC)
KEY = b"k" * 32


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unsigned_token(document: object) -> str:
    """The pre-issue-12 format: base64url of the JSON, no MAC."""
    return b64(json.dumps(document).encode())


def signed_token(document: object, key: bytes = KEY) -> str:
    """Any JSON with a valid MAC, as only the service (or a key holder) can make."""
    body = json.dumps(document).encode()
    return b64(hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES] + body)


def raw_token(document: object) -> str:
    return signed_token(document)


@given(
    moment=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
    ),
    shipment_id=st.text(
        st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
        min_size=1,
        max_size=128,
    ),
)
def test_a_token_gives_back_its_cursor(moment: datetime, shipment_id: str) -> None:
    cursor = Cursor(moment, shipment_id)
    token = encode_page_token(cursor, FINGERPRINT, KEY)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_page_token(token, FINGERPRINT, KEY) == cursor


def test_a_token_is_valid_only_for_the_filters_it_was_issued_for() -> None:
    token = encode_page_token(Cursor(MOMENT, "s1"), FINGERPRINT, KEY)
    other = ListFilter(Scope("acme"), statuses=(4,)).fingerprint()
    with pytest.raises(PageTokenError, match="other filters"):
        decode_page_token(token, other, KEY)


@pytest.mark.parametrize(
    "changed",
    [
        ListFilter(Scope("other-tenant")),
        ListFilter(Scope("acme", customer_id="cust-1")),
        ListFilter(Scope("acme"), statuses=(1,)),
        ListFilter(Scope("acme"), customer_id="cust-1"),
        ListFilter(Scope("acme"), updated_since=MOMENT),
    ],
    ids=["tenant", "customer-scope", "statuses", "customer-filter", "updated-since"],
)
def test_every_filter_and_the_scope_change_the_fingerprint(changed: ListFilter) -> None:
    assert changed.fingerprint() != FINGERPRINT
    assert changed.fingerprint() == ListFilter(**vars(changed)).fingerprint()


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not a token",
        "abc$",
        "abc",  # base64 of two bytes, not JSON
        "A" * (MAX_TOKEN_LENGTH + 1),
        raw_token(["a", "list"]),
        raw_token({"updated_at": MOMENT.isoformat(), "shipment_id": "s1"}),
        raw_token(
            {"updated_at": MOMENT.isoformat(), "shipment_id": "s1", "filter": FINGERPRINT, "x": 1}
        ),
        raw_token({"updated_at": "yesterday", "shipment_id": "s1", "filter": FINGERPRINT}),
        raw_token(
            {"updated_at": "2026-11-25T08:00:00", "shipment_id": "s1", "filter": FINGERPRINT}
        ),
        raw_token({"updated_at": MOMENT.isoformat(), "shipment_id": "", "filter": FINGERPRINT}),
        raw_token({"updated_at": MOMENT.isoformat(), "shipment_id": 7, "filter": FINGERPRINT}),
        raw_token(
            {"updated_at": MOMENT.isoformat(), "shipment_id": "s" * 129, "filter": FINGERPRINT}
        ),
        raw_token(
            {"updated_at": MOMENT.isoformat(), "shipment_id": "s\x00", "filter": FINGERPRINT}
        ),
        raw_token(
            {"updated_at": MOMENT.isoformat(), "shipment_id": "s\ud800", "filter": FINGERPRINT}
        ),
        raw_token(
            {"updated_at": "0001-01-01T00:00:00+05:00", "shipment_id": "s1", "filter": FINGERPRINT}
        ),
        raw_token(
            {"updated_at": "9999-12-31T23:59:59-05:00", "shipment_id": "s1", "filter": FINGERPRINT}
        ),
        raw_token(
            {"updated_at": "10000-01-01T00:00:00+00:00", "shipment_id": "s1", "filter": FINGERPRINT}
        ),
        b64(b"\xff" * MAC_BYTES + b"\xfe\xff{"),
    ],
    ids=[
        "empty",
        "spaces",
        "non-base64url",
        "not-json",
        "too-long",
        "json-list",
        "missing-key",
        "extra-key",
        "bad-time",
        "naive-time",
        "empty-id",
        "id-not-text",
        "id-too-long",
        "id-with-nul",
        "id-with-lone-surrogate",
        "year-1-with-offset",
        "year-9999-with-offset",
        "year-10000",
        "bad-mac-and-not-utf8",
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(PageTokenError):
        decode_page_token(token, FINGERPRINT, KEY)


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59+00:00"])
def test_extreme_but_utc_times_decode(moment: str) -> None:
    """Year 1 and 9999 in UTC are representable everywhere (datetime, asyncpg, PostgreSQL)."""
    token = raw_token({"updated_at": moment, "shipment_id": "s1", "filter": FINGERPRINT})
    assert decode_page_token(token, FINGERPRINT, KEY).updated_at.year in (1, 9999)


def test_a_forged_or_altered_token_is_refused() -> None:
    document = {"updated_at": MOMENT.isoformat(), "shipment_id": "s1", "filter": FINGERPRINT}
    with pytest.raises(PageTokenError, match="altered"):
        decode_page_token(unsigned_token(document), FINGERPRINT, KEY)
    with pytest.raises(PageTokenError, match="altered"):
        decode_page_token(signed_token(document, key=b"another key" * 3), FINGERPRINT, KEY)
    genuine = base64.urlsafe_b64decode(signed_token(document) + "==")
    altered = genuine.replace(b'"s1"', b'"s2"')
    assert altered != genuine
    with pytest.raises(PageTokenError, match="altered"):
        decode_page_token(b64(altered), FINGERPRINT, KEY)
    assert decode_page_token(b64(genuine), FINGERPRINT, KEY) == Cursor(MOMENT, "s1")


@given(st.binary(max_size=300))
def test_any_bytes_are_refused_with_page_token_error_only(raw: bytes) -> None:
    with pytest.raises(PageTokenError):
        decode_page_token(b64(raw), FINGERPRINT, KEY)


def test_a_naive_cursor_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        encode_page_token(Cursor(datetime(2026, 1, 1), "s1"), FINGERPRINT, KEY)
