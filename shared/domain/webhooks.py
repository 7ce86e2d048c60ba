"""Webhook rules without I/O: signatures, retry schedule, target checks, delivery order.

services/webhooks does the I/O (PostgreSQL, DNS, HTTP); docs/webhooks.md is the
receiver's view.

- **Signature**: ``Cargotrack-Signature: t=<unix seconds>,v1=<hex>`` where the hex is
  HMAC-SHA256, keyed with the endpoint's secret, of ``f"{t}.".encode() + body``
  (Stripe's scheme). Each attempt is signed anew with its own ``t``; a receiver
  refuses a ``t`` too far from its clock (replays).
- **Retry schedule**: after failed attempt n (1-based) the next waits
  ``min(max_s, base_s * 2**(n-1))``, shortened by up to a quarter by jitter; after
  ``max_attempts`` failures the delivery is dead.
- **Targets**: only http(s) URLs with a host and no credentials; an address is
  refused unless globally routable (loopback, private, link-local, multicast,
  unspecified, reserved, shared, documentation ranges ...), IPv4 addresses embedded
  in IPv6 (IPv4-mapped, NAT64, 6to4, Teredo) judged as the IPv4 address.
- **Order**: deliveries of one (webhook, shipment) go out one at a time in the
  order they were recorded: only the oldest pending one may be attempted, the
  next waits until it is delivered or dead.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import SplitResult, urlsplit

from shared.domain.validation import Violation

SIGNATURE_HEADER = "Cargotrack-Signature"
ALERT_ID_HEADER = "Cargotrack-Alert-Id"
SIGNATURE_VERSION = "v1"
#: How far a signature's time may be from the receiver's clock (docs/webhooks.md).
DEFAULT_TOLERANCE_S = 300

MIN_SECRET_LENGTH = 32
MAX_SECRET_LENGTH = 256
MAX_URL_LENGTH = 2048
SECRET_PREFIX = "whsec_"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- signatures -------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret: "whsec_" and 256 random bits in hex."""
    return SECRET_PREFIX + secrets.token_hex(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp}." + body`` keyed with the secret."""
    signed = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """The value of the Cargotrack-Signature header for one attempt."""
    return f"t={timestamp},{SIGNATURE_VERSION}={signature(secret, timestamp, body)}"


class SignatureError(ValueError):
    """The signature header is malformed, stale, or does not match the body."""


def verify_signature(
    secret: str, header: str, body: bytes, now: float, tolerance_s: float = DEFAULT_TOLERANCE_S
) -> int:
    """Check a Cargotrack-Signature header as a receiver does; return its timestamp.

    Any of several ``v1=`` values may match (room for secret rotation); the
    comparison is constant-time. Raises SignatureError otherwise.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("the t= of the signature is not an integer") from None
        elif name == SIGNATURE_VERSION:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError("the signature header needs t= and v1=")
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"the signature's time is more than {tolerance_s:g} s off")
    expected = signature(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise SignatureError("no v1 signature matches the body")
    return timestamp


# --- retry schedule ---------------------------------------------------------------------


def retry_delay_s(failed_attempts: int, base_s: float, max_s: float, jitter: float = 0.0) -> float:
    """Seconds to wait after `failed_attempts` (>= 1) failures before the next attempt.

    Exponential (base, 2 base, 4 base, ...) up to max_s, then shortened by
    ``jitter`` (0..1, a random draw in production) times a quarter, so endpoints
    that failed together are not retried in lockstep.
    """
    if failed_attempts < 1:
        raise ValueError("failed_attempts starts at 1")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError("jitter is a fraction in [0, 1]")
    # 2**60 already exceeds any max_s: avoid float overflow for huge attempt counts.
    exponential = base_s * 2.0 ** min(failed_attempts - 1, 60)
    return min(max_s, exponential) * (1.0 - 0.25 * jitter)


def is_dead(failed_attempts: int, max_attempts: int) -> bool:
    """Whether a delivery that failed this many times is given up."""
    return failed_attempts >= max_attempts


def is_success(status_code: int) -> bool:
    """Only 2xx counts as delivered (a redirect is not followed, so it is a failure)."""
    return 200 <= status_code < 300


# --- targets ----------------------------------------------------------------------------

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if any (mapped, NAT64, 6to4, Teredo)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def refusal(address: IpAddress) -> str | None:
    """Why a webhook may not be sent to `address`, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            reason = refusal(inner)
            return f"{reason} (embedded in {address})" if reason else None
    checks = (
        ("a loopback address", address.is_loopback),
        ("the unspecified address", address.is_unspecified),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
        ("not globally routable", not address.is_global),
    )
    for what, applies in checks:
        if applies:
            return f"{address} is {what}"
    return None


@dataclass(frozen=True)
class Target:
    """A checked webhook URL: what to resolve and connect to."""

    url: str
    scheme: str
    host: str
    port: int
    #: The host is an IP literal: nothing to resolve.
    address: IpAddress | None


def check_url(
    url: str, *, allow_http: bool, field: str = "url"
) -> tuple[Target | None, list[Violation]]:
    """A webhook URL's parts, or the violations that refuse it (no DNS here).

    An IP literal host is judged here (`refusal`) only by the caller, which knows
    whether private targets are allowed.
    """
    violations: list[Violation] = []
    if not url:
        return None, [Violation(field, "required")]
    if len(url) > MAX_URL_LENGTH:
        return None, [Violation(field, f"at most {MAX_URL_LENGTH} characters")]
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return None, [Violation(field, "no whitespace or control characters")]
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return None, [Violation(field, f"not a URL: {error}")]
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        violations.append(Violation(field, "the scheme must be https (or http where allowed)"))
    elif scheme == "http" and not allow_http:
        violations.append(Violation(field, "only https URLs are allowed here"))
    if parts.username is not None or parts.password is not None:
        violations.append(Violation(field, "no credentials in the URL (use the signature)"))
    host = (parts.hostname or "").rstrip(".")
    if not host:
        violations.append(Violation(field, "the URL names no host"))
    if port == 0:
        violations.append(Violation(field, "port 0 is no port"))
    if parts.fragment:
        violations.append(Violation(field, "no fragment (#...)"))
    if violations:
        return None, violations
    address: IpAddress | None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    return (
        Target(
            url=url,
            scheme=scheme,
            host=host,
            port=port if port is not None else (443 if scheme == "https" else 80),
            address=address,
        ),
        [],
    )


def check_secret(secret: str, field: str = "secret") -> list[Violation]:
    """A secret the caller chose: long enough to resist guessing, printable."""
    if not MIN_SECRET_LENGTH <= len(secret) <= MAX_SECRET_LENGTH:
        return [
            Violation(field, f"{MIN_SECRET_LENGTH} to {MAX_SECRET_LENGTH} characters, or empty")
        ]
    if not secret.isprintable() or any(ch.isspace() for ch in secret):
        return [Violation(field, "printable characters without whitespace")]
    return []


# --- order ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """A pending delivery, as far as scheduling cares."""

    delivery_id: int
    webhook_id: str
    shipment_id: str
    next_attempt_at: datetime
    #: Set while some worker attempts it (its lease); free when None or past.
    leased_until: datetime | None = None


def deliverable(pending: Iterable[Pending], now: datetime, limit: int) -> list[Pending]:
    """The deliveries to attempt now, at most `limit`, earliest due first.

    Per (webhook, shipment) only the oldest pending delivery (lowest id) may be
    attempted, and only once it is due and not leased: a later alert of the shipment
    waits for the earlier one to be delivered or dead, whatever its own schedule.
    """
    heads: dict[tuple[str, str], Pending] = {}
    for delivery in pending:
        key = (delivery.webhook_id, delivery.shipment_id)
        head = heads.get(key)
        if head is None or delivery.delivery_id < head.delivery_id:
            heads[key] = delivery
    ready = [
        head
        for head in heads.values()
        if head.next_attempt_at <= now and (head.leased_until is None or head.leased_until <= now)
    ]
    ready.sort(key=lambda head: (head.next_attempt_at, head.delivery_id))
    return ready[:limit]


def matches(min_severity: int, kinds: Sequence[int], kind: int, severity: int) -> bool:
    """Whether an alert of `kind` and `severity` passes a webhook's filter."""
    return severity >= min_severity and (not kinds or kind in kinds)
