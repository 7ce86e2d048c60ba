"""Every setting of the services, parsed once into typed settings.

`load_settings()` reads the environment at start-up and either returns a
`Settings` or raises `ConfigError` naming every bad variable, so a service never
starts half-configured. No service reads `os.environ` for configuration anywhere
else; the local stack and the launcher (devtools/), `cargotrack token` /
`simulate`, the benchmark and the tests read a few variables of their own where
they use them. docs/operations.md lists them all (tests/contracts/test_docs.py).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The signing secret of the local stack and the tests. Never accepted unless
#: CARGOTRACK_DEV_MODE=1, so a production deployment cannot run with it by mistake.
DEV_JWT_SECRET = "cargotrack-dev-signing-key-not-for-production"

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
#: Shortest CARGOTRACK_PAGE_TOKEN_KEY accepted (characters).
MIN_PAGE_TOKEN_KEY = 32

#: The shortest HS256 key accepted (RFC 7518 3.2: at least the hash size, 256 bits).
MIN_HS256_SECRET_BYTES = 32
#: Most worker processes one `cargotrack serve` runs (CARGOTRACK_PROCESSES).
MAX_PROCESSES = 64

#: Largest CARGOTRACK_QUERY_CACHE_MB accepted (64 GiB): a larger figure is more likely
#: a number of bytes than a number of MiB.
MAX_QUERY_CACHE_MB = 65536


class ConfigError(Exception):
    """One or more environment variables are missing or malformed.

    The message names each variable and what is wrong with it, one per line.
    """


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    #: How long a producer may wait for Kafka before the RPC fails with UNAVAILABLE.
    request_timeout_s: float = 10.0
    #: A consumer silent this long is presumed dead and its partitions reassigned.
    #: Kafka refuses values below the broker's group.min.session.timeout.ms (6 s default).
    consumer_session_timeout_ms: int = 10_000

    def client_options(self) -> dict[str, object]:
        """Keyword arguments for any aiokafka client: servers and security, nothing else."""
        options: dict[str, object] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            options["ssl_context"] = ssl.create_default_context(cafile=self.ssl_cafile)
        return options


@dataclass(frozen=True)
class TopicSettings:
    """Names and shape of cargotrack's topics. The prefix isolates environments and tests."""

    prefix: str = "cargotrack."
    partitions: int = 6
    replication_factor: int = 1
    #: Replicas that must have a write before an acks=all producer is told it is
    #: written (the topics' min.insync.replicas): 2 of 3 survives losing any one.
    min_insync_replicas: int = 1
    gps_retention_hours: int = 7 * 24
    #: -1 keeps shipment events forever: that topic is the system of record.
    events_retention_hours: int = -1
    alerts_retention_hours: int = 30 * 24

    @property
    def gps_points(self) -> str:
        return f"{self.prefix}gps-points"

    @property
    def shipment_events(self) -> str:
        return f"{self.prefix}shipment-events"

    @property
    def delivery_confirmations(self) -> str:
        return f"{self.prefix}delivery-confirmations"

    @property
    def shipment_alerts(self) -> str:
        return f"{self.prefix}shipment-alerts"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}dead-letters"


@dataclass(frozen=True)
class DatabaseSettings:
    url: str
    #: Schema holding cargotrack's tables; tests give each test its own.
    schema: str = "cargotrack"
    pool_min: int = 1
    pool_max: int = 10


@dataclass(frozen=True)
class AuthSettings:
    """How bearer tokens are verified: one static key (HS256 secret or an asymmetric
    public key), or the keys of a JWKS selected by `kid` (shared.auth.KeyRing)."""

    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    issuer: str = "cargotrack"
    audience: str = "cargotrack"
    dev_mode: bool = False
    #: A JSON Web Key Set (file path or URL) holding the verification keys by kid.
    jwks_file: str | None = None
    jwks_url: str | None = None
    #: Seconds between reloads of the JWKS (0: load once at start-up).
    jwks_refresh_s: float = 300.0
    #: Longest validity accepted (exp - iat); longer-lived tokens are refused.
    max_token_lifetime_s: int = 24 * 3600

    @property
    def algorithms(self) -> list[str]:
        return ["RS256", "ES256"] if self.jwt_public_key else ["HS256"]

    @property
    def verification_key(self) -> str:
        """The static key (not in JWKS mode, where keys come from the key set)."""
        key = self.jwt_public_key or self.jwt_secret
        if key is None:
            raise ValueError("no static key: the keys come from a JWKS")
        return key


@dataclass(frozen=True)
class GrpcLimits:
    """Bounds on what clients may hold open on one server (docs/guarantees.md,
    "Security: limits, keys and transport", says what happens at each)."""

    #: HTTP/2 streams (calls) in flight on one connection; more wait in the client.
    max_concurrent_streams: int = 100
    #: Streaming calls one principal (tenant + subject) may hold open in one process.
    max_streams_per_principal: int = 16
    #: Streaming calls (GPS streams, watches, subscriptions) one process serves at once.
    max_streams_per_process: int = 10_000
    #: The server pings a connection idle this long, and closes it when the ping is
    #: not answered within the timeout (dead peers, half-open TCP).
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    #: Whether clients may send keepalive pings while they have no call in flight.
    keepalive_permit_without_calls: bool = True
    #: Clients pinging more often than this (without data) are sent GOAWAY.
    min_ping_interval_s: float = 10.0
    #: A connection older than this is sent GOAWAY (new calls go to a new
    #: connection, so load balancers rebalance); its calls get the grace to finish.
    max_connection_age_s: float = 1800.0
    max_connection_age_grace_s: float = 300.0


@dataclass(frozen=True)
class GrpcSettings:
    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = 4 * 1024 * 1024
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: With TLS: clients must present a certificate signed by this CA (mutual TLS).
    tls_client_ca_file: str | None = None
    #: A second, plaintext port serving only grpc.health.v1 (for kubelet probes,
    #: which cannot speak TLS); None: no such port.
    health_port: int | None = None
    #: Seconds in-flight RPCs get to finish on shutdown.
    shutdown_grace_s: float = 10.0
    limits: GrpcLimits = field(default_factory=GrpcLimits)
    #: Bind the gRPC and health ports with SO_REUSEPORT, shared with this service's
    #: other worker processes (`Settings.for_worker`); never read from the environment:
    #: a lone process must fail when its port is taken, not share it.
    reuse_port: bool = False


@dataclass(frozen=True)
class AlertSettings:
    late_margin_min: float = 15.0
    at_risk_margin_min: float = 5.0
    #: LATE / AT_RISK from this probability of arriving after the promised window on
    #: (shared.domain.eta.classify_delay; docs/alerts.md).
    late_probability: float = 0.8
    at_risk_probability: float = 0.3
    stale_after_min: float = 10.0
    #: Most GPS fixes the projector keeps in memory (each vehicle's recent track, so
    #: live tracking need not read it back from PostgreSQL); about 250 bytes each.
    #: 0 turns the cache off.
    track_cache_fixes: int = 1_000_000


@dataclass(frozen=True)
class LearnerSettings:
    """The speed learner (services/learner) and how the projector picks up its models."""

    #: Event time after which a learned pair's weight has halved.
    half_life_days: float = 14.0
    #: Most grid cells learned per tenant (see shared/domain/learner.py for eviction).
    max_cells: int = 50_000
    #: Event time between two model versions.
    snapshot_every_s: float = 600.0
    #: How long a point waits for its tenant's earlier points before it is learned.
    settle_s: float = 120.0
    #: Model versions kept per tenant (older ones are deleted when a new one is stored).
    keep_versions: int = 10
    #: The time zone hours of week are counted in.
    timezone: str = "UTC"
    #: How often the projector looks for new model versions.
    model_poll_s: float = 5.0


@dataclass(frozen=True)
class WebhookSettings:
    """The webhook delivery worker (services/webhooks; docs/webhooks.md)."""

    #: Attempts of one delivery before it is dead-lettered.
    max_attempts: int = 8
    #: Wait after the first failed attempt; doubles with each failure, up to backoff_max_s.
    backoff_s: float = 10.0
    backoff_max_s: float = 3600.0
    #: Time to connect (after DNS), and for a whole attempt (connect, send, response head).
    connect_timeout_s: float = 5.0
    timeout_s: float = 10.0
    #: Deliveries attempted at once by one worker.
    concurrency: int = 16
    #: How often the sender looks for due deliveries when it has nothing to do.
    poll_s: float = 1.0
    #: Development only: loopback and private targets are allowed (refused by default).
    allow_private: bool = False
    #: Plain http:// URLs are allowed (default: everywhere but production).
    allow_http: bool = True
    #: Finished deliveries (and deleted endpoints without any) older than this are pruned.
    retention_days: int = 30

    @property
    def lease_s(self) -> float:
        """How long a worker holds a delivery it attempts: past that (the worker died
        mid-attempt) another worker may attempt it again (at least once)."""
        return 2 * self.timeout_s + 30.0


@dataclass(frozen=True)
class GatewaySettings:
    """The http-gateway (services/http_gateway): where it listens for HTTP and which
    gRPC services it forwards to."""

    #: HTTP port (on CARGOTRACK_GRPC_HOST); gRPC health stays on CARGOTRACK_GRPC_PORT.
    http_port: int = 8080
    #: host:port of tracking-query and of dispatch (plaintext gRPC, in-cluster).
    tracking_target: str = "127.0.0.1:50054"
    dispatch_target: str = "127.0.0.1:50055"
    #: A comment line on an idle stream this often, so proxies keep it open.
    heartbeat_s: float = 15.0
    #: Map tiles of the tracking page ({z}/{x}/{y} template); empty: a blank background.
    tile_url: str = ""
    #: CA certificate that verifies the services' TLS certificates; None: plaintext.
    tls_ca_file: str | None = None
    #: Peers whose X-Forwarded-For is believed (the Ingress); none: the socket peer
    #: is the client (services/http_gateway/guard.py, `client_address`).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: Tracking-token lookups and streams one client may start: a bucket of `rate_burst`
    #: refilled at `rate_per_s` (0: no limit), for at most `rate_clients` clients.
    rate_per_s: float = 2.0
    rate_burst: int = 40
    rate_clients: int = 50_000
    #: SSE/NDJSON streams one client, and the process, may hold open.
    max_streams_per_client: int = 16
    max_streams: int = 10_000
    #: Origins whose pages may call the API (`*`: any); empty: none.
    cors_origins: tuple[str, ...] = ()
    #: A connection that has not sent a whole request head this long after connecting
    #: (or after its last response) is closed; a request body must arrive within it.
    idle_timeout_s: float = 75.0


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings
    database: DatabaseSettings
    topics: TopicSettings = field(default_factory=TopicSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    grpc: GrpcSettings = field(default_factory=GrpcSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    learner: LearnerSettings = field(default_factory=LearnerSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    metrics_port: int = 0
    log_format: str = "json"
    log_level: str = "INFO"
    #: OpenTelemetry tracing (shared/tracing.py); needs opentelemetry-api and -sdk.
    tracing: bool = False
    #: Position history older than this is dropped (partitions are per day).
    position_retention_days: int = 30
    #: Most records the projector applies in one transaction.
    projector_max_records: int = 5000
    #: Receipt-to-state budget the projector sizes its batches by (shared.poll_sizing);
    #: 0: no budget, every batch may hold projector_max_records.
    projector_latency_budget_ms: int = 100
    #: Internal (issue 16, "Pipelining"): poll and decode the projector's next batch while
    #: the batch in front of it commits (`ProjectionRunner(pipelined=True)`). Off until
    #: measured; for tests and benchmarks.
    projector_pipelined: bool = False
    #: Key of the MAC on ListShipments page tokens (tracking-query); None: derived from
    #: the JWT secret, and required when there is none (see page_token_key_bytes()).
    page_token_key: str | None = None
    #: Worker processes of `cargotrack serve` behind one port (shared/workers.py); more
    #: than 1 only for the services that allow it (services/registry.py).
    processes: int = 1

    #: Memory (MiB, per process) of tracking-query's GetShipment / TrackByToken answer
    #: cache (services/tracking_query/cache.py); 0 turns it off.
    query_cache_mb: int = 64

    #: Where the metrics server binds; None: the gRPC host. Not from the environment:
    #: a worker's metrics stay on loopback, for its parent to collect (`for_worker`).
    metrics_host: str | None = None

    def for_worker(self, index: int) -> Settings:
        """The settings of worker `index` (0-based) of `processes`: the gRPC and health
        ports shared with the other workers (SO_REUSEPORT); metrics (unless off) on
        127.0.0.1:`metrics_port + 1 + index`, where the parent collects them to serve
        all workers' on `metrics_port` (shared/workers.py)."""
        if not 0 <= index < self.processes:
            raise ValueError(f"worker {index} of {self.processes}")
        return replace(
            self,
            grpc=replace(self.grpc, reuse_port=True),
            metrics_port=self.metrics_port + 1 + index if self.metrics_port else 0,
            metrics_host="127.0.0.1",
        )

    def page_token_key_bytes(self) -> bytes | None:
        """The key that MACs page tokens: CARGOTRACK_PAGE_TOKEN_KEY, else one derived
        from the HS256 JWT secret (HMAC-SHA256 under a purpose label, so a page-token
        MAC is never a JWT signature and reveals nothing of the secret); None when
        neither exists (a public-key-only deployment must set the key)."""
        if self.page_token_key:
            return self.page_token_key.encode()
        if self.auth.jwt_secret:
            label = b"cargotrack/page-token-key/v1"
            return hmac.new(self.auth.jwt_secret.encode(), label, hashlib.sha256).digest()
        return None


class _Reader:
    """Reads variables, collecting every problem instead of stopping at the first."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.errors: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        return value if value not in (None, "") else None

    def _parse(self, name: str, default: T, parse: Callable[[str], T], what: str) -> T:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError:
            self.errors.append(f"{name}={raw!r}: expected {what}")
            return default

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def optional(self, name: str) -> str | None:
        return self.raw(name)

    def required(self, name: str, hint: str) -> str:
        raw = self.raw(name)
        if raw is None:
            self.errors.append(f"{name} is not set: {hint}")
            return ""
        return raw

    def integer(self, name: str, default: int, minimum: int | None = None) -> int:
        value = self._parse(name, default, int, "an integer")
        if minimum is not None and value < minimum:
            self.errors.append(f"{name}={value}: must be at least {minimum}")
        return value

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        value = self._parse(name, default, float, "a number")
        if value < minimum:
            self.errors.append(f"{name}={value}: must be at least {minimum}")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        def parse(raw: str) -> bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)

        return self._parse(name, default, parse, "1/0, true/false, yes/no or on/off")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            self.errors.append(f"{name}={value!r}: expected one of {', '.join(choices)}")
        return value


def default_min_insync_replicas(replication_factor: int) -> int:
    """min.insync.replicas when CARGOTRACK_TOPIC_MIN_INSYNC_REPLICAS is unset: one less
    than the replication factor from 3 replicas on (3 -> 2: a write is on two brokers
    and one broker may be down, restarted or lost), else 1."""
    return replication_factor - 1 if replication_factor >= 3 else 1


def with_password(url: str, password: str) -> str:
    """`url` with `password` for its user (percent-encoded), so that the URL itself
    can be non-secret configuration (user, host, sslmode) and the password come
    from a Secret. ValueError if the URL has no user or already has a password."""
    parts = urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    if not at or not user:
        raise ValueError("DATABASE_URL names no user to give the password to")
    if ":" in user:
        raise ValueError("DATABASE_URL already carries a password")
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def _networks(env: _Reader, name: str) -> tuple[IPNetwork, ...]:
    """A comma-separated list of addresses and CIDR networks (`10.0.0.0/8`)."""
    networks: list[IPNetwork] = []
    for item in (part.strip() for part in env.text(name, "").split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as error:
            env.errors.append(f"{name}: {item!r} is not an address or network ({error})")
    return tuple(networks)


_ORIGIN = re.compile(r"https?://[a-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9a-f:.]+\](:[0-9]{1,5})?")


def _origins(env: _Reader, name: str) -> tuple[str, ...]:
    """`*`, or a comma-separated list of origins as browsers send them in `Origin`
    (scheme://host[:port], lower case, no path)."""
    origins = tuple(part.strip() for part in env.text(name, "").split(",") if part.strip())
    if "*" in origins and len(origins) > 1:
        env.errors.append(f"{name}: `*` allows every origin and stands alone")
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            env.errors.append(
                f"{name}: {origin!r} is not an origin (scheme://host[:port], lower case,"
                " no path or trailing slash)"
            )
    return origins


#: The host of a tile URL template: a placeholder only as its whole first label.
_TILE_HOST = re.compile(r"(\{[a-z]\}\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:[0-9]{1,5})?")


def _tile_url_ok(url: str) -> bool:
    """An http(s) URL template, or a path on the gateway (not `//host`), with `{z}`;
    its host fit for a Content-Security-Policy source (the pages' img-src: no user
    info, no `;`, `,` or spaces)."""
    if "{z}" not in url:
        return False
    if url.startswith("/"):
        return not url.startswith(("//", "/\\"))
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(_TILE_HOST.fullmatch(parts.netloc))


#: The `target_session_attrs` values of a DATABASE_URL (libpq's, which asyncpg takes).
TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
#: Those that pick the writable server when the URL names several: every service
#: needs the primary (the projector, the learner and webhooks write; tracking-query
#: LISTENs, which a standby refuses).
PRIMARY_SESSION_ATTRS = ("read-write", "primary")


def database_hosts(url: str) -> list[tuple[str, int | None]]:
    """The (host, port) pairs a postgresql:// URL names, in the order they are tried.

    One host (``postgresql://u@db:5432/x``) or several
    (``postgresql://u@db1:5432,db2:5433/x``, as libpq and asyncpg take them), or
    the ``host=``/``port=`` query parameters when the URL names none (``host=/run/pg``,
    a unix socket); port None when not given (5432, or the ``port=`` list).
    ValueError naming the first malformed part.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("expected a postgresql:// URL")
    # Not parts.hostname/port: they understand one host only.
    userinfo, at, hostspec = parts.netloc.rpartition("@")
    if at and "@" in userinfo:
        raise ValueError("an '@' in the user or password must be percent-encoded (%40)")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    if not hostspec:
        hostspec = query.get("host", [""])[-1]
    if not hostspec:
        return [("", None)]  # libpq's default: the local unix socket
    hosts: list[tuple[str, int | None]] = []
    for spec in hostspec.split(","):
        if spec.startswith("["):  # [IPv6]:port
            address, bracket, rest = spec[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"malformed IPv6 host {spec!r}")
            port_text = rest[1:]
        elif spec.startswith("/"):  # a unix socket directory
            address, port_text = spec, ""
        else:
            address, _, port_text = spec.partition(":")
        if not address:
            raise ValueError(f"empty host in {hostspec!r}")
        port = None
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"port {port_text!r} of host {address!r} is not a TCP port")
            port = int(port_text)
        hosts.append((address, port))
    return hosts


def database_url_problems(url: str) -> list[str]:
    """What keeps `url` from being a usable DATABASE_URL, one line each; [] if nothing.

    Beyond the syntax (`database_hosts`, the query string), a URL naming several
    hosts must say `target_session_attrs=read-write` (or `primary`): without it a
    client keeps the first host that answers, which after a failover may be a
    standby that refuses writes.
    """
    try:
        hosts = database_hosts(url)
        query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    except ValueError as error:
        return [str(error)]
    attrs = query.get("target_session_attrs", [None])[-1]
    if attrs is not None and attrs not in TARGET_SESSION_ATTRS:
        return [
            f"target_session_attrs={attrs!r}: expected one of {', '.join(TARGET_SESSION_ATTRS)}"
        ]
    if len(hosts) > 1 and attrs not in PRIMARY_SESSION_ATTRS:
        return [
            f"names {len(hosts)} hosts but not target_session_attrs=read-write: add it, "
            "so that every service connects to the primary among them"
        ]
    return []


def _opentelemetry_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.sdk.trace") is not None
    except ModuleNotFoundError:  # no opentelemetry package at all
        return False


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    default_grpc_port: int = 0,
    database_optional: bool = False,
) -> Settings:
    """Parse the environment into Settings, or raise ConfigError naming every bad variable.

    default_grpc_port is the service's conventional port, used when
    CARGOTRACK_GRPC_PORT is unset (0 asks the OS for a free one). With
    database_optional (a service that works without PostgreSQL, such as
    delivery-confirmations), an unset DATABASE_URL is no error: settings.database.url
    is then "" and the service uses no database.
    """
    env = _Reader(os.environ if environ is None else environ)
    kafka = KafkaSettings(
        bootstrap_servers=env.required(
            "KAFKA_BOOTSTRAP_SERVERS", "host:port[,host:port] of the Kafka brokers"
        ),
        security_protocol=env.choice("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", SECURITY_PROTOCOLS),
        sasl_mechanism=env.optional("KAFKA_SASL_MECHANISM"),
        sasl_username=env.optional("KAFKA_SASL_USERNAME"),
        sasl_password=env.optional("KAFKA_SASL_PASSWORD"),
        ssl_cafile=env.optional("KAFKA_SSL_CAFILE"),
        request_timeout_s=env.number("CARGOTRACK_KAFKA_TIMEOUT_S", 10.0, minimum=0.1),
        consumer_session_timeout_ms=env.integer(
            "CARGOTRACK_CONSUMER_SESSION_TIMEOUT_MS", 10_000, minimum=1000
        ),
    )
    database = DatabaseSettings(
        url=(
            env.text("DATABASE_URL", "")
            if database_optional
            else env.required("DATABASE_URL", "postgresql://user:password@host:port/database")
        ),
        schema=env.text("CARGOTRACK_DB_SCHEMA", "cargotrack"),
        pool_min=env.integer("CARGOTRACK_DB_POOL_MIN", 1, minimum=0),
        pool_max=env.integer("CARGOTRACK_DB_POOL_MAX", 10, minimum=1),
    )
    if database.url:
        env.errors += [f"DATABASE_URL: {p}" for p in database_url_problems(database.url)]
    password = env.optional("CARGOTRACK_DB_PASSWORD")
    if password is not None and database.url:
        try:
            database = replace(database, url=with_password(database.url, password))
        except ValueError as error:
            env.errors.append(f"CARGOTRACK_DB_PASSWORD: {error}")
    if not database.schema.isidentifier():
        env.errors.append(f"CARGOTRACK_DB_SCHEMA={database.schema!r}: expected an identifier")
    replication_factor = env.integer("CARGOTRACK_TOPIC_REPLICATION_FACTOR", 1, minimum=1)
    topics = TopicSettings(
        prefix=env.text("CARGOTRACK_TOPIC_PREFIX", "cargotrack."),
        partitions=env.integer("CARGOTRACK_TOPIC_PARTITIONS", 6, minimum=1),
        replication_factor=replication_factor,
        min_insync_replicas=env.integer(
            "CARGOTRACK_TOPIC_MIN_INSYNC_REPLICAS",
            default_min_insync_replicas(replication_factor),
            minimum=1,
        ),
        gps_retention_hours=env.integer("CARGOTRACK_GPS_RETENTION_HOURS", 7 * 24, minimum=-1),
        events_retention_hours=env.integer("CARGOTRACK_EVENTS_RETENTION_HOURS", -1, minimum=-1),
        alerts_retention_hours=env.integer("CARGOTRACK_ALERTS_RETENTION_HOURS", 720, minimum=-1),
    )
    if topics.min_insync_replicas > topics.replication_factor:
        env.errors.append(
            f"CARGOTRACK_TOPIC_MIN_INSYNC_REPLICAS={topics.min_insync_replicas}: more than the "
            f"{topics.replication_factor} replicas of CARGOTRACK_TOPIC_REPLICATION_FACTOR, so "
            "every acks=all write would be refused"
        )
    dev_mode = env.flag("CARGOTRACK_DEV_MODE")
    production = env.flag("CARGOTRACK_PRODUCTION")
    jwks_file = env.optional("CARGOTRACK_JWKS_FILE")
    jwks_url = env.optional("CARGOTRACK_JWKS_URL")
    static_secret = env.optional("CARGOTRACK_JWT_SECRET")
    auth = AuthSettings(
        jwt_secret=static_secret
        or (DEV_JWT_SECRET if dev_mode and not (jwks_file or jwks_url) else None),
        jwt_public_key=env.optional("CARGOTRACK_JWT_PUBLIC_KEY"),
        issuer=env.text("CARGOTRACK_JWT_ISSUER", "cargotrack"),
        audience=env.text("CARGOTRACK_JWT_AUDIENCE", "cargotrack"),
        dev_mode=dev_mode,
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        jwks_refresh_s=env.number("CARGOTRACK_JWKS_REFRESH_S", 300.0),
        max_token_lifetime_s=env.integer("CARGOTRACK_JWT_MAX_LIFETIME_S", 24 * 3600, minimum=60),
    )
    static_keys = [auth.jwt_secret, auth.jwt_public_key]
    if jwks_file and jwks_url:
        env.errors.append("CARGOTRACK_JWKS_FILE and CARGOTRACK_JWKS_URL: set one, not both")
    if (jwks_file or jwks_url) and any(static_keys):
        env.errors.append(
            "CARGOTRACK_JWKS_FILE/CARGOTRACK_JWKS_URL: the keys come from the JWKS, so "
            "CARGOTRACK_JWT_SECRET and CARGOTRACK_JWT_PUBLIC_KEY must not be set"
        )
    if jwks_url and not jwks_url.startswith(("https://", "http://")):
        env.errors.append(f"CARGOTRACK_JWKS_URL={jwks_url!r}: expected an http(s) URL")
    if not (jwks_file or jwks_url) and not any(static_keys):
        env.errors.append(
            "CARGOTRACK_JWT_SECRET, CARGOTRACK_JWT_PUBLIC_KEY, CARGOTRACK_JWKS_FILE or "
            "CARGOTRACK_JWKS_URL must be set (or CARGOTRACK_DEV_MODE=1 for the development key)"
        )
    if static_secret is not None and len(static_secret.encode()) < MIN_HS256_SECRET_BYTES:
        env.errors.append(
            f"CARGOTRACK_JWT_SECRET: {len(static_secret.encode())} bytes; an HS256 secret "
            f"needs at least {MIN_HS256_SECRET_BYTES} random bytes"
        )
    if auth.jwt_secret == DEV_JWT_SECRET and not dev_mode:
        env.errors.append("CARGOTRACK_JWT_SECRET: the development key needs CARGOTRACK_DEV_MODE=1")
    if production and dev_mode:
        env.errors.append(
            "CARGOTRACK_DEV_MODE=1 with CARGOTRACK_PRODUCTION=1: a development "
            "configuration cannot run as production"
        )
    if production and auth.jwt_secret == DEV_JWT_SECRET:
        env.errors.append(
            "CARGOTRACK_JWT_SECRET: the development key is public and refused in production"
        )
    grpc_settings = GrpcSettings(
        host=env.text("CARGOTRACK_GRPC_HOST", "127.0.0.1"),
        port=env.integer("CARGOTRACK_GRPC_PORT", default_grpc_port, minimum=0),
        max_message_bytes=env.integer("CARGOTRACK_GRPC_MAX_MESSAGE_BYTES", 4 << 20, minimum=1024),
        tls_cert_file=env.optional("CARGOTRACK_TLS_CERT_FILE"),
        tls_key_file=env.optional("CARGOTRACK_TLS_KEY_FILE"),
        tls_client_ca_file=env.optional("CARGOTRACK_TLS_CLIENT_CA_FILE"),
        health_port=(
            env.integer("CARGOTRACK_GRPC_HEALTH_PORT", 0, minimum=1)
            if env.raw("CARGOTRACK_GRPC_HEALTH_PORT") is not None
            else None
        ),
        shutdown_grace_s=env.number("CARGOTRACK_SHUTDOWN_GRACE_S", 10.0),
        limits=GrpcLimits(
            max_concurrent_streams=env.integer(
                "CARGOTRACK_GRPC_MAX_CONCURRENT_STREAMS", 100, minimum=1
            ),
            max_streams_per_principal=env.integer(
                "CARGOTRACK_GRPC_MAX_STREAMS_PER_PRINCIPAL", 16, minimum=1
            ),
            max_streams_per_process=env.integer(
                "CARGOTRACK_GRPC_MAX_STREAMS_PER_PROCESS", 10_000, minimum=1
            ),
            keepalive_time_s=env.number("CARGOTRACK_GRPC_KEEPALIVE_TIME_S", 60.0, minimum=1.0),
            keepalive_timeout_s=env.number(
                "CARGOTRACK_GRPC_KEEPALIVE_TIMEOUT_S", 20.0, minimum=0.1
            ),
            keepalive_permit_without_calls=env.flag(
                "CARGOTRACK_GRPC_KEEPALIVE_PERMIT_WITHOUT_CALLS", True
            ),
            min_ping_interval_s=env.number("CARGOTRACK_GRPC_MIN_PING_INTERVAL_S", 10.0),
            max_connection_age_s=env.number(
                "CARGOTRACK_GRPC_MAX_CONNECTION_AGE_S", 1800.0, minimum=0.1
            ),
            max_connection_age_grace_s=env.number(
                "CARGOTRACK_GRPC_MAX_CONNECTION_AGE_GRACE_S", 300.0
            ),
        ),
    )
    if bool(grpc_settings.tls_cert_file) != bool(grpc_settings.tls_key_file):
        env.errors.append("CARGOTRACK_TLS_CERT_FILE and CARGOTRACK_TLS_KEY_FILE go together")
    if grpc_settings.tls_client_ca_file and not grpc_settings.tls_cert_file:
        env.errors.append(
            "CARGOTRACK_TLS_CLIENT_CA_FILE (mutual TLS) needs CARGOTRACK_TLS_CERT_FILE "
            "and CARGOTRACK_TLS_KEY_FILE"
        )
    alerts = AlertSettings(
        late_margin_min=env.number("CARGOTRACK_LATE_MARGIN_MIN", 15.0),
        at_risk_margin_min=env.number("CARGOTRACK_AT_RISK_MARGIN_MIN", 5.0),
        late_probability=env.number("CARGOTRACK_LATE_PROBABILITY", 0.8),
        at_risk_probability=env.number("CARGOTRACK_AT_RISK_PROBABILITY", 0.3),
        stale_after_min=env.number("CARGOTRACK_STALE_AFTER_MIN", 10.0, minimum=0.1),
        track_cache_fixes=env.integer("CARGOTRACK_TRACK_CACHE_FIXES", 1_000_000, minimum=0),
    )
    if not 0 < alerts.at_risk_probability <= alerts.late_probability <= 1:
        env.errors.append(
            "CARGOTRACK_AT_RISK_PROBABILITY and CARGOTRACK_LATE_PROBABILITY: need"
            f" 0 < at-risk ({alerts.at_risk_probability}) <= late"
            f" ({alerts.late_probability}) <= 1"
        )
    learner = LearnerSettings(
        half_life_days=env.number("CARGOTRACK_LEARNER_HALF_LIFE_DAYS", 14.0, minimum=0.001),
        max_cells=env.integer("CARGOTRACK_LEARNER_MAX_CELLS", 50_000, minimum=1),
        snapshot_every_s=env.number("CARGOTRACK_LEARNER_SNAPSHOT_EVERY_S", 600.0, minimum=1.0),
        settle_s=env.number("CARGOTRACK_LEARNER_SETTLE_S", 120.0, minimum=0.0),
        keep_versions=env.integer("CARGOTRACK_LEARNER_KEEP_VERSIONS", 10, minimum=2),
        timezone=env.text("CARGOTRACK_LEARNER_TIMEZONE", "UTC"),
        model_poll_s=env.number("CARGOTRACK_MODEL_POLL_S", 5.0, minimum=0.1),
    )
    try:
        ZoneInfo(learner.timezone)
    except (ValueError, ZoneInfoNotFoundError):
        env.errors.append(
            f"CARGOTRACK_LEARNER_TIMEZONE={learner.timezone!r}: expected an IANA time zone"
        )
    webhooks = WebhookSettings(
        max_attempts=env.integer("CARGOTRACK_WEBHOOK_MAX_ATTEMPTS", 8, minimum=1),
        backoff_s=env.number("CARGOTRACK_WEBHOOK_BACKOFF_S", 10.0, minimum=0.01),
        backoff_max_s=env.number("CARGOTRACK_WEBHOOK_BACKOFF_MAX_S", 3600.0, minimum=0.01),
        connect_timeout_s=env.number("CARGOTRACK_WEBHOOK_CONNECT_TIMEOUT_S", 5.0, minimum=0.1),
        timeout_s=env.number("CARGOTRACK_WEBHOOK_TIMEOUT_S", 10.0, minimum=0.1),
        concurrency=env.integer("CARGOTRACK_WEBHOOK_CONCURRENCY", 16, minimum=1),
        poll_s=env.number("CARGOTRACK_WEBHOOK_POLL_S", 1.0, minimum=0.01),
        allow_private=env.flag("CARGOTRACK_WEBHOOK_ALLOW_PRIVATE"),
        allow_http=env.flag("CARGOTRACK_WEBHOOK_ALLOW_HTTP", not production),
        retention_days=env.integer("CARGOTRACK_WEBHOOK_RETENTION_DAYS", 30, minimum=1),
    )
    if webhooks.backoff_max_s < webhooks.backoff_s:
        env.errors.append(
            f"CARGOTRACK_WEBHOOK_BACKOFF_MAX_S={webhooks.backoff_max_s:g}: must be at least"
            f" CARGOTRACK_WEBHOOK_BACKOFF_S ({webhooks.backoff_s:g})"
        )
    if production and webhooks.allow_private:
        env.errors.append(
            "CARGOTRACK_WEBHOOK_ALLOW_PRIVATE=1 with CARGOTRACK_PRODUCTION=1: private and"
            " loopback webhook targets are a development setting"
        )
    gateway = GatewaySettings(
        http_port=env.integer("CARGOTRACK_HTTP_PORT", 8080, minimum=0),
        tracking_target=env.text("CARGOTRACK_GATEWAY_TRACKING_TARGET", "127.0.0.1:50054"),
        dispatch_target=env.text("CARGOTRACK_GATEWAY_DISPATCH_TARGET", "127.0.0.1:50055"),
        heartbeat_s=env.number("CARGOTRACK_GATEWAY_HEARTBEAT_S", 15.0, minimum=0.1),
        tile_url=env.text("CARGOTRACK_MAP_TILE_URL", ""),
        tls_ca_file=env.optional("CARGOTRACK_GATEWAY_TLS_CA_FILE"),
        trusted_proxies=_networks(env, "CARGOTRACK_GATEWAY_TRUSTED_PROXIES"),
        rate_per_s=env.number("CARGOTRACK_GATEWAY_RATE_PER_S", 2.0),
        rate_burst=env.integer("CARGOTRACK_GATEWAY_RATE_BURST", 40, minimum=1),
        rate_clients=env.integer("CARGOTRACK_GATEWAY_RATE_CLIENTS", 50_000, minimum=1),
        max_streams_per_client=env.integer(
            "CARGOTRACK_GATEWAY_MAX_STREAMS_PER_CLIENT", 16, minimum=1
        ),
        max_streams=env.integer("CARGOTRACK_GATEWAY_MAX_STREAMS", 10_000, minimum=1),
        cors_origins=_origins(env, "CARGOTRACK_GATEWAY_CORS_ORIGINS"),
        idle_timeout_s=env.number("CARGOTRACK_GATEWAY_IDLE_TIMEOUT_S", 75.0, minimum=1.0),
    )
    for name, target in (
        ("CARGOTRACK_GATEWAY_TRACKING_TARGET", gateway.tracking_target),
        ("CARGOTRACK_GATEWAY_DISPATCH_TARGET", gateway.dispatch_target),
    ):
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            env.errors.append(f"{name}={target!r}: expected host:port")
    if gateway.tile_url and not _tile_url_ok(gateway.tile_url):
        env.errors.append(
            f"CARGOTRACK_MAP_TILE_URL={gateway.tile_url!r}: expected an http(s) URL template"
            " with {z}, {x} and {y} (a placeholder in the host only as its first label,"
            " `{s}.`), or a path on the gateway"
        )
    settings = Settings(
        kafka=kafka,
        gateway=gateway,
        database=database,
        topics=topics,
        auth=auth,
        grpc=grpc_settings,
        alerts=alerts,
        learner=learner,
        webhooks=webhooks,
        metrics_port=env.integer("CARGOTRACK_METRICS_PORT", 0, minimum=0),
        log_format=env.choice("CARGOTRACK_LOG_FORMAT", "json", ("json", "console")),
        log_level=env.choice("CARGOTRACK_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        tracing=env.flag("CARGOTRACK_TRACING"),
        position_retention_days=env.integer("CARGOTRACK_POSITION_RETENTION_DAYS", 30, minimum=1),
        projector_max_records=env.integer("CARGOTRACK_PROJECTOR_MAX_RECORDS", 5000, minimum=1),
        projector_latency_budget_ms=env.integer(
            "CARGOTRACK_PROJECTOR_LATENCY_BUDGET_MS", 100, minimum=0
        ),
        projector_pipelined=env.flag("CARGOTRACK_PROJECTOR_PIPELINED"),
        page_token_key=env.optional("CARGOTRACK_PAGE_TOKEN_KEY"),
        processes=env.integer("CARGOTRACK_PROCESSES", 1, minimum=1),
        query_cache_mb=env.integer("CARGOTRACK_QUERY_CACHE_MB", 64, minimum=0),
    )
    if settings.processes > MAX_PROCESSES:
        env.errors.append(
            f"CARGOTRACK_PROCESSES={settings.processes}: at most {MAX_PROCESSES}"
            " (one per core of the pod; scale further with replicas)"
        )
    if (
        settings.processes > 1
        and settings.metrics_port
        and settings.metrics_port + settings.processes > 65535
    ):
        env.errors.append(
            f"CARGOTRACK_METRICS_PORT={settings.metrics_port}: with CARGOTRACK_PROCESSES="
            f"{settings.processes} the workers also use the {settings.processes} ports above"
            " it (on 127.0.0.1), which must be at most 65535"
        )
    if settings.page_token_key is not None and len(settings.page_token_key) < MIN_PAGE_TOKEN_KEY:
        env.errors.append(
            f"CARGOTRACK_PAGE_TOKEN_KEY: must be at least {MIN_PAGE_TOKEN_KEY} characters"
        )
    if settings.query_cache_mb > MAX_QUERY_CACHE_MB:
        env.errors.append(
            f"CARGOTRACK_QUERY_CACHE_MB={settings.query_cache_mb}: counts MiB, at most"
            f" {MAX_QUERY_CACHE_MB} (was a number of bytes meant?)"
        )
    if settings.tracing and not _opentelemetry_installed():
        env.errors.append(
            "CARGOTRACK_TRACING=1: OpenTelemetry is not installed"
            " (install opentelemetry-api and opentelemetry-sdk, or unset CARGOTRACK_TRACING)"
        )
    if env.errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(env.errors))
    return settings
