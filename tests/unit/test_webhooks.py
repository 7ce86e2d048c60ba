"""The pure rules of webhooks (shared/domain/webhooks.py): signatures, backoff, SSRF
classification, per-shipment order, filters."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.config import ConfigError, load_settings
from shared.domain import webhooks as rules
from shared.domain.webhooks import Pending

SECRET = "whsec_" + "ab" * 32
BODY = b'{"type":"cargotrack.alert"}'


# --- signatures -------------------------------------------------------------------------


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert rules.signature(SECRET, 1700000000, BODY) == expected
    assert rules.signature_header(SECRET, 1700000000, BODY) == f"t=1700000000,v1={expected}"


def test_a_receiver_verifies_a_fresh_signature() -> None:
    header = rules.signature_header(SECRET, 1700000000, BODY)
    assert rules.verify_signature(SECRET, header, BODY, now=1700000100) == 1700000000


@pytest.mark.parametrize(
    ("secret", "body", "now", "reason"),
    [
        ("whsec_other" + "0" * 30, BODY, 1700000000, "no v1 signature matches"),
        (SECRET, BODY + b" ", 1700000000, "no v1 signature matches"),
        (SECRET, BODY, 1700000000 + 301, "more than 300 s off"),
        (SECRET, BODY, 1700000000 - 301, "more than 300 s off"),
    ],
)
def test_a_receiver_refuses_another_key_body_or_a_stale_time(
    secret: str, body: bytes, now: int, reason: str
) -> None:
    header = rules.signature_header(SECRET, 1700000000, BODY)
    with pytest.raises(rules.SignatureError, match=reason):
        rules.verify_signature(secret, header, body, now=now)


@pytest.mark.parametrize("header", ["", "t=1700000000", "v1=abc", "t=x,v1=abc"])
def test_a_malformed_signature_header_is_refused(header: str) -> None:
    with pytest.raises(rules.SignatureError):
        rules.verify_signature(SECRET, header, BODY, now=1700000000)


def test_any_of_several_v1_signatures_may_match() -> None:
    good = rules.signature(SECRET, 1700000000, BODY)
    header = f"t=1700000000,v1={'0' * 64},v1={good}"
    assert rules.verify_signature(SECRET, header, BODY, now=1700000000) == 1700000000


def test_new_secrets_are_long_random_and_acceptable() -> None:
    first, second = rules.new_secret(), rules.new_secret()
    assert first != second
    assert first.startswith("whsec_")
    assert len(first) == 6 + 64
    assert rules.check_secret(first) == []
    assert rules.check_secret("short") != []
    assert rules.check_secret("x" * 31 + " ") != []


# --- backoff ----------------------------------------------------------------------------


def test_the_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    delays = [rules.retry_delay_s(n, 10.0, 3600.0) for n in range(1, 11)]
    assert delays == [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600]


def test_jitter_shortens_a_delay_by_at_most_a_quarter() -> None:
    assert rules.retry_delay_s(3, 10.0, 3600.0, jitter=1.0) == 30.0
    assert rules.retry_delay_s(3, 10.0, 3600.0, jitter=0.5) == 35.0
    assert rules.retry_delay_s(10_000, 10.0, 3600.0) == 3600.0  # no overflow


def test_backoff_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        rules.retry_delay_s(0, 10.0, 60.0)
    with pytest.raises(ValueError, match="fraction"):
        rules.retry_delay_s(1, 10.0, 60.0, jitter=1.5)


def test_a_delivery_is_dead_after_max_attempts_and_only_2xx_succeeds() -> None:
    assert not rules.is_dead(2, 3)
    assert rules.is_dead(3, 3)
    assert [rules.is_success(code) for code in (200, 204, 299, 301, 400, 500, 0)] == [
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]


# --- SSRF classification ----------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space (carrier-grade NAT)
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2001:db8::1",  # documentation
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    parsed = ipaddress.ip_address(address)
    reason = rules.refusal(parsed)
    assert reason is not None
    assert str(parsed) in reason


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert rules.refusal(ipaddress.ip_address(address)) is None


def test_urls_are_checked_for_scheme_host_and_credentials() -> None:
    target, violations = rules.check_url("https://hooks.example.com:8443/in?x=1", allow_http=False)
    assert violations == []
    assert target is not None
    assert (target.scheme, target.host, target.port, target.address) == (
        "https",
        "hooks.example.com",
        8443,
        None,
    )
    literal, _ = rules.check_url("http://[::1]/x", allow_http=True)
    assert literal is not None
    assert literal.address == ipaddress.ip_address("::1")
    assert literal.port == 80
    refused = {
        "http://hooks.example.com/": False,  # http where only https is allowed
        "ftp://hooks.example.com/": True,
        "https://user:pw@hooks.example.com/": True,
        "https:///path": True,
        "https://hooks.example.com/#frag": True,
        "https://hooks.example.com:99999/": True,
        "https://hooks.example.com:0/": True,
        "https://hooks.example.com/a b": True,
        "": True,
    }
    for url, allow_http in refused.items():
        target, violations = rules.check_url(url, allow_http=allow_http)
        assert target is None, url
        assert violations, url
        assert all(v.field == "url" for v in violations)


# --- order ------------------------------------------------------------------------------

NOW = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)


def pending(
    delivery_id: int,
    shipment: str,
    due_in_s: float = 0.0,
    *,
    webhook: str = "wh_1",
    leased_for_s: float | None = None,
) -> Pending:
    return Pending(
        delivery_id=delivery_id,
        webhook_id=webhook,
        shipment_id=shipment,
        next_attempt_at=NOW + timedelta(seconds=due_in_s),
        leased_until=None if leased_for_s is None else NOW + timedelta(seconds=leased_for_s),
    )


def ids(chosen: list[Pending]) -> list[int]:
    return [p.delivery_id for p in chosen]


def test_only_the_oldest_pending_delivery_of_a_shipment_is_attempted() -> None:
    rows = [pending(3, "s1"), pending(1, "s1"), pending(2, "s1"), pending(4, "s2")]
    assert ids(rules.deliverable(rows, NOW, 10)) == [1, 4]


def test_a_later_alert_waits_for_an_earlier_one_that_backs_off() -> None:
    # Delivery 1 failed and retries in a minute; 2 is due now but must wait for it.
    rows = [pending(1, "s1", due_in_s=60), pending(2, "s1"), pending(3, "s2")]
    assert ids(rules.deliverable(rows, NOW, 10)) == [3]
    assert ids(rules.deliverable(rows, NOW + timedelta(seconds=60), 10)) == [3, 1]


def test_a_leased_head_blocks_its_shipment_until_the_lease_runs_out() -> None:
    rows = [pending(1, "s1", leased_for_s=30), pending(2, "s1")]
    assert rules.deliverable(rows, NOW, 10) == []
    assert ids(rules.deliverable(rows, NOW + timedelta(seconds=30), 10)) == [1]


def test_order_is_per_webhook_and_shipment() -> None:
    rows = [
        pending(1, "s1", due_in_s=60, webhook="wh_a"),
        pending(2, "s1", webhook="wh_b"),  # another endpoint: not held up by wh_a
        pending(3, "s1", webhook="wh_a"),
    ]
    assert ids(rules.deliverable(rows, NOW, 10)) == [2]


def test_the_earliest_due_go_first_up_to_the_limit() -> None:
    rows = [pending(1, "s1", due_in_s=-5), pending(2, "s2", due_in_s=-50), pending(3, "s3")]
    assert ids(rules.deliverable(rows, NOW, 2)) == [2, 1]


def test_filters_match_kind_and_severity() -> None:
    assert rules.matches(0, (), kind=1, severity=1)
    assert rules.matches(2, (1, 2), kind=2, severity=3)
    assert not rules.matches(2, (), kind=1, severity=1)
    assert not rules.matches(0, (1,), kind=2, severity=3)


def test_the_verification_snippet_of_the_docs_accepts_our_signatures() -> None:
    """docs/webhooks.md shows receivers how to verify: that code must agree with ours."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", docs, re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/webhooks.md", "exec"), namespace)
    verify = namespace["verify"]
    now = int(time.time())
    header = rules.signature_header(SECRET, now, BODY)
    assert verify(SECRET, header, BODY) is True
    assert verify(SECRET, header, BODY + b"x") is False
    assert verify("whsec_" + "cd" * 32, header, BODY) is False
    assert verify(SECRET, rules.signature_header(SECRET, now - 600, BODY), BODY) is False


# --- settings ---------------------------------------------------------------------------

ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "CARGOTRACK_JWT_SECRET": "x" * 32,
}


def test_webhook_settings_default_to_https_only_in_production() -> None:
    assert load_settings(ENV).webhooks.allow_http is True
    production = load_settings({**ENV, "CARGOTRACK_PRODUCTION": "1"}).webhooks
    assert production.allow_http is False
    assert production.allow_private is False
    allowed = {**ENV, "CARGOTRACK_PRODUCTION": "1", "CARGOTRACK_WEBHOOK_ALLOW_HTTP": "1"}
    assert load_settings(allowed).webhooks.allow_http is True


def test_private_targets_are_refused_as_a_production_setting() -> None:
    with pytest.raises(ConfigError, match="CARGOTRACK_WEBHOOK_ALLOW_PRIVATE"):
        load_settings(
            {**ENV, "CARGOTRACK_PRODUCTION": "1", "CARGOTRACK_WEBHOOK_ALLOW_PRIVATE": "1"}
        )
    assert load_settings({**ENV, "CARGOTRACK_WEBHOOK_ALLOW_PRIVATE": "1"}).webhooks.allow_private


def test_bad_webhook_settings_are_named() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(
            {
                **ENV,
                "CARGOTRACK_WEBHOOK_MAX_ATTEMPTS": "0",
                "CARGOTRACK_WEBHOOK_BACKOFF_S": "60",
                "CARGOTRACK_WEBHOOK_BACKOFF_MAX_S": "10",
                "CARGOTRACK_WEBHOOK_CONCURRENCY": "many",
            }
        )
    message = str(refused.value)
    for name in (
        "CARGOTRACK_WEBHOOK_MAX_ATTEMPTS",
        "CARGOTRACK_WEBHOOK_BACKOFF_MAX_S",
        "CARGOTRACK_WEBHOOK_CONCURRENCY",
    ):
        assert name in message
