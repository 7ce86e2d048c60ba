"""Bad input against every gRPC endpoint: a clear status, no hang, still serving.

Every method of every cargotrack gRPC service (read from the proto descriptors, so
a new method is fuzzed without touching this file) gets raw bytes sent through a
generic channel with identity serializers:

- Hypothesis-built messages of the request type with boundary values (empty and
  over-long ids and texts, NaN and infinite coordinates, extreme integers, unknown
  enum numbers, timestamps outside any range, 1001 GPS points, ...);
- random bytes; valid messages truncated or with flipped bytes; messages of other
  types (wrong wire types); protobuf nested a thousand levels deep;
- a message over the size limit;
- each with a valid token for the method, no token, a forged token or a role
  without access;
- structurally valid but semantically absurd input (issue 12, finding 5): page
  tokens that decode to JSON of the right shape, signed with the service's own key
  or not, holding times out of range or with offsets, ids with NUL, lone surrogates
  or over-long, wrong JSON types; and correctly signed bearer tokens whose claims
  have the wrong JSON type or an impossible value. These must answer
  INVALID_ARGUMENT (cursors) or UNAUTHENTICATED (claims), never INTERNAL.

The answer must be one of the statuses a client can act on (OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND), never UNKNOWN
or INTERNAL, and within the deadline (a server stream that stays open on a valid
request is fine: that is its contract). Afterwards every endpoint must still
answer a valid request and report SERVING.

`CARGOTRACK_FUZZ_EXAMPLES` sets the examples per endpoint (default 25; 300 in the
full run, CARGOTRACK_FAULTS_FULL=1, see docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.workload import varint
from services.tracking_query.paging import MAC_BYTES
from services.tracking_query.queries import ListFilter, Scope
from shared import tracking_store as store
from shared.auth import Role
from shared.config import DEV_JWT_SECRET
from shared.db import connect
from shared.envelopes import utc_now
from shared.pb import (
    delivery_pb2,
    delivery_pb2_grpc,
    dispatch_pb2,
    dispatch_pb2_grpc,
    gps_pb2,
    gps_pb2_grpc,
    shipment_pb2,
    shipment_pb2_grpc,
    tracking_pb2,
    tracking_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from tests.faults.inputs import FUZZ_EXAMPLES, messages, nested
from tests.ingest_helpers import (
    Metadata,
    bearer,
    delivery_confirmation,
    gps_batch,
    running_service,
    service_settings,
    shipment_event,
)
from tests.projection_helpers import fold_log, lifecycle

pytestmark = pytest.mark.timeout(600)

EXAMPLES = FUZZ_EXAMPLES
TENANT = "acme"
VEHICLE = "veh-fuzz"
CUSTOMER = "cust-1"
UNARY_TIMEOUT_S = 5.0
#: A server stream still open after this is open by contract (Watch, Subscribe), if
#: the server committed to it: see _server_stream_outcome.
STREAM_WINDOW_S = 0.3
#: How long a server stream may take to commit (first message or initial metadata).
COMMIT_TIMEOUT_S = 5.0

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
    }
)


@dataclass(frozen=True)
class Endpoint:
    service: str  # key of the running service
    method: MethodDescriptor
    metadata: Metadata  # a token that may call it

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def request(self) -> Descriptor:
        return self.method.input_type

    def __str__(self) -> str:
        return self.path


_SERVICES: dict[str, tuple[Any, Metadata]] = {
    "gps-ingest": (
        gps_pb2.DESCRIPTOR.services_by_name["GpsIngestService"],
        bearer(Role.DRIVER, tenant=TENANT, vehicle_id=VEHICLE),
    ),
    "shipment-events": (
        shipment_pb2.DESCRIPTOR.services_by_name["ShipmentEventsService"],
        bearer(Role.SHIPPER, tenant=TENANT),
    ),
    "delivery-confirmations": (
        delivery_pb2.DESCRIPTOR.services_by_name["DeliveryConfirmationsService"],
        bearer(Role.OPS, tenant=TENANT),
    ),
    "tracking-query": (
        tracking_pb2.DESCRIPTOR.services_by_name["TrackingService"],
        bearer(Role.OPS, tenant=TENANT),
    ),
    "dispatch": (
        dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"],
        bearer(Role.DISPATCHER, tenant=TENANT),
    ),
    "webhooks": (
        webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"],
        bearer(Role.DISPATCHER, tenant=TENANT),
    ),
}
#: Services that need the database (on the fuzz's own schema).
_WITH_DATABASE = ("tracking-query", "webhooks")
ENDPOINTS = [
    Endpoint(name, method, metadata)
    for name, (service, metadata) in _SERVICES.items()
    for method in service.methods
]
OTHER_CALLERS: list[Metadata] = [
    (),
    (("authorization", "Bearer not-a-jwt"),),
    bearer(Role.DRIVER, tenant=TENANT, vehicle_id=VEHICLE, secret="another-key-" + "x" * 32),
    bearer(Role.CUSTOMER, tenant=TENANT, customer_id=CUSTOMER),
    bearer(Role.OPS, tenant="other-tenant"),
    bearer(Role.DRIVER, tenant=TENANT, vehicle_id="someone-else"),
]


# --- the services ------------------------------------------------------------------------


@dataclass
class Fuzzed:
    channels: dict[str, grpc.aio.Channel]
    tracking_token: str
    shipment_id: str
    #: tracking-query's page-token MAC key (so the fuzzer can sign absurd cursors).
    page_token_key: bytes
    #: Hostile calls each endpoint has taken so far (by path).
    hostile_calls: Counter[str] = field(default_factory=Counter)


@pytest.fixture(scope="module")
async def fuzzed(kafka_bootstrap: str, database_url: str) -> AsyncIterator[Fuzzed]:
    """Every gRPC service in-process; tracking-query on its own schema with one shipment."""
    prefix = f"f{uuid.uuid4().hex[:10]}."
    schema = f"f_{uuid.uuid4().hex[:12]}"
    common = service_settings(kafka_bootstrap, prefix, CARGOTRACK_KAFKA_TIMEOUT_S=5)
    query = service_settings(
        kafka_bootstrap, prefix, DATABASE_URL=database_url, CARGOTRACK_DB_SCHEMA=schema
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            channels = {}
            for name in _SERVICES:
                running = await stack.enter_async_context(
                    running_service(name, query if name in _WITH_DATABASE else common)
                )
                channels[name] = running.channel
            # One shipment to read (the query service migrated the schema at start).
            shipments, _ = fold_log(lifecycle(TENANT, "shp-fuzz", VEHICLE, utc_now()))
            state = shipments[(TENANT, "shp-fuzz")]
            connection = await connect(query.database)
            try:
                await store.save_shipments(connection, [state])
            finally:
                await connection.close()
            key = query.page_token_key_bytes()
            assert key is not None
            yield Fuzzed(channels, state.tracking_token, "shp-fuzz", key)
    finally:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()


# --- sending raw bytes -------------------------------------------------------------------


def _identity(raw: bytes) -> bytes:
    return raw


async def call_raw(
    channel: grpc.aio.Channel,
    endpoint: Endpoint,
    payloads: list[bytes],
    metadata: Metadata,
    window_s: float = STREAM_WINDOW_S,
) -> tuple[grpc.StatusCode | str, str]:
    """Send raw request bytes; (status, details), or ("OPEN", "") for a server stream
    still open after window_s."""
    method = endpoint.method
    path = endpoint.path
    call: Any
    if method.client_streaming:
        call = channel.stream_stream(path, _identity, _identity)(
            iter(payloads), metadata=metadata, timeout=UNARY_TIMEOUT_S
        )
    elif method.server_streaming:
        call = channel.unary_stream(path, _identity, _identity)(
            payloads[0], metadata=metadata, timeout=UNARY_TIMEOUT_S
        )
    else:
        call = channel.unary_unary(path, _identity, _identity)(
            payloads[0], metadata=metadata, timeout=UNARY_TIMEOUT_S
        )
    try:
        if method.server_streaming and not method.client_streaming:
            return await _server_stream_outcome(call, window_s)
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def _server_stream_outcome(call: Any, window_s: float) -> tuple[grpc.StatusCode | str, str]:
    """How a server stream ended; ("OPEN", "") if it is open by contract after
    window_s: the server committed to it (sent its first message, or its initial
    metadata as SubscribeDelays does) and has not ended it. A stream that sends
    nothing for COMMIT_TIMEOUT_S is ("HUNG", ...): a hang, or a failure too slow to
    tell from one, no longer passes as open."""
    reading = asyncio.ensure_future(call.read())
    metadata = asyncio.ensure_future(call.initial_metadata())
    try:
        done, _ = await asyncio.wait({reading}, timeout=window_s)
        if not done:
            await asyncio.wait(
                {reading, metadata}, timeout=COMMIT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if not reading.done():
                # Headers alone: a trailers-only failure completes the call right after.
                done, _ = await asyncio.wait({reading}, timeout=window_s)
                if not done:
                    if metadata.done() and not call.done():
                        return "OPEN", ""
                    return "HUNG", f"nothing from the server in {COMMIT_TIMEOUT_S:g}s"
        if reading.result() is grpc.aio.EOF:
            return await call.code(), await call.details() or ""
        # The first message came: committed; the rest may stay open by contract.
        try:
            async with asyncio.timeout(window_s):
                async for _ in call:
                    pass
        except TimeoutError:
            return "OPEN", ""
        return grpc.StatusCode.OK, ""
    finally:
        call.cancel()
        for task in (reading, metadata):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task


#: What the grpc aio *client* reports when the server ended a client-streaming call
#: (PERMISSION_DENIED, INVALID_ARGUMENT, ...) while the client was still writing: its
#: failed write overwrites the server's status (grpc/grpc#36066). Not the server's.
CLIENT_WRITE_RACE = "Internal error from Core"


def assert_clear(endpoint: Endpoint, outcome: tuple[grpc.StatusCode | str, str]) -> None:
    code, details = outcome
    if code == "OPEN":
        assert endpoint.method.server_streaming, f"{endpoint} hung"
        return
    if (
        code == grpc.StatusCode.INTERNAL
        and details == CLIENT_WRITE_RACE
        and endpoint.method.client_streaming
    ):
        return
    assert code in ALLOWED, f"{endpoint}: {code} {details!r}"


def parses(endpoint: Endpoint, raw: bytes) -> bool:
    try:
        message_factory.GetMessageClass(endpoint.request).FromString(raw)
    except DecodeError:
        return False
    return True


_OTHER_TYPES = [
    gps_pb2.StreamPointsRequest(batch=gps_batch(VEHICLE, 1)),
    shipment_pb2.RecordEventsRequest(events=[shipment_event()]),
    delivery_pb2.ConfirmDeliveryRequest(confirmation=delivery_confirmation()),
    tracking_pb2.ListShipmentsRequest(page_size=3, page_token="x"),
    dispatch_pb2.SubscribeDelaysRequest(resume_token="y", from_beginning=True),
    webhooks_pb2.CreateWebhookRequest(url="https://93.184.215.14/", secret="s" * 40),
]


@st.composite
def raw_requests(draw: st.DrawFn, descriptor: Descriptor) -> bytes:
    kind = draw(st.sampled_from(["message", "message", "bytes", "mutated", "other", "nested"]))
    if kind == "message":
        return draw(messages(descriptor)).SerializeToString()
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    if kind == "other":
        return draw(st.sampled_from(_OTHER_TYPES)).SerializeToString()
    if kind == "nested":
        return nested(draw(st.sampled_from([50, 101, 1000])))
    raw = bytearray(draw(messages(descriptor)).SerializeToString() or b"\x0a\x00")
    if draw(st.booleans()):
        return bytes(raw[: draw(st.integers(0, max(0, len(raw) - 1)))])
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
@settings(
    max_examples=EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
async def test_bad_input_gets_a_clear_status_never_unknown_or_internal(
    fuzzed: Fuzzed, endpoint: Endpoint, data: st.DataObject
) -> None:
    count = data.draw(st.integers(1, 3)) if endpoint.method.client_streaming else 1
    payloads = [data.draw(raw_requests(endpoint.request)) for _ in range(count)]
    metadata = data.draw(st.sampled_from([endpoint.metadata] * 4 + OTHER_CALLERS))
    outcome = await call_raw(fuzzed.channels[endpoint.service], endpoint, payloads, metadata)
    fuzzed.hostile_calls[endpoint.path] += 1
    assert_clear(endpoint, outcome)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
async def test_oversized_nested_and_truncated_requests(fuzzed: Fuzzed, endpoint: Endpoint) -> None:
    channel = fuzzed.channels[endpoint.service]
    huge = b"\x0a" + varint(5 << 20) + b"\x00" * (5 << 20)
    code, _ = await call_raw(channel, endpoint, [huge], endpoint.metadata, window_s=4.0)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for raw in (nested(1000), nested(101), b"\x0a\x05ab", b"\xff" * 16):
        outcome = await call_raw(channel, endpoint, [raw], endpoint.metadata)
        if parses(endpoint, raw):
            assert_clear(endpoint, outcome)  # e.g. nested bytes read as a packed enum list
        else:
            assert outcome[0] == grpc.StatusCode.INVALID_ARGUMENT, (raw[:16], outcome)


async def test_a_gps_stream_answers_valid_batches_before_a_garbage_one(fuzzed: Fuzzed) -> None:
    """Batches before an undecodable message are stored and answered; then the stream
    ends with INVALID_ARGUMENT (not INTERNAL)."""
    stub = gps_pb2_grpc.GpsIngestServiceStub(fuzzed.channels["gps-ingest"])
    base = 10_000 + int(utc_now().timestamp()) % 10_000
    call = stub.StreamPoints(metadata=_SERVICES["gps-ingest"][1], timeout=UNARY_TIMEOUT_S)
    await call.write(gps_pb2.StreamPointsRequest(batch=gps_batch(VEHICLE, base)))
    first = await call.read()
    assert first.outcome == gps_pb2.BATCH_OUTCOME_ACCEPTED
    raw = fuzzed.channels["gps-ingest"].stream_stream(
        "/cargotrack.v1.GpsIngestService/StreamPoints", _identity, _identity
    )
    good = gps_pb2.StreamPointsRequest(batch=gps_batch(VEHICLE, base + 1)).SerializeToString()
    mixed = raw(iter([good, b"\xff\xfe"]), metadata=_SERVICES["gps-ingest"][1], timeout=5)
    answers = []
    code = grpc.StatusCode.OK
    try:
        async for answer in mixed:
            answers.append(gps_pb2.StreamPointsResponse.FromString(answer))
    except grpc.aio.AioRpcError as error:
        code = error.code()
    assert [a.sequence for a in answers] == [base + 1]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


# --- structurally valid, semantically absurd (issue 12, finding 5) ----------------------

#: The fingerprint of an unfiltered staff listing of TENANT (what ListShipments checks).
OPS_LISTING = ListFilter(Scope(TENANT)).fingerprint()
_ODD_IDS = ["s\x00", "\ud800", "a\udfffb", "s" * 129, "", "shp-fuzz", " ", "\u2028"]
_ODD_TIMES = [
    "0001-01-01T00:00:00+00:00",
    "0001-01-01T00:00:00+05:00",
    "9999-12-31T23:59:59.999999+00:00",
    "9999-12-31T23:59:59-23:59",
    "10000-01-01T00:00:00+00:00",
    "0000-01-01T00:00:00+00:00",
    "2026-02-30T00:00:00+00:00",
    "2026-01-01T00:00:00",
    "",
]


@st.composite
def absurd_page_tokens(draw: st.DrawFn, key: bytes) -> tuple[str, bool]:
    """(a page token of the right JSON shape, whether the service must refuse it)."""
    offsets = [timedelta(0), timedelta(hours=23, minutes=59), -timedelta(hours=23, minutes=59)]
    moment = draw(
        st.datetimes(
            min_value=datetime(1, 1, 1),
            max_value=datetime(9999, 12, 31, 23, 59, 59),
            timezones=st.sampled_from([timezone(offset) for offset in offsets]),
        )
    )
    updated_at: object = draw(st.one_of(st.just(moment.isoformat()), st.sampled_from(_ODD_TIMES)))
    shipment_id: object = draw(st.one_of(st.text(max_size=140), st.sampled_from(_ODD_IDS)))
    fingerprint: object = draw(st.one_of(st.just(OPS_LISTING), st.text(max_size=30)))
    if draw(st.integers(0, 9)) == 0:
        updated_at = draw(st.sampled_from([0, None, [moment.isoformat()], {"t": 1}]))
    if draw(st.integers(0, 9)) == 0:
        shipment_id = draw(st.sampled_from([7, None, ["s"], True]))
    document = {"updated_at": updated_at, "shipment_id": shipment_id, "filter": fingerprint}
    body = json.dumps(document).encode()
    signed = draw(st.booleans())
    mac = hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES] if signed else b""
    token = base64.urlsafe_b64encode(mac + body).decode().rstrip("=")
    return token, not (signed and _representable(updated_at, shipment_id, fingerprint))


def _representable(updated_at: object, shipment_id: object, fingerprint: object) -> bool:
    """Whether a signed cursor names a position PostgreSQL can compare (the contract of
    docs/query.md): a UTC time, an id of 1..128 characters without NUL or surrogate."""
    if not (isinstance(updated_at, str) and isinstance(shipment_id, str)):
        return False
    try:
        moment = datetime.fromisoformat(updated_at)
    except ValueError:
        return False
    return (
        fingerprint == OPS_LISTING
        and moment.utcoffset() == timedelta(0)
        and 0 < len(shipment_id) <= 128
        and not any(ch == "\x00" or 0xD800 <= ord(ch) <= 0xDFFF for ch in shipment_id)
    )


@settings(max_examples=EXAMPLES * 4, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
async def test_absurd_page_tokens_are_invalid_argument_never_internal(
    fuzzed: Fuzzed, data: st.DataObject
) -> None:
    token, refused = data.draw(absurd_page_tokens(fuzzed.page_token_key))
    stub = tracking_pb2_grpc.TrackingServiceStub(fuzzed.channels["tracking-query"])
    try:
        await stub.ListShipments(
            tracking_pb2.ListShipmentsRequest(page_token=token),
            metadata=_SERVICES["tracking-query"][1],
            timeout=UNARY_TIMEOUT_S,
        )
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        code = error.code()
    expected = grpc.StatusCode.INVALID_ARGUMENT if refused else grpc.StatusCode.OK
    assert code == expected, token


_ABSURD_CLAIM_VALUES = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    # Impossible for every claim: NUL, a lone surrogate, a control character, too long.
    st.sampled_from(["a\x00b", "\ud800", "x" * 257, "tab\there", "line\u2028break"]),
)


@st.composite
def absurd_bearers(draw: st.DrawFn) -> tuple[Metadata, str]:
    """A bearer token signed with the development key whose claims are valid for its
    role except one, which has the wrong JSON type or an impossible value."""
    role = draw(st.sampled_from(list(Role)))
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "fuzz",
        "tenant": TENANT,
        "role": role.value,
        "iss": "cargotrack",
        "aud": "cargotrack",
        "iat": now,
        "exp": now + 600,
    }
    if role is Role.DRIVER:
        claims["vehicle_id"] = VEHICLE
    if role is Role.CUSTOMER:
        claims["customer_id"] = CUSTOMER
    name = draw(st.sampled_from(["sub", "tenant", "role", "vehicle_id", "customer_id", "exp"]))
    if name == "exp":
        claims["exp"] = draw(st.sampled_from([10**400, 10**13, -(10**30)]))
    else:
        claims[name] = draw(_ABSURD_CLAIM_VALUES)
    token = jwt.encode(claims, DEV_JWT_SECRET, algorithm="HS256")
    return (("authorization", f"Bearer {token}"),), f"{name}={claims[name]!r}"


@pytest.mark.parametrize(
    "endpoint",
    # Public: no bearer token.
    [e for e in ENDPOINTS if e.method.name not in ("TrackByToken", "WatchByToken")],
    ids=str,
)
@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
async def test_signed_tokens_with_absurd_claims_are_unauthenticated(
    fuzzed: Fuzzed, endpoint: Endpoint, data: st.DataObject
) -> None:
    metadata, what = data.draw(absurd_bearers())
    code, details = await call_raw(fuzzed.channels[endpoint.service], endpoint, [b""], metadata)
    if code == grpc.StatusCode.INTERNAL and details == CLIENT_WRITE_RACE:
        assert endpoint.method.client_streaming, what
        return
    assert code == grpc.StatusCode.UNAUTHENTICATED, (what, code, details)


def _valid_calls(fuzzed: Fuzzed) -> dict[str, Callable[[], Any]]:
    channels = fuzzed.channels
    tracking = tracking_pb2_grpc.TrackingServiceStub(channels["tracking-query"])
    dispatch = dispatch_pb2_grpc.DispatchServiceStub(channels["dispatch"])
    ops = bearer(Role.OPS, tenant=TENANT)
    sequence = 20_000 + int(utc_now().timestamp()) % 10_000

    async def stream_points() -> None:
        stub = gps_pb2_grpc.GpsIngestServiceStub(channels["gps-ingest"])
        answers = [
            a
            async for a in stub.StreamPoints(
                iter([gps_pb2.StreamPointsRequest(batch=gps_batch(VEHICLE, sequence))]),
                metadata=_SERVICES["gps-ingest"][1],
                timeout=UNARY_TIMEOUT_S,
            )
        ]
        assert [a.outcome for a in answers] == [gps_pb2.BATCH_OUTCOME_ACCEPTED]

    async def watch() -> None:
        call = tracking.WatchShipment(
            tracking_pb2.WatchShipmentRequest(shipment_id=fuzzed.shipment_id),
            metadata=ops,
            timeout=UNARY_TIMEOUT_S,
        )
        first = await call.read()
        assert first.shipment.shipment_id == fuzzed.shipment_id
        call.cancel()

    async def watch_by_token() -> None:
        call = tracking.WatchByToken(
            tracking_pb2.WatchByTokenRequest(tracking_token=fuzzed.tracking_token),
            timeout=UNARY_TIMEOUT_S,
        )
        first = await call.read()
        assert first.shipment.status
        call.cancel()

    async def subscribe() -> None:
        call = dispatch.SubscribeDelays(
            dispatch_pb2.SubscribeDelaysRequest(), metadata=ops, timeout=UNARY_TIMEOUT_S
        )
        # Open and healthy: no alerts yet, so it is still open after the window.
        try:
            async with asyncio.timeout(STREAM_WINDOW_S):
                async for _ in call:
                    pass
        except TimeoutError:
            return
        assert await call.code() == grpc.StatusCode.OK

    hooks = webhooks_pb2_grpc.WebhookServiceStub(channels["webhooks"])
    created: list[str] = []

    async def create_webhook() -> None:
        # A public IP literal: no DNS needed, allowed without the development setting.
        reply = await hooks.CreateWebhook(
            webhooks_pb2.CreateWebhookRequest(url="https://93.184.215.14/hook"),
            metadata=ops,
            timeout=UNARY_TIMEOUT_S,
        )
        created.append(reply.webhook.webhook_id)

    events = shipment_pb2_grpc.ShipmentEventsServiceStub(channels["shipment-events"])
    confirmations = delivery_pb2_grpc.DeliveryConfirmationsServiceStub(
        channels["delivery-confirmations"]
    )
    shipper = _SERVICES["shipment-events"][1]
    return {
        "/cargotrack.v1.GpsIngestService/StreamPoints": stream_points,
        "/cargotrack.v1.ShipmentEventsService/RecordEvent": lambda: events.RecordEvent(
            shipment_pb2.RecordEventRequest(event=shipment_event("shp-fuzz")),
            metadata=shipper,
            timeout=UNARY_TIMEOUT_S,
        ),
        "/cargotrack.v1.ShipmentEventsService/RecordEvents": lambda: events.RecordEvents(
            shipment_pb2.RecordEventsRequest(events=[shipment_event("shp-fuzz")]),
            metadata=shipper,
            timeout=UNARY_TIMEOUT_S,
        ),
        "/cargotrack.v1.DeliveryConfirmationsService/ConfirmDelivery": (
            lambda: confirmations.ConfirmDelivery(
                delivery_pb2.ConfirmDeliveryRequest(
                    confirmation=delivery_confirmation("shp-fuzz", VEHICLE)
                ),
                metadata=_SERVICES["delivery-confirmations"][1],
                timeout=UNARY_TIMEOUT_S,
            )
        ),
        "/cargotrack.v1.TrackingService/GetShipment": lambda: tracking.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id=fuzzed.shipment_id),
            metadata=ops,
            timeout=UNARY_TIMEOUT_S,
        ),
        "/cargotrack.v1.TrackingService/ListShipments": lambda: tracking.ListShipments(
            tracking_pb2.ListShipmentsRequest(page_size=10), metadata=ops, timeout=UNARY_TIMEOUT_S
        ),
        "/cargotrack.v1.TrackingService/GetTimeline": lambda: tracking.GetTimeline(
            tracking_pb2.GetTimelineRequest(shipment_id=fuzzed.shipment_id),
            metadata=ops,
            timeout=UNARY_TIMEOUT_S,
        ),
        "/cargotrack.v1.TrackingService/WatchShipment": watch,
        "/cargotrack.v1.TrackingService/TrackByToken": lambda: tracking.TrackByToken(
            tracking_pb2.TrackByTokenRequest(tracking_token=fuzzed.tracking_token),
            timeout=UNARY_TIMEOUT_S,
        ),
        "/cargotrack.v1.TrackingService/WatchByToken": watch_by_token,
        "/cargotrack.v1.DispatchService/SubscribeDelays": subscribe,
        "/cargotrack.v1.WebhookService/CreateWebhook": create_webhook,
        "/cargotrack.v1.WebhookService/ListWebhooks": lambda: hooks.ListWebhooks(
            webhooks_pb2.ListWebhooksRequest(page_size=5), metadata=ops, timeout=UNARY_TIMEOUT_S
        ),
        "/cargotrack.v1.WebhookService/ListDeliveries": lambda: hooks.ListDeliveries(
            webhooks_pb2.ListDeliveriesRequest(webhook_id=created[-1]),
            metadata=ops,
            timeout=UNARY_TIMEOUT_S,
        ),
        "/cargotrack.v1.WebhookService/DeleteWebhook": lambda: hooks.DeleteWebhook(
            webhooks_pb2.DeleteWebhookRequest(webhook_id=created[-1]),
            metadata=ops,
            timeout=UNARY_TIMEOUT_S,
        ),
    }


async def test_every_endpoint_still_serves_a_valid_request_after_the_fuzz(
    fuzzed: Fuzzed,
) -> None:
    calls = _valid_calls(fuzzed)
    assert set(calls) == {e.path for e in ENDPOINTS}, "a new endpoint needs a valid call here"
    # Run alone (or before the fuzz), the servers have not been fuzzed yet: do it here.
    for endpoint in ENDPOINTS:
        if fuzzed.hostile_calls[endpoint.path] == 0:
            for raw in (nested(1000), b"\x0a\x05ab", b"\xff" * 16):
                await call_raw(fuzzed.channels[endpoint.service], endpoint, [raw], OTHER_CALLERS[1])
                await call_raw(
                    fuzzed.channels[endpoint.service], endpoint, [raw], endpoint.metadata
                )
            fuzzed.hostile_calls[endpoint.path] += 6
    for path, make in calls.items():
        try:
            await make()
        except grpc.aio.AioRpcError as error:
            pytest.fail(f"{path} no longer serves: {error.code()} {error.details()}")
    for name, channel in fuzzed.channels.items():
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=UNARY_TIMEOUT_S
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
