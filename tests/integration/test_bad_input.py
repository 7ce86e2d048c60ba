"""Well-encoded but malformed input (issue 12, finding 5), against the real query service.

Page tokens with out-of-range times or ids PostgreSQL refuses, forged page tokens, and
correctly signed bearer tokens whose claims have the wrong JSON type or shape: each
must answer INVALID_ARGUMENT or UNAUTHENTICATED, never INTERNAL. Before issue 12 the
odd values answered INTERNAL and a forged page token was accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import jwt
import pytest

from services.tracking_query.paging import MAC_BYTES
from services.tracking_query.queries import ListFilter, Scope
from shared.config import DEV_JWT_SECRET
from shared.pb import tracking_pb2, tracking_pb2_grpc
from tests.ingest_helpers import running_service
from tests.integration.test_tracking_query import (
    OPS,
    TENANT,
    Query,
    assert_invalid,
    project,
    query_settings,
    rpc_error,
    shipment_log,
)
from tests.projection_helpers import prepare

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def query(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> AsyncIterator[Query]:
    settings = query_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    await prepare(settings)
    async with running_service("tracking-query", settings) as service:
        yield Query(settings, service, tracking_pb2_grpc.TrackingServiceStub(service.channel))


def page_token(query: Query, updated_at: str, shipment_id: str, *, signed: bool = True) -> str:
    """A page token for an unfiltered staff listing of TENANT, MAC'd with the service's key
    (what a key holder could make) or, unsigned, what any client could forge."""
    document = {
        "updated_at": updated_at,
        "shipment_id": shipment_id,
        "filter": ListFilter(Scope(TENANT)).fingerprint(),
    }
    body = json.dumps(document).encode()
    key = query.settings.page_token_key_bytes()
    assert key is not None
    mac = hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES] if signed else b""
    return base64.urlsafe_b64encode(mac + body).decode().rstrip("=")


async def test_page_tokens_with_absurd_cursors_are_invalid_and_extremes_are_fine(
    query: Query,
) -> None:
    await project(query.settings, shipment_log(TENANT, "s1", steps=1))

    async def listing(token: str) -> tracking_pb2.ListShipmentsResponse:
        request = tracking_pb2.ListShipmentsRequest(page_token=token)
        reply: tracking_pb2.ListShipmentsResponse = await query.stub.ListShipments(
            request, metadata=OPS, timeout=10
        )
        return reply

    # Extreme but representable positions: the listing simply starts there.
    assert [
        s.shipment_id
        for s in (await listing(page_token(query, "9999-12-31T23:59:59+00:00", "zzz"))).shipments
    ] == ["s1"]
    assert (await listing(page_token(query, "0001-01-01T00:00:00+00:00", "s1"))).shipments == []
    for updated_at, shipment_id in [
        ("0001-01-01T00:00:00+05:00", "s1"),  # year 1 becomes year 0 in UTC
        ("9999-12-31T23:59:59-05:00", "s1"),  # year 9999 becomes 10000 in UTC
        ("2026-01-01T00:00:00+00:00", "s\x00"),
        ("2026-01-01T00:00:00+00:00", "s\ud800"),
    ]:
        await assert_invalid(listing(page_token(query, updated_at, shipment_id)), "page_token")
    # A forged token (no MAC, or someone else's) is refused however plausible it is.
    forged = page_token(query, "2026-01-01T00:00:00+00:00", "s1", signed=False)
    await assert_invalid(listing(forged), "page_token")


def signed_bearer(**claims: Any) -> tuple[tuple[str, str], ...]:
    """A bearer token signed with the development key, holding these claims over valid
    defaults (so only the odd claim is wrong)."""
    now = int(time.time())
    document: dict[str, Any] = {
        "sub": "someone",
        "tenant": TENANT,
        "role": "customer",
        "customer_id": "cust-1",
        "iss": "cargotrack",
        "aud": "cargotrack",
        "iat": now,
        "exp": now + 600,
    }
    document.update(claims)
    token = jwt.encode(document, DEV_JWT_SECRET, algorithm="HS256")
    return (("authorization", f"Bearer {token}"),)


#: One odd claim each, over valid defaults (one service for all: starting one per case
#: cost 2 s each).
ODD_CLAIMS: list[dict[str, Any]] = [
    {"customer_id": 42},
    {"customer_id": ["cust-1"]},
    {"customer_id": {"id": "cust-1"}},
    {"customer_id": True},
    {"customer_id": "cust\x00-1"},
    {"customer_id": "cust\ud800"},
    {"customer_id": "c" * 129},
    {"tenant": 7},
    {"tenant": ["acme"]},
    {"role": ["customer"]},
    {"role": 3},
    {"role": "driver", "vehicle_id": 12},
    {"role": "ops", "vehicle_id": {"x": 1}},
]


async def test_signed_tokens_with_claims_of_the_wrong_type_are_unauthenticated(
    query: Query,
) -> None:
    for claims in ODD_CLAIMS:
        metadata = signed_bearer(**claims)
        for call in (
            query.stub.GetShipment(
                tracking_pb2.GetShipmentRequest(shipment_id="s1"), metadata=metadata
            ),
            query.stub.ListShipments(tracking_pb2.ListShipmentsRequest(), metadata=metadata),
        ):
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (claims, error)
