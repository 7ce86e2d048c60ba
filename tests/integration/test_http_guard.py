"""The http-gateway's public face against what an attacker probing it would send:
per-client rate limits on tracking-token look-ups, stream caps, the CORS policy,
security headers, bounds and slow clients, and a table and a fuzz of nasty requests,
each answered with a clear JSON 4xx, never a 500 or a stack trace.

Real gateway, real tracking-query (PostgreSQL) and dispatch (Kafka) behind it. The
gateway here trusts X-Forwarded-For from 127.0.0.0/8 (where the test client is) in
the tests that need several clients: each test client is then an address of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote_from_bytes, urlencode

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from yarl import URL

from services.http_gateway.app import SERVER_HEADER
from shared.auth import Role
from shared.pb import tracking_pb2_grpc
from tests.ingest_helpers import bearer, running_service
from tests.integration.test_http_gateway import Web, header, running_web, travelling
from tests.integration.test_tracking_query import (
    OPS,
    Query,
    query,  # noqa: F401  (the fixture)
    query_settings,
)
from tests.projection_helpers import fresh_schema, prepare

pytestmark = pytest.mark.timeout(240)

#: Requests the fuzz test sends (CARGOTRACK_FUZZ_EXAMPLES overrides, as for gRPC).
FUZZ_EXAMPLES = int(os.environ.get("CARGOTRACK_FUZZ_EXAMPLES", "150"))

UNKNOWN = "/v1/track/" + "A" * 22
TILES = "https://{s}.tile.example.org/{z}/{x}/{y}.png"
SHOP = "https://shop.example"
#: Small allowances, several clients (by X-Forwarded-For), a short idle timeout.
GUARDED: dict[str, str | float | int] = {
    "CARGOTRACK_GATEWAY_TRUSTED_PROXIES": "127.0.0.0/8",
    "CARGOTRACK_GATEWAY_RATE_PER_S": 0.02,
    "CARGOTRACK_GATEWAY_RATE_BURST": 3,
    "CARGOTRACK_GATEWAY_MAX_STREAMS_PER_CLIENT": 2,
    "CARGOTRACK_GATEWAY_MAX_STREAMS": 3,
    "CARGOTRACK_GATEWAY_CORS_ORIGINS": SHOP,
    "CARGOTRACK_GATEWAY_IDLE_TIMEOUT_S": 1.5,
    "CARGOTRACK_MAP_TILE_URL": TILES,
}
DISPATCHER = header(bearer(Role.DISPATCHER, tenant="tenant-a"))
_addresses = itertools.count(1)


def someone() -> dict[str, str]:
    """The headers of a client never seen before (a fresh address, as the Ingress
    would forward it)."""
    number = next(_addresses)
    return {"X-Forwarded-For": f"198.51.{number // 250}.{number % 250 + 1}"}


@pytest.fixture
async def guarded(
    query: Query,  # noqa: F811
    kafka_bootstrap: str,
    topic_prefix: str,
) -> AsyncIterator[Web]:
    async with running_web(query, kafka_bootstrap, topic_prefix, **GUARDED) as web:
        yield web


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The google.rpc.Status JSON of an error response, checked for its shape."""
    assert response.content_type == "application/json", response.headers
    text = await response.text()
    assert "Traceback" not in text
    status: dict[str, Any] = json.loads(text)
    assert isinstance(status["code"], int)
    assert status["code"] > 0
    assert isinstance(status["message"], str)
    return status


# --- rate limits and stream caps -------------------------------------------------------


async def test_tracking_look_ups_are_rate_limited_per_client(guarded: Web) -> None:
    http = guarded.http
    a = {"X-Forwarded-For": "203.0.113.1"}
    for _ in range(3):  # the burst
        async with http.get(UNKNOWN, headers=a) as response:
            assert response.status == 404
    async with http.get(UNKNOWN, headers=a) as response:
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 1
        status = await error_of(response)
    assert status["code"] == 8  # RESOURCE_EXHAUSTED
    assert "CARGOTRACK_GATEWAY_RATE_PER_S" in status["message"]
    async with http.get(UNKNOWN + ":watch", headers=a) as response:
        assert response.status == 429  # opening a stream is a look-up too
    # An address the client wrote itself, left of what the Ingress appended: ignored.
    spoofed = {"X-Forwarded-For": "192.0.2.77, 203.0.113.1"}
    async with http.get(UNKNOWN, headers=spoofed) as response:
        assert response.status == 429
    async with http.get(UNKNOWN, headers={"X-Forwarded-For": "203.0.113.2"}) as response:
        assert response.status == 404  # another client, its own bucket
    # Bearer routes are not the limiter's: a signed token cannot be guessed.
    async with http.get("/v1/shipments/nope", headers={**a, **header(OPS)}) as response:
        assert response.status == 404


async def test_forwarded_for_is_not_believed_from_an_untrusted_peer(
    query: Query,  # noqa: F811
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    """By default the socket peer is the client: a fresh X-Forwarded-For per request
    does not buy a fresh allowance."""
    limits = {"CARGOTRACK_GATEWAY_RATE_PER_S": 0.02, "CARGOTRACK_GATEWAY_RATE_BURST": 3}
    async with running_web(query, kafka_bootstrap, topic_prefix, **limits) as web:
        statuses = []
        for _ in range(4):
            async with web.http.get(UNKNOWN, headers=someone()) as response:
                statuses.append(response.status)
    assert statuses == [404, 404, 404, 429]


async def test_streams_are_capped_per_client_and_in_total(guarded: Web) -> None:
    http = guarded.http
    path = "/v1/alerts:subscribe"
    a, b, c = ({**DISPATCHER, "X-Forwarded-For": f"203.0.113.{n}"} for n in (11, 12, 13))
    first = await http.get(path, headers=a)
    second = await http.get(path, headers=a)
    try:
        assert (first.status, second.status) == (200, 200)
        async with http.get(path, headers=a) as third:
            assert third.status == 429
            assert int(third.headers["Retry-After"]) >= 1
            status = await error_of(third)
        assert "CARGOTRACK_GATEWAY_MAX_STREAMS_PER_CLIENT" in status["message"]
        async with http.get(path, headers=b) as other:
            assert other.status == 200  # the third stream of the gateway
            async with http.get(path, headers=c) as over:
                assert over.status == 503
                assert "Retry-After" in over.headers
                assert (await error_of(over))["code"] == 14  # UNAVAILABLE
            first.close()  # a slot frees when its stream ends, however it ends
            async with asyncio.timeout(20):
                while True:
                    async with http.get(path, headers=c) as retried:
                        if retried.status == 200:
                            break
                        assert retried.status == 503
                    await asyncio.sleep(0.2)
    finally:
        first.close()
        second.close()


# --- CORS ------------------------------------------------------------------------------


async def test_no_cross_origin_access_by_default(
    query: Query,  # noqa: F811
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    async with running_web(query, kafka_bootstrap, topic_prefix) as web:
        async with web.http.get(UNKNOWN, headers={"Origin": SHOP}) as response:
            assert response.status == 404
            assert "Access-Control-Allow-Origin" not in response.headers
        async with web.http.options(
            "/v1/shipments/s1",
            headers={
                "Origin": SHOP,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        ) as response:
            assert response.status == 204  # answered, and refused: no grant
            assert response.headers["Allow"] == "GET, OPTIONS"
            assert not any(name.startswith("Access-Control-") for name in response.headers)


async def test_listed_origins_may_call_the_api_without_credentials(guarded: Web) -> None:
    http = guarded.http
    preflight = {
        "Origin": SHOP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, last-event-id",
    }
    async with http.options("/v1/alerts:subscribe", headers=preflight) as response:
        assert response.status == 204
        granted = response.headers
        assert granted["Access-Control-Allow-Origin"] == SHOP
        assert set(granted["Access-Control-Allow-Methods"].split(", ")) == {"GET", "POST"}
        assert "authorization" in granted["Access-Control-Allow-Headers"]
        assert "Access-Control-Allow-Credentials" not in granted
    evil = {**preflight, "Origin": "https://evil.example"}
    async with http.options("/v1/alerts:subscribe", headers=evil) as response:
        assert response.status == 204
        assert "Access-Control-Allow-Origin" not in response.headers
    async with http.get("/v1/shipments/nope", headers={**header(OPS), "Origin": SHOP}) as response:
        assert response.status == 404
        assert response.headers["Access-Control-Allow-Origin"] == SHOP
        assert response.headers["Vary"] == "Origin"
        assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]
        assert "Access-Control-Allow-Credentials" not in response.headers
    async with http.options("/v1/nowhere", headers=preflight) as response:
        assert response.status == 404
        await error_of(response)
    async with http.options("/dispatch", headers=preflight) as response:
        assert response.status == 405  # pages are not for other origins
        await error_of(response)


# --- security headers ------------------------------------------------------------------


class _Markup(HTMLParser):
    """Collects what a strict Content-Security-Policy would block in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script" and not names.get("src"):
            self.blocked.append("inline <script>")
        if tag == "style":
            self.blocked.append("<style>")
        self._in_script = tag == "script"
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.blocked.append(f"{tag} {name}=")
            if name in ("src", "href") and value and "//" in value:
                self.blocked.append(f"{tag} {name}={value} (another origin)")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.blocked.append("inline script text")


async def test_every_response_carries_the_security_headers(guarded: Web) -> None:
    token = await travelling(guarded.query)
    responses = {
        f"/t/{token}": 200,
        "/dispatch": 200,
        f"/v1/track/{token}": 200,
        "/v1/shipments/s1": 401,
        "/openapi.json": 200,
        "/healthz": 200,
        "/nowhere": 404,
        "/static/track.js": 200,
        "/static/": 404,
    }
    for path, expected in responses.items():
        async with guarded.http.get(path, headers=someone(), allow_redirects=False) as response:
            assert response.status == expected, path
            found = response.headers
            assert found["Server"] == SERVER_HEADER, path  # no versions to match CVEs on
            assert found["X-Content-Type-Options"] == "nosniff", path
            assert found["X-Frame-Options"] == "DENY", path
            assert found["Referrer-Policy"] == "no-referrer", path
            assert "frame-ancestors 'none'" in found["Content-Security-Policy"], path
            if not path.startswith("/static/"):
                assert "no-store" in found["Cache-Control"], path
            if response.status >= 400:
                await error_of(response)
            if response.content_type == "text/html":
                policy = found["Content-Security-Policy"]
                assert "script-src 'self';" in policy
                assert "img-src 'self' data: https://*.tile.example.org;" in policy
                assert "unsafe" not in policy
                markup = _Markup()
                markup.feed(await response.text())
                assert markup.blocked == [], (path, markup.blocked)
    async with guarded.http.get(f"/v1/track/{token}:watch", headers=someone()) as stream:
        assert stream.status == 200
        assert "no-store" in stream.headers["Cache-Control"]
        assert stream.headers["X-Content-Type-Options"] == "nosniff"
        assert stream.headers["Server"] == SERVER_HEADER


# --- bounds, timeouts, nasty input -----------------------------------------------------


async def raw_request(
    port: int, request: bytes, timeout_s: float = 15.0
) -> tuple[int, dict[str, str], str]:
    """Send bytes as they are on a new connection; (status, headers by lower-case name,
    body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    return status, headers, body.decode("latin-1")


def request_line(target: bytes, method: bytes = b"GET", *headers: bytes) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    return b"\r\n".join([*lines, *headers, b"", b""])


#: Raw requests, what each must be answered with, and whether aiohttp's HTTP parser
#: (not the gateway) answers it: then the body is text, the connection closed.
NASTY: list[tuple[str, bytes, int, bool]] = [
    ("dot-dot", request_line(b"/static/../app.py"), 404, False),
    ("encoded dot-dot", request_line(b"/static/%2e%2e/app.py"), 404, False),
    ("encoded slash", request_line(b"/static/..%2fapp.py"), 404, False),
    ("deeper", request_line(b"/static/vendor/..%2f..%2f..%2fguard.py"), 404, False),
    ("backslash", request_line(b"/static/..\\..\\app.py"), 404, False),
    ("absolute", request_line(b"/static//etc/passwd"), 404, False),
    ("NUL", request_line(b"/static/track.js%00.html"), 404, False),
    ("raw non-UTF-8 track", request_line(b"/v1/track/\xff\xfe"), 400, True),
    ("raw non-UTF-8 page", request_line(b"/t/\xc0\xaf"), 400, True),
    ("encoded non-UTF-8", request_line(b"/v1/track/%ff%fe%c0%af"), 400, False),
    ("method on a page", request_line(b"/dispatch", b"DELETE"), 405, False),
    ("method on the API", request_line(b"/v1/track/x", b"PUT"), 405, False),
    ("TRACE", request_line(b"/", b"TRACE"), 405, False),
    ("PATCH", request_line(b"/v1/shipments", b"PATCH"), 405, False),
    ("invented method", request_line(b"/v1/shipments", b"BREW"), 400, True),
    ("directory", request_line(b"/static/vendor"), 404, False),
    ("missing file", request_line(b"/static/nothing.js"), 404, False),
    ("huge query", request_line(b"/v1/shipments?q=" + b"a" * 5000), 414, False),
    ("huge request line", request_line(b"/v1/shipments?q=" + b"a" * 9000), 400, True),
    ("huge header", request_line(b"/healthz", b"GET", b"X-Big: " + b"a" * 9000), 400, True),
    (
        "too many headers",
        request_line(b"/healthz", b"GET", *(b"X-H%d: 1" % n for n in range(80))),
        400,
        True,
    ),
    ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400, True),
    ("bad length", request_line(b"/healthz", b"GET", b"Content-Length: -5"), 400, True),
]


async def test_nasty_requests_get_a_clear_4xx(guarded: Web) -> None:
    port = guarded.server.http_port
    assert port is not None
    unparsed = {"method": "unparsed", "code": "400"}
    before = REGISTRY.get_sample_value("cargotrack_http_requests_total", unparsed) or 0.0
    problems = []
    for name, request, expected, by_parser in NASTY:
        status, headers, body = await raw_request(port, request)
        content_type = headers.get("content-type", "")
        if status != expected:
            problems.append(f"{name}: {status}, expected {expected}: {body[:200]!r}")
        if headers.get("server") != SERVER_HEADER:  # the parser's answers too
            problems.append(f"{name}: Server header {headers.get('server')!r}")
        if "Traceback" in body or 'File "' in body or "import" in body:
            problems.append(f"{name}: a trace or a source file came back: {body[:200]!r}")
        if not by_parser and not (
            content_type.startswith("application/json") and json.loads(body)["code"] > 0
        ):
            problems.append(f"{name}: not a JSON google.rpc.Status: {content_type} {body[:200]!r}")
    assert not problems, "\n".join(problems)
    # What the parser refused is counted instead of logged with a stack trace; an
    # unknown method on a connection's first request aiohttp logs at debug level only,
    # so it is neither.
    after = REGISTRY.get_sample_value("cargotrack_http_requests_total", unparsed)
    quiet = {"not HTTP", "invented method"}
    assert after == before + sum(1 for name, *_, parsed in NASTY if parsed and name not in quiet)
    async with guarded.http.get("/healthz") as response:
        assert response.status == 200  # and the gateway still serves


async def test_bodies_are_bounded_and_must_be_json(guarded: Web) -> None:
    http = guarded.http
    path = "/v1/alerts:subscribe"
    json_body = {**DISPATCHER, "Content-Type": "application/json"}
    cases = [
        (b"{", json_body, 400),
        (b"[1, 2]", json_body, 400),
        (b'{"filter": {"kinds": ["NOPE"]}}', json_body, 400),
        (b"\xff\xfe{}", json_body, 400),
        (b'{"resumeToken": 5}', json_body, 400),
        (b"{}", {**DISPATCHER, "Content-Type": "text/plain"}, 415),
        (b"{}", {**DISPATCHER, "Content-Type": "application/x-www-form-urlencoded"}, 415),
        (b"{" + b" " * (1 << 20) + b"}", json_body, 413),
    ]
    for body, headers, expected in cases:
        async with http.post(path, data=body, headers=headers) as response:
            assert response.status == expected, body[:40]
            status = await error_of(response)
            if expected == 400:
                assert status["code"] == 3
                assert status["details"][0]["fieldViolations"], status


async def test_slow_clients_are_cut_off(guarded: Web) -> None:
    """CARGOTRACK_GATEWAY_IDLE_TIMEOUT_S (1.5 s here): a connection trickling its
    request head is closed, and so is an idle one; a body that stops is a 408."""
    port = guarded.server.http_port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    closed = False
    for number in range(120):  # a header line every 0.25 s: 30 s if never cut off
        try:
            writer.write(b"X-Slow-%d: 1\r\n" % number)
            await writer.drain()
            async with asyncio.timeout(0.25):
                answer = await reader.read(1024)
        except TimeoutError:
            continue
        except ConnectionError:
            closed = True
            break
        assert answer == b"", answer  # never an answer to a head that never ended
        closed = True
        break
    writer.close()
    assert closed, "a trickling request head kept its connection for 30 s"

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(30):
        assert await reader.read() == b""  # idle: closed without a word
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    authorization = DISPATCHER["Authorization"].encode()
    writer.write(
        request_line(
            b"/v1/alerts:subscribe",
            b"POST",
            b"Authorization: " + authorization,
            b"Content-Type: application/json",
            b"Content-Length: 100",
        )
        + b'{"filter":'
    )
    async with asyncio.timeout(30):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":4' in answer  # DEADLINE_EXCEEDED


async def test_an_unexpected_failure_is_a_json_500_without_details(guarded: Web) -> None:
    gateway = guarded.server.gateway
    assert gateway is not None

    def broken(key: str) -> float:
        raise RuntimeError("secret internals")

    gateway.limiter.take = broken  # type: ignore[method-assign]
    async with guarded.http.get(UNKNOWN) as response:
        assert response.status == 500
        status = await error_of(response)
    assert status == {"code": 13, "message": "internal error", "details": []}
    async with guarded.http.get("/healthz") as response:
        assert response.status == 200


# --- fuzz ------------------------------------------------------------------------------

_PREFIXES = ["/v1/track/", "/v1/shipments/", "/v1/shipments", "/v1/alerts:subscribe", "/t/"]
_PREFIXES += ["/static/", "/v1/", "/", "/openapi.json", "/dispatch/"]


@st.composite
def nasty_targets(draw: st.DrawFn) -> str:
    """A request target: a known prefix, arbitrary bytes percent-encoded (slashes and
    dots kept now and then), an arbitrary query."""
    prefix = draw(st.sampled_from(_PREFIXES))
    segment = draw(st.binary(max_size=40))
    keep = draw(st.sampled_from(["", "/", "/.:%"]))
    tail = quote_from_bytes(segment, safe=keep)
    suffix = draw(st.sampled_from(["", ":watch", "/timeline", ":subscribe"]))
    pairs = draw(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=30)), max_size=4))
    encoded = urlencode(pairs, encoding="utf-8", errors="surrogatepass")
    return prefix + tail + suffix + (f"?{encoded}" if encoded else "")


@pytest.fixture(scope="module")
async def fuzzed(kafka_bootstrap: str, database_url: str) -> AsyncIterator[Web]:
    """One stack for every fuzzed request: tracking-query on a schema of its own,
    dispatch, and a gateway with no rate limit and the default stream caps."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    async with fresh_schema(database_url) as schema:
        settings = query_settings(kafka_bootstrap, database_url, prefix, schema)
        await prepare(settings)
        async with running_service("tracking-query", settings) as service:
            stub = tracking_pb2_grpc.TrackingServiceStub(service.channel)
            async with running_web(
                Query(settings, service, stub),
                kafka_bootstrap,
                prefix,
                CARGOTRACK_GATEWAY_RATE_PER_S=0,
            ) as web:
                yield web


#: Statuses the fuzzed requests got, by status.
FUZZ_SEEN: Counter[int] = Counter()


@settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(
    target=nasty_targets(),
    method=st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"]),
    caller=st.sampled_from([{}, header(OPS), {"Authorization": "Bearer x.y.z"}]),
    accept=st.sampled_from(["", "application/x-ndjson", "*/*", "text/html;q=0.1,"]),
    event_id=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    body=st.sampled_from([b"", b"{}", b"{", b"null", b'{"filter":{"kinds":[1e999]}}']),
)
async def test_fuzzed_requests_never_get_a_server_error(
    fuzzed: Web,
    target: str,
    method: str,
    caller: dict[str, str],
    accept: str,
    event_id: str,
    body: bytes,
) -> None:
    """Hypothesis-built targets, methods and headers against the running gateway:
    every answer is below 500, every error a JSON google.rpc.Status."""
    headers = {**caller, "Content-Type": "application/json"}
    if accept:
        headers["Accept"] = accept
    if event_id.strip():
        headers["Last-Event-ID"] = event_id
    url = URL(fuzzed.base + target, encoded=True)
    async with fuzzed.http.request(method, url, headers=headers, data=body) as response:
        FUZZ_SEEN[response.status] += 1
        assert response.status < 500, (method, target, await response.text())
        if response.status >= 400 and method != "HEAD":
            await error_of(response)
        # A stream that did open is left at once: the answers are the point.


async def test_the_fuzz_reached_the_gateway(fuzzed: Web) -> None:
    """After the fuzz (tests run in file order): it did send requests, most were
    refused, and the gateway still answers a valid one."""
    assert sum(FUZZ_SEEN.values()) >= FUZZ_EXAMPLES // 2, FUZZ_SEEN
    assert sum(n for status, n in FUZZ_SEEN.items() if status >= 400) > 0, FUZZ_SEEN
    async with fuzzed.http.get("/v1/shipments", headers=header(OPS)) as response:
        assert response.status == 200
