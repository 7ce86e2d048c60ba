"""ListShipments page tokens: round trip, bound to the filters, garbage refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.tracking_query.paging import (
    MAX_TOKEN_LENGTH,
    Cursor,
    PageTokenError,
    decode_page_token,
    encode_page_token,
)
from services.tracking_query.queries import ListFilter, Scope

FINGERPRINT = ListFilter(Scope("acme")).fingerprint()
MOMENT = datetime(2026, 11, 25, 8, 0, 0, 123456, tzinfo=UTC)


def raw_token(document: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")


@given(
    moment=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
    ),
    shipment_id=st.text(min_size=1, max_size=128),
)
def test_a_token_gives_back_its_cursor(moment: datetime, shipment_id: str) -> None:
    cursor = Cursor(moment, shipment_id)
    token = encode_page_token(cursor, FINGERPRINT)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_page_token(token, FINGERPRINT) == cursor


def test_a_token_is_valid_only_for_the_filters_it_was_issued_for() -> None:
    token = encode_page_token(Cursor(MOMENT, "s1"), FINGERPRINT)
    other = ListFilter(Scope("acme"), statuses=(4,)).fingerprint()
    with pytest.raises(PageTokenError, match="other filters"):
        decode_page_token(token, other)


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
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(PageTokenError):
        decode_page_token(token, FINGERPRINT)


def test_a_naive_cursor_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        encode_page_token(Cursor(datetime(2026, 1, 1), "s1"), FINGERPRINT)
