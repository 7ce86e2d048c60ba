"""The http-gateway's guard, the parts that know nothing of aiohttp: who a client is,
how often it may look up tracking tokens, how many streams it may hold, which
origins may call the API from a browser, and the Content-Security-Policy of the
pages. `app.py` applies them; docs/http.md ("Limits and security headers") is the
client's view.

Everything here is per process: with N gateway replicas a client may get up to N
times each allowance (the Ingress spreads its connections). Memory is bounded: the
rate limiter forgets the least recently seen clients beyond a cap, and stream slots
exist only while streams are open.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# --- who the client is -----------------------------------------------------------------


def parse_address(text: str | None) -> Address | None:
    """An IP address (an IPv4-mapped IPv6 one as IPv4), or None if `text` is none."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, proxies: Sequence[Network]) -> bool:
    return any(address in network for network in proxies)


def client_address(
    peer: str | None, forwarded_for: Iterable[str], proxies: Sequence[Network]
) -> Address | None:
    """The address a request is counted against.

    The socket peer, unless the peer is a trusted proxy (in `proxies`,
    CARGOTRACK_GATEWAY_TRUSTED_PROXIES; none by default). Then `X-Forwarded-For`
    (every such header, in order) is read from its right end, where the nearest
    proxy appended the address it saw, skipping trusted proxies: the first address
    that is not one is the client. Entries further left were written by whoever sent
    the request and are never believed; an entry that is not an address ends the
    walk at the last one read. None when the peer is not an IP address (a Unix
    socket): such clients share one allowance.
    """
    address = parse_address(peer)
    if address is None or not _trusted(address, proxies):
        return address
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        forwarded = parse_address(hop)
        if forwarded is None:
            break
        address = forwarded
        if not _trusted(forwarded, proxies):
            break
    return address


def client_key(address: Address | None) -> str:
    """The key allowances are kept under: an IPv4 address, or an IPv6 address's /64
    (what one subscriber usually gets, so a client cannot draw a fresh allowance from
    each of its 2^64 addresses)."""
    if address is None:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


# --- how often -------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per client: `burst` requests at once, refilled at `rate_per_s`.

    At most `max_clients` buckets are kept, least recently used first out: a client
    forgotten that way comes back with a full bucket, so the cap must exceed the
    number of clients active within `burst / rate_per_s` seconds for the limit to
    hold (50,000 buckets are a few MiB). `rate_per_s` 0 turns limiting off.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        #: client key -> (tokens left, when they were counted); oldest use first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Take one request's token for `key`: 0.0 when it may go ahead, else the
        seconds until a token will be there (nothing taken)."""
        if self.rate_per_s <= 0:
            return 0.0
        now = self._clock()
        tokens, counted = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - counted) * self.rate_per_s)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate_per_s
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


# --- how many streams ------------------------------------------------------------------


class StreamSlots:
    """Open SSE/NDJSON streams, per client and in total, each under its cap."""

    PER_CLIENT = "per-client"
    TOTAL = "total"

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self._open: dict[str, int] = {}
        self._count = 0

    @property
    def open(self) -> int:
        return self._count

    def acquire(self, key: str) -> str | None:
        """Take a slot for `key`: None when taken, else which cap is full
        (`PER_CLIENT` or `TOTAL`). Every acquired slot must be released once."""
        if self._count >= self.total:
            return self.TOTAL
        held = self._open.get(key, 0)
        if held >= self.per_client:
            return self.PER_CLIENT
        self._open[key] = held + 1
        self._count += 1
        return None

    def release(self, key: str) -> None:
        held = self._open.pop(key)
        if held > 1:
            self._open[key] = held - 1
        self._count -= 1


# --- which origins ---------------------------------------------------------------------

#: Request headers a cross-origin caller may send: the ones the API reads.
CORS_REQUEST_HEADERS = frozenset({"accept", "authorization", "content-type", "last-event-id"})
#: Response headers a cross-origin caller may read beyond the CORS-safelisted ones.
CORS_EXPOSED = "Retry-After, WWW-Authenticate"
#: How long a browser may cache a preflight's answer.
CORS_MAX_AGE_S = 600


class Cors:
    """The cross-origin policy of the API (CARGOTRACK_GATEWAY_CORS_ORIGINS).

    No origin by default: a page of another origin cannot read any response (no
    `Access-Control-Allow-Origin`). `*` allows every origin. The gateway never sends
    `Access-Control-Allow-Credentials`: the API uses no cookies, a bearer token goes
    in the `Authorization` header, which a cross-origin page can only send when it
    holds the token itself.
    """

    def __init__(self, origins: Collection[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origins) - {"*"}

    def allow_origin(self, origin: str | None) -> str | None:
        """The `Access-Control-Allow-Origin` value for a request from `origin`, or
        None when that origin is not allowed."""
        if not origin:
            return None
        if self._any:
            return "*"
        return origin if origin in self._origins else None

    def response_headers(self, origin: str | None) -> dict[str, str]:
        """CORS headers of an ordinary response to a request from `origin`."""
        headers: dict[str, str] = {}
        if self._origins:
            headers["Vary"] = "Origin"  # the answer depends on it: caches must not mix
        allowed = self.allow_origin(origin)
        if allowed is not None:
            headers["Access-Control-Allow-Origin"] = allowed
            headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
        return headers

    def preflight_headers(
        self, origin: str | None, method: str, requested: str, verbs: Sequence[str]
    ) -> dict[str, str]:
        """CORS headers answering a preflight (`OPTIONS` with
        `Access-Control-Request-Method`) for a route answering `verbs`: the grant when
        the origin, the method and every requested header are allowed; otherwise
        only `Vary`, and the browser refuses the call."""
        headers = {"Vary": "Origin"} if self._origins else {}
        allowed = self.allow_origin(origin)
        names = {name.strip().lower() for name in requested.split(",") if name.strip()}
        if allowed is None or method not in verbs or not names <= CORS_REQUEST_HEADERS:
            return headers
        headers.update(
            {
                "Access-Control-Allow-Origin": allowed,
                "Access-Control-Allow-Methods": ", ".join(verbs),
                "Access-Control-Allow-Headers": ", ".join(sorted(CORS_REQUEST_HEADERS)),
                "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
            }
        )
        return headers


# --- what the pages may load -----------------------------------------------------------

#: Content-Security-Policy of every response that is not a page (JSON, streams,
#: static files): nothing may load, nothing may frame it.
API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def tile_source(tile_url: str) -> str | None:
    """The CSP source of the map tiles' origin (`https://tiles.example.org`;
    `https://*.tile.example.org` for a `{s}.` subdomain placeholder), or None when
    the tiles are the gateway's own (a path) or there are none. shared/config.py
    has refused anything else (a placeholder deeper in the host, user info, spaces
    or `;`)."""
    if not tile_url or tile_url.startswith("/"):
        return None
    parts = urlsplit(tile_url)
    labels = parts.netloc.split(".")
    if labels[0].startswith("{"):
        labels[0] = "*"
    return f"{parts.scheme}://{'.'.join(labels)}"


def page_policy(tile_url: str) -> str:
    """Content-Security-Policy of the HTML pages: scripts, styles and connections
    from the gateway only (the pages have no inline script or style), images from it,
    from the map tiles' origin and `data:` (Leaflet shows a tile that failed to load
    as an empty `data:` GIF), no plugins, no framing, forms only to itself."""
    tiles = tile_source(tile_url)
    images = "'self' data:" + (f" {tiles}" if tiles else "")
    return (
        f"default-src 'none'; script-src 'self'; style-src 'self'; img-src {images}; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
