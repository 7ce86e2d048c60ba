"""The http-gateway's guard without a server: client addresses behind proxies, the
token bucket and its memory bound, stream slots, the CORS policy, the pages'
Content-Security-Policy, and the settings that configure them."""

from __future__ import annotations

import ipaddress

import pytest

from services.http_gateway.guard import (
    API_POLICY,
    Cors,
    RateLimiter,
    StreamSlots,
    client_address,
    client_key,
    page_policy,
    tile_source,
)
from services.http_gateway.routes import routes
from services.tracking_query.app import PUBLIC_METHODS
from shared.config import ConfigError, load_settings
from tests.unit.test_config import BASE

INGRESS = (ipaddress.ip_network("10.0.0.0/8"),)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- who the client is ---------------------------------------------------------------


def test_the_socket_peer_is_the_client_unless_it_is_a_trusted_proxy() -> None:
    spoofed = ["198.51.100.7"]
    assert str(client_address("203.0.113.5", spoofed, ())) == "203.0.113.5"
    # A peer outside the trusted networks cannot make itself someone else.
    assert str(client_address("203.0.113.5", spoofed, INGRESS)) == "203.0.113.5"
    assert str(client_address("10.1.2.3", spoofed, INGRESS)) == "198.51.100.7"
    assert str(client_address("10.1.2.3", [], INGRESS)) == "10.1.2.3"


def test_forwarded_for_is_read_from_the_right_skipping_trusted_proxies() -> None:
    # The client wrote "1.1.1.1" itself; the Ingress appended what it saw.
    assert str(client_address("10.0.0.9", ["1.1.1.1, 203.0.113.5"], INGRESS)) == "203.0.113.5"
    # Two proxies of ours in a row; several headers count as one list.
    hops = ["1.1.1.1, 203.0.113.5", "10.0.0.7"]
    assert str(client_address("10.0.0.9", hops, INGRESS)) == "203.0.113.5"
    # Garbage stops the walk at the last address read.
    assert str(client_address("10.0.0.9", ["203.0.113.5, nonsense"], INGRESS)) == "10.0.0.9"
    assert str(client_address("10.0.0.9", ["::ffff:203.0.113.5"], INGRESS)) == "203.0.113.5"


def test_ipv6_clients_are_counted_by_their_64() -> None:
    one = client_key(client_address("2001:db8:1:2::1", [], ()))
    other = client_key(client_address("2001:db8:1:2:ffff::9", [], ()))
    elsewhere = client_key(client_address("2001:db8:1:3::1", [], ()))
    assert one == other == "2001:db8:1:2::/64"
    assert elsewhere != one
    assert client_key(client_address("203.0.113.5", [], ())) == "203.0.113.5"
    assert client_key(client_address(None, ["203.0.113.5"], INGRESS)) == "unknown"


# --- the token bucket ------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_one_request_per_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=0.5, burst=3, max_clients=10, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(2.0)  # one token every 2 s
    assert limiter.take("b") == 0.0  # another client has its own bucket
    clock.now += 1.0
    assert limiter.take("a") == pytest.approx(1.0)  # refused: nothing taken
    clock.now += 1.0
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    clock.now += 3600
    assert [limiter.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, no more


def test_the_limiter_forgets_the_least_recently_seen_clients_beyond_its_cap() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=0.001, burst=1, max_clients=3, clock=clock)
    for client in ("a", "b", "c"):
        limiter.take(client)
    assert limiter.take("a") > 0  # "a" is now the most recently seen
    for number in range(1000):
        limiter.take(f"x{number}")
        assert len(limiter) <= 3
    assert limiter.take("a") == 0.0  # forgotten, so back with a full bucket


def test_rate_zero_turns_limiting_off() -> None:
    limiter = RateLimiter(rate_per_s=0, burst=1, max_clients=1)
    assert all(limiter.take("a") == 0.0 for _ in range(100))
    assert len(limiter) == 0


def test_stream_slots_per_client_and_in_total() -> None:
    slots = StreamSlots(per_client=2, total=3)
    assert slots.acquire("a") is None
    assert slots.acquire("a") is None
    assert slots.acquire("a") == StreamSlots.PER_CLIENT
    assert slots.acquire("b") is None
    assert slots.acquire("c") == StreamSlots.TOTAL
    slots.release("a")
    assert slots.acquire("c") is None
    for key in ("a", "b", "c"):
        slots.release(key)
    assert slots.open == 0


# --- CORS ------------------------------------------------------------------------------


def test_no_origin_is_allowed_by_default() -> None:
    cors = Cors(())
    assert cors.response_headers("https://evil.example") == {}
    preflight = cors.preflight_headers("https://evil.example", "GET", "authorization", ["GET"])
    assert "Access-Control-Allow-Origin" not in preflight


def test_listed_origins_get_the_grant_and_never_credentials() -> None:
    cors = Cors(("https://shop.example",))
    headers = cors.response_headers("https://shop.example")
    assert headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert headers["Vary"] == "Origin"
    assert cors.response_headers("https://evil.example") == {"Vary": "Origin"}
    granted = cors.preflight_headers(
        "https://shop.example", "POST", "Authorization, Content-Type", ["GET", "POST"]
    )
    assert granted["Access-Control-Allow-Origin"] == "https://shop.example"
    assert granted["Access-Control-Allow-Methods"] == "GET, POST"
    assert "authorization" in granted["Access-Control-Allow-Headers"]
    for refused in (
        cors.preflight_headers("https://shop.example", "DELETE", "", ["GET"]),
        cors.preflight_headers("https://shop.example", "GET", "x-secret", ["GET"]),
        cors.preflight_headers("https://evil.example", "GET", "", ["GET"]),
    ):
        assert "Access-Control-Allow-Origin" not in refused
    everyone = Cors(("*",))
    assert everyone.response_headers("https://any.example")["Access-Control-Allow-Origin"] == "*"
    for headers in (granted, everyone.response_headers("https://any.example")):
        assert "Access-Control-Allow-Credentials" not in headers


# --- Content-Security-Policy -----------------------------------------------------------


def test_the_page_policy_allows_images_from_the_tile_host_only() -> None:
    assert tile_source("") is None
    assert tile_source("/tiles/{z}/{x}/{y}.png") is None
    assert tile_source("https://tiles.example.org/{z}/{x}/{y}.png") == "https://tiles.example.org"
    assert tile_source("https://{s}.tile.example.org/{z}/{x}/{y}.png") == (
        "https://*.tile.example.org"
    )
    policy = page_policy("https://{s}.tile.example.org:8443/{z}/{x}/{y}.png")
    assert "img-src 'self' data: https://*.tile.example.org:8443;" in policy
    assert "img-src 'self' data:;" in page_policy("")
    for directive in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy
    assert "unsafe" not in policy
    assert "frame-ancestors 'none'" in API_POLICY


# --- routes and settings ---------------------------------------------------------------


def test_public_routes_are_exactly_tracking_querys_public_methods() -> None:
    assert {route.rpc_path for route in routes() if route.public} == set(PUBLIC_METHODS)


def test_gateway_guard_settings_are_parsed() -> None:
    settings = load_settings(
        {
            **BASE,
            "CARGOTRACK_GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7, fd00::/8",
            "CARGOTRACK_GATEWAY_CORS_ORIGINS": "https://shop.example, http://localhost:3000",
            "CARGOTRACK_GATEWAY_RATE_PER_S": "0",
            "CARGOTRACK_MAP_TILE_URL": "https://{s}.tile.example.org/{z}/{x}/{y}.png",
        }
    ).gateway
    assert [str(n) for n in settings.trusted_proxies] == [
        "10.0.0.0/8",
        "192.168.1.7/32",
        "fd00::/8",
    ]
    assert settings.cors_origins == ("https://shop.example", "http://localhost:3000")
    assert settings.rate_per_s == 0
    defaults = load_settings(BASE).gateway
    assert defaults.trusted_proxies == ()
    assert defaults.cors_origins == ()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CARGOTRACK_GATEWAY_TRUSTED_PROXIES", "10.0.0.1/8"),
        ("CARGOTRACK_GATEWAY_TRUSTED_PROXIES", "ingress"),
        ("CARGOTRACK_GATEWAY_CORS_ORIGINS", "*, https://shop.example"),
        ("CARGOTRACK_GATEWAY_CORS_ORIGINS", "https://shop.example/"),
        ("CARGOTRACK_GATEWAY_CORS_ORIGINS", "HTTPS://Shop.example"),
        ("CARGOTRACK_GATEWAY_CORS_ORIGINS", "shop.example"),
        ("CARGOTRACK_GATEWAY_RATE_PER_S", "-1"),
        ("CARGOTRACK_GATEWAY_RATE_BURST", "0"),
        ("CARGOTRACK_GATEWAY_RATE_CLIENTS", "0"),
        ("CARGOTRACK_GATEWAY_MAX_STREAMS_PER_CLIENT", "0"),
        ("CARGOTRACK_GATEWAY_MAX_STREAMS", "0"),
        ("CARGOTRACK_GATEWAY_IDLE_TIMEOUT_S", "0.5"),
        ("CARGOTRACK_MAP_TILE_URL", "https://a.{s}.example.org/{z}/{x}/{y}.png"),
        ("CARGOTRACK_MAP_TILE_URL", "https://x@tiles.example.org/{z}/{x}/{y}.png"),
        ("CARGOTRACK_MAP_TILE_URL", "https://tiles.example.org;script-src */{z}/{x}/{y}"),
        ("CARGOTRACK_MAP_TILE_URL", "//tiles.example.org/{z}/{x}/{y}.png"),
        ("CARGOTRACK_MAP_TILE_URL", "javascript:{z}"),
    ],
)
def test_bad_guard_settings_are_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({**BASE, name: value})
