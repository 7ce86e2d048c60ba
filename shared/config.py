"""Every environment variable cargotrack reads, parsed once into typed settings.

`load_settings()` reads the environment at start-up and either returns a
`Settings` or raises `ConfigError` naming every bad variable, so a service never
starts half-configured. Nothing else in the code base reads `os.environ` for
configuration.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

#: The signing secret of the local stack and the tests. Never accepted unless
#: CARGOTRACK_DEV_MODE=1, so a production deployment cannot run with it by mistake.
DEV_JWT_SECRET = "cargotrack-dev-signing-key-not-for-production"

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
#: Shortest CARGOTRACK_PAGE_TOKEN_KEY accepted (characters).
MIN_PAGE_TOKEN_KEY = 32


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
    """How bearer tokens are verified (HS256 secret or an asymmetric public key)."""

    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    issuer: str = "cargotrack"
    audience: str = "cargotrack"
    dev_mode: bool = False

    @property
    def algorithms(self) -> list[str]:
        return ["RS256", "ES256"] if self.jwt_public_key else ["HS256"]

    @property
    def verification_key(self) -> str:
        key = self.jwt_public_key or self.jwt_secret
        assert key is not None  # load_settings guarantees one of them
        return key


@dataclass(frozen=True)
class GrpcSettings:
    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = 4 * 1024 * 1024
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: Seconds in-flight RPCs get to finish on shutdown.
    shutdown_grace_s: float = 10.0


@dataclass(frozen=True)
class AlertSettings:
    late_margin_min: float = 15.0
    at_risk_margin_min: float = 5.0
    stale_after_min: float = 10.0
    #: Most GPS fixes the projector keeps in memory (each vehicle's recent track, so
    #: live tracking need not read it back from PostgreSQL); about 250 bytes each.
    #: 0 turns the cache off.
    track_cache_fixes: int = 1_000_000


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings
    database: DatabaseSettings
    topics: TopicSettings = field(default_factory=TopicSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    grpc: GrpcSettings = field(default_factory=GrpcSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    metrics_port: int = 0
    log_format: str = "json"
    log_level: str = "INFO"
    #: OpenTelemetry tracing (shared/tracing.py); needs opentelemetry-api and -sdk.
    tracing: bool = False
    #: Position history older than this is dropped (partitions are per day).
    position_retention_days: int = 30
    #: Most records the projector applies in one transaction.
    projector_max_records: int = 5000
    #: Key of the MAC on ListShipments page tokens (tracking-query); None: derived from
    #: the JWT secret, and required when there is none (see page_token_key_bytes()).
    page_token_key: str | None = None

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

    def flag(self, name: str) -> bool:
        def parse(raw: str) -> bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)

        return self._parse(name, False, parse, "1/0, true/false, yes/no or on/off")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            self.errors.append(f"{name}={value!r}: expected one of {', '.join(choices)}")
        return value


def _opentelemetry_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.sdk.trace") is not None
    except ModuleNotFoundError:  # no opentelemetry package at all
        return False


def load_settings(
    environ: Mapping[str, str] | None = None, *, default_grpc_port: int = 0
) -> Settings:
    """Parse the environment into Settings, or raise ConfigError naming every bad variable.

    default_grpc_port is the service's conventional port, used when
    CARGOTRACK_GRPC_PORT is unset (0 asks the OS for a free one).
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
        url=env.required("DATABASE_URL", "postgresql://user:password@host:port/database"),
        schema=env.text("CARGOTRACK_DB_SCHEMA", "cargotrack"),
        pool_min=env.integer("CARGOTRACK_DB_POOL_MIN", 1, minimum=0),
        pool_max=env.integer("CARGOTRACK_DB_POOL_MAX", 10, minimum=1),
    )
    if database.url and not database.url.startswith(("postgres://", "postgresql://")):
        env.errors.append("DATABASE_URL: expected a postgresql:// URL")
    if not database.schema.isidentifier():
        env.errors.append(f"CARGOTRACK_DB_SCHEMA={database.schema!r}: expected an identifier")
    topics = TopicSettings(
        prefix=env.text("CARGOTRACK_TOPIC_PREFIX", "cargotrack."),
        partitions=env.integer("CARGOTRACK_TOPIC_PARTITIONS", 6, minimum=1),
        replication_factor=env.integer("CARGOTRACK_TOPIC_REPLICATION_FACTOR", 1, minimum=1),
        gps_retention_hours=env.integer("CARGOTRACK_GPS_RETENTION_HOURS", 7 * 24, minimum=-1),
        events_retention_hours=env.integer("CARGOTRACK_EVENTS_RETENTION_HOURS", -1, minimum=-1),
        alerts_retention_hours=env.integer("CARGOTRACK_ALERTS_RETENTION_HOURS", 720, minimum=-1),
    )
    dev_mode = env.flag("CARGOTRACK_DEV_MODE")
    auth = AuthSettings(
        jwt_secret=env.optional("CARGOTRACK_JWT_SECRET") or (DEV_JWT_SECRET if dev_mode else None),
        jwt_public_key=env.optional("CARGOTRACK_JWT_PUBLIC_KEY"),
        issuer=env.text("CARGOTRACK_JWT_ISSUER", "cargotrack"),
        audience=env.text("CARGOTRACK_JWT_AUDIENCE", "cargotrack"),
        dev_mode=dev_mode,
    )
    if auth.jwt_secret is None and auth.jwt_public_key is None:
        env.errors.append(
            "CARGOTRACK_JWT_SECRET or CARGOTRACK_JWT_PUBLIC_KEY must be set "
            "(or CARGOTRACK_DEV_MODE=1 for the development key)"
        )
    if auth.jwt_secret == DEV_JWT_SECRET and not dev_mode:
        env.errors.append("CARGOTRACK_JWT_SECRET: the development key needs CARGOTRACK_DEV_MODE=1")
    grpc_settings = GrpcSettings(
        host=env.text("CARGOTRACK_GRPC_HOST", "127.0.0.1"),
        port=env.integer("CARGOTRACK_GRPC_PORT", default_grpc_port, minimum=0),
        max_message_bytes=env.integer("CARGOTRACK_GRPC_MAX_MESSAGE_BYTES", 4 << 20, minimum=1024),
        tls_cert_file=env.optional("CARGOTRACK_TLS_CERT_FILE"),
        tls_key_file=env.optional("CARGOTRACK_TLS_KEY_FILE"),
        shutdown_grace_s=env.number("CARGOTRACK_SHUTDOWN_GRACE_S", 10.0),
    )
    if bool(grpc_settings.tls_cert_file) != bool(grpc_settings.tls_key_file):
        env.errors.append("CARGOTRACK_TLS_CERT_FILE and CARGOTRACK_TLS_KEY_FILE go together")
    alerts = AlertSettings(
        late_margin_min=env.number("CARGOTRACK_LATE_MARGIN_MIN", 15.0),
        at_risk_margin_min=env.number("CARGOTRACK_AT_RISK_MARGIN_MIN", 5.0),
        stale_after_min=env.number("CARGOTRACK_STALE_AFTER_MIN", 10.0, minimum=0.1),
        track_cache_fixes=env.integer("CARGOTRACK_TRACK_CACHE_FIXES", 1_000_000, minimum=0),
    )
    settings = Settings(
        kafka=kafka,
        database=database,
        topics=topics,
        auth=auth,
        grpc=grpc_settings,
        alerts=alerts,
        metrics_port=env.integer("CARGOTRACK_METRICS_PORT", 0, minimum=0),
        log_format=env.choice("CARGOTRACK_LOG_FORMAT", "json", ("json", "console")),
        log_level=env.choice("CARGOTRACK_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        tracing=env.flag("CARGOTRACK_TRACING"),
        position_retention_days=env.integer("CARGOTRACK_POSITION_RETENTION_DAYS", 30, minimum=1),
        projector_max_records=env.integer("CARGOTRACK_PROJECTOR_MAX_RECORDS", 5000, minimum=1),
        page_token_key=env.optional("CARGOTRACK_PAGE_TOKEN_KEY"),
    )
    if settings.page_token_key is not None and len(settings.page_token_key) < MIN_PAGE_TOKEN_KEY:
        env.errors.append(
            f"CARGOTRACK_PAGE_TOKEN_KEY: must be at least {MIN_PAGE_TOKEN_KEY} characters"
        )
    if settings.tracing and not _opentelemetry_installed():
        env.errors.append(
            "CARGOTRACK_TRACING=1: OpenTelemetry is not installed"
            " (install opentelemetry-api and opentelemetry-sdk, or unset CARGOTRACK_TRACING)"
        )
    if env.errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(env.errors))
    return settings
