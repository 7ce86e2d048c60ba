"""Prometheus metrics of every cargotrack process, and the HTTP server that exposes them.

Every series is named `cargotrack_*` and lives in prometheus_client's default
registry, next to its process and platform collectors (`process_resident_memory_bytes`,
`process_cpu_seconds_total`, `python_gc_*`). Labels are low-cardinality by rule:
service, method, code, topic, partition, outcome, kind, source, horizon, version.
Never an id of a shipment, vehicle, tenant or event: those belong in logs and traces.

Who records what:

- `shared.rpc.TelemetryInterceptor`: every gRPC call of every server (requests by
  method and status code, latency, calls in flight), so the query service's traffic
  is measured there;
- `shared.kafka` / `shared.ingest.KafkaLink`: every write to Kafka (produce latency,
  records, failures) by topic;
- `services.tracking_query.cache`: the response cache's hits, misses and size;
- `services.gps_ingest.servicer`: GPS batches and points;
- `shared.projection.ProjectionRunner`: the projector's batches, records applied,
  fold and commit latency, dead letters, offset conflicts, consumer lag;
- `services.projector.freshness`: receipt-to-visible age of GPS records;
- `services.projector.outbox`: alerts published by kind;
- `services.webhooks`: webhook deliveries recorded, attempts by outcome and latency.

`serve_metrics(settings, label)` runs `MetricsServer` for a service's lifetime when
CARGOTRACK_METRICS_PORT is above 0. docs/operations.md lists every series and what
to alert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.exposition import start_http_server

from shared import tracing
from shared.config import Settings
from shared.pb import alerts_pb2

log = logging.getLogger(__name__)

# No `*_created` companion of every counter and histogram: it doubles the series count
# and nothing of ours reads it (counter resets show in the rate functions anyway).
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Seconds: from sub-millisecond (a health check) to a minute (a slow stream).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Records per batch: GPS batches hold 1 to 1000 points, projector batches up to
#: CARGOTRACK_PROJECTOR_MAX_RECORDS (5000 by default).
SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

# --- service -----------------------------------------------------------------------------

SERVICE_INFO = Info(
    "cargotrack_service", "Which cargotrack service this process runs, and its version."
)

# --- gRPC (shared.rpc.TelemetryInterceptor) ------------------------------------------------

GRPC_HANDLED = Counter(
    "cargotrack_grpc_server_handled",
    "gRPC calls completed, by full service name, method and status code.",
    ["service", "method", "code"],
)
GRPC_LATENCY = Histogram(
    "cargotrack_grpc_server_handling_seconds",
    "Duration of gRPC calls (for streams: how long the stream was open).",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge(
    "cargotrack_grpc_server_in_flight",
    "gRPC calls in progress (open streams included).",
    ["service", "method"],
)

# --- tracking-query's response cache (services/tracking_query/cache.py) ------------

QUERY_CACHE_LOOKUPS = Counter(
    "cargotrack_query_cache_lookups",
    "GetShipment and TrackByToken calls by what the response cache did: hit (answered"
    " from memory), miss (read PostgreSQL), bypass (cache off, or the change feed not"
    " listening).",
    ["outcome"],
)
QUERY_CACHE_BYTES = Gauge(
    "cargotrack_query_cache_bytes",
    "Memory counted against CARGOTRACK_QUERY_CACHE_MB: cached answers plus their overhead.",
)

# --- HTTP gateway (services/http_gateway) ---------------------------------------------

HTTP_REQUESTS = Counter(
    "cargotrack_http_requests",
    "HTTP requests answered by the http-gateway, by RPC method (or page) and HTTP status.",
    ["method", "code"],
)
HTTP_OPEN_STREAMS = Gauge(
    "cargotrack_http_open_streams",
    "Server-Sent Events / NDJSON streams the http-gateway holds open, by RPC method.",
    ["method"],
)

# --- Kafka writes (shared.kafka, shared.ingest) ---------------------------------------

PRODUCE_LATENCY = Histogram(
    "cargotrack_kafka_produce_seconds",
    "From handing records to the producer until Kafka acknowledged all of them"
    " (one observation per write call: a GPS group, an event, an outbox batch).",
    ["topic"],
    buckets=LATENCY_BUCKETS,
)
PRODUCED_RECORDS = Counter(
    "cargotrack_kafka_produced_records",
    "Records Kafka acknowledged, by topic.",
    ["topic"],
)
PRODUCE_FAILURES = Counter(
    "cargotrack_kafka_produce_failures",
    "Write calls that Kafka did not acknowledge in time (answered UNAVAILABLE), by topic.",
    ["topic"],
)

# --- Delivery confirmations (services.delivery_confirmations.precheck) ----------------

CONFIRMATION_PRECHECKS = Counter(
    "cargotrack_confirmation_prechecks",
    "Delivery confirmations checked against the read model, by outcome: passed;"
    " not_assigned or settled (refused, nothing written); unknown, unassigned,"
    " unavailable or skipped (accepted unchecked, the fold decides).",
    ["outcome"],
)

# --- GPS ingest (services.gps_ingest.servicer) -----------------------------------------

GPS_BATCHES = Counter(
    "cargotrack_gps_batches",
    "GPS batches answered, by outcome: accepted, partially_accepted (stored, some points"
    " refused) or rejected (nothing stored).",
    ["outcome"],
)
GPS_POINTS_INGESTED = Counter(
    "cargotrack_gps_points_ingested",
    "GPS points stored on Kafka (acknowledged).",
)
GPS_POINTS_REJECTED = Counter(
    "cargotrack_gps_points_rejected",
    "GPS points refused by validation (in rejected and partially accepted batches).",
)
GPS_BATCH_POINTS = Histogram(
    "cargotrack_gps_batch_points",
    "Points per GPS batch received.",
    buckets=SIZE_BUCKETS,
)

# --- projector (shared.projection.ProjectionRunner) ------------------------------------

PROJECTOR_BATCHES = Counter(
    "cargotrack_projector_batches",
    "Poll batches applied and committed (one PostgreSQL transaction each).",
)
PROJECTOR_RECORDS = Counter(
    "cargotrack_projector_records_applied",
    "Records applied and committed, by topic.",
    ["topic"],
)
PROJECTOR_BATCH_RECORDS = Histogram(
    "cargotrack_projector_batch_records",
    "Records per applied batch.",
    buckets=SIZE_BUCKETS,
)
PROJECTOR_BATCH_LATENCY = Histogram(
    "cargotrack_projector_batch_seconds",
    "Fold plus commit of one batch: from opening its transaction until PostgreSQL committed.",
    buckets=LATENCY_BUCKETS,
)
PROJECTOR_FOLD_LATENCY = Histogram(
    "cargotrack_projector_fold_seconds",
    "The projection's apply() of one batch (folds, live tracking, alert decisions).",
    buckets=LATENCY_BUCKETS,
)
PROJECTOR_COMMIT_LATENCY = Histogram(
    "cargotrack_projector_commit_seconds",
    "Saving the offsets and committing one batch's transaction.",
    buckets=LATENCY_BUCKETS,
)
PROJECTOR_DEAD_LETTERS = Counter(
    "cargotrack_projector_dead_letters",
    "Records dead-lettered (undecodable, wrong topic, unstorable), by source topic.",
    ["topic"],
)
PROJECTOR_TRACK_CACHE = Counter(
    "cargotrack_projector_track_cache_lookups",
    "Vehicle tracks live tracking needed, by where they came from (memory or database).",
    ["source"],
)
PROJECTOR_TRACK_CACHE_FIXES = Gauge(
    "cargotrack_projector_track_cache_fixes",
    "GPS fixes held in the projector's in-memory recent tracks.",
)
PROJECTOR_OFFSET_CONFLICTS = Counter(
    "cargotrack_projector_offset_conflicts",
    "Batches rolled back because another instance (or a rebuild) moved the stored offsets.",
)
PROJECTOR_FRESHNESS = Histogram(
    "cargotrack_projector_freshness_seconds",
    "From the moment ingest accepted a record (its envelope's recorded_at) until the"
    " transaction that applied it committed; observed once per batch, for its oldest record.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0),
)
#: Seconds around the 100 ms receipt-to-visible target of issue #16, up to half a minute.
FRESHNESS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
PROJECTOR_GPS_FRESHNESS = Histogram(
    "cargotrack_projector_gps_freshness_seconds",
    "From gps-ingest accepting a GPS batch (its envelope's recorded_at) until the projector"
    " transaction that applied it committed: one observation per GPS record, none for a"
    " transaction that rolled back.",
    buckets=FRESHNESS_BUCKETS,
)
PROJECTOR_LAG = Gauge(
    "cargotrack_projector_consumer_lag",
    "Records on Kafka not yet applied, per owned partition: the partition's end offset as"
    " last fetched minus the next offset to apply.",
    ["topic", "partition"],
)

# --- alerts and ETA (services.projector) -------------------------------------------------

LEARNER_POINTS = Counter(
    "cargotrack_learner_points_total",
    "GPS points the speed learner received, by outcome (learned, late)",
    ["outcome"],
)
LEARNER_MODEL_VERSION = Gauge(
    "cargotrack_learner_model_version",
    "Newest model version (event time, epoch s) the learner stored or the projector"
    " loaded, over all tenants",
    ["role"],
)
ALERTS_PUBLISHED = Counter(
    "cargotrack_alerts_published",
    "Alerts the outbox relay published to the alerts topic, by kind.",
    ["kind"],
)
OUTBOX_BACKLOG_AGE = Gauge(
    "cargotrack_outbox_backlog_age_seconds",
    "Age of the oldest alert decided but not yet published, as this relay last saw it"
    " (0 when the outbox was empty or another relay held the outbox lock).",
)
# --- webhooks (services.webhooks) ------------------------------------------------------

WEBHOOK_DELIVERIES = Counter(
    "cargotrack_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered (2xx), retry (failed, attempted"
    " again later), dead (failed for the last time: dead-lettered)",
    ["outcome"],
)
WEBHOOK_ATTEMPT_LATENCY = Histogram(
    "cargotrack_webhook_attempt_seconds",
    "Duration of one webhook attempt: address check, connect, request, response head",
    buckets=LATENCY_BUCKETS,
)
WEBHOOK_RECORDED = Counter(
    "cargotrack_webhook_deliveries_recorded_total",
    "Deliveries the webhook consumer recorded (one per matching endpoint and alert)",
)

ETA_ERROR = Histogram(
    "cargotrack_eta_error_seconds",
    "Absolute difference between a shipment's actual arrival and the ETA it was shown,"
    " per tenant and horizon (60m/30m/15m/5m before arrival, 25%/50%/75% of the trip);"
    " observed once per arrival, when its transaction commits.",
    ["tenant", "horizon"],
    buckets=(30, 60, 120, 300, 600, 900, 1800, 3600, 7200),
)

# --- certificates (shared.rpc, shared.config) ---------------------------------------------

TLS_CERTIFICATE_EXPIRY = Gauge(
    "cargotrack_tls_certificate_expiry_timestamp_seconds",
    "When a certificate this process loaded expires (notAfter, Unix time), by which one:"
    " grpc_server (CARGOTRACK_TLS_CERT_FILE) or kafka_ca (KAFKA_SSL_CAFILE, the earliest).",
    ["certificate"],
)


def alert_kind(kind: int) -> str:
    """The label of an AlertKind: ALERT_KIND_AT_RISK -> "at_risk"."""
    try:
        name = alerts_pb2.AlertKind.Name(kind)  # type: ignore[arg-type]
    except ValueError:
        return "unknown"
    return name.removeprefix("ALERT_KIND_").lower()


def count_alerts_published(kinds: Iterable[int]) -> None:
    """Count alerts the outbox relay published (after Kafka acknowledged them)."""
    for kind in kinds:
        ALERTS_PUBLISHED.labels(alert_kind(kind)).inc()


@contextlib.contextmanager
def produce_timer(topic: str, records: int) -> Iterator[None]:
    """Time one write call of `records` records to `topic`: latency and records on
    success, a failure on an exception (which propagates); a cancelled call counts as
    neither."""
    started = time.perf_counter()
    try:
        yield
    except Exception:
        PRODUCE_FAILURES.labels(topic).inc()
        raise
    PRODUCE_LATENCY.labels(topic).observe(time.perf_counter() - started)
    PRODUCED_RECORDS.labels(topic).inc(records)


class MetricsServer:
    """prometheus_client's HTTP exposition server (a thread), stoppable.

    Serves the registry on `http://host:port/metrics` (any path answers the same).
    `start()` binds and returns the port (port 0 picks a free one); `stop()` shuts the
    thread down and closes the socket; it is idempotent and safe before `start()`.
    """

    def __init__(
        self, port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
    ) -> None:
        self._port = port
        self._host = host
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("MetricsServer.start() called twice")
        try:
            server, thread = start_http_server(self._port, self._host, self._registry)
        except OSError as error:
            raise OSError(
                f"cannot serve metrics on {self._host}:{self._port}: {error.strerror or error}"
                " (CARGOTRACK_METRICS_PORT)"
            ) from error
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # shutdown() waits for serve_forever's poll loop (up to 0.5 s): not on the loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)


def _version() -> str:
    try:
        return metadata.version("cargotrack")
    except metadata.PackageNotFoundError:
        return "unknown"


@contextlib.asynccontextmanager
async def serve_metrics(settings: Settings, label: str) -> AsyncIterator[MetricsServer | None]:
    """Expose the metrics of service `label` on settings.metrics_port for the block's
    duration (yields None when the port is 0: metrics off). Binds the gRPC host, so the
    local suite serves on loopback and Kubernetes (0.0.0.0) on every interface; a
    worker of several processes binds loopback (settings.metrics_host), and its parent
    serves all workers' metrics (shared/workers.py)."""
    SERVICE_INFO.info({"service": label, "version": _version()})
    record_certificate_expiry("grpc_server", settings.grpc.tls_cert_file)
    record_certificate_expiry("kafka_ca", settings.kafka.ssl_cafile)
    if settings.metrics_port <= 0:
        yield None
        return
    host = settings.metrics_host or settings.grpc.host
    server = MetricsServer(settings.metrics_port, host)
    port = server.start()
    log.info("%s metrics on %s:%d/metrics", label, host, port)
    try:
        yield server
    finally:
        await server.stop()


def record_certificate_expiry(certificate: str, path: str | None) -> float | None:
    """Export the notAfter of the certificates in PEM file `path` (the earliest of them)
    as `certificate`; returns it, or None when `path` is None or holds no certificate.
    A file that cannot be read is not this function's business (TLS set-up reports it)."""
    if not path:
        return None
    expiries = _not_after(path)
    if not expiries:
        return None
    earliest = min(expiries)
    TLS_CERTIFICATE_EXPIRY.labels(certificate).set(earliest)
    return earliest


def _not_after(path: str) -> list[float]:
    """The notAfter (Unix time) of every certificate in a PEM file; [] if unreadable."""
    try:
        pem = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return []
    found: list[float] = []
    for block in re.findall(
        r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL
    ):
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as one:
            one.write(block + "\n")
            one.flush()
            try:
                # The standard library's certificate decoder (what ssl uses for
                # getpeercert); no X.509 package is a dependency of cargotrack.
                decoded = ssl._ssl._test_decode_cert(one.name)  # type: ignore[attr-defined]
            except (ssl.SSLError, OSError, ValueError):
                continue
        found.append(float(ssl.cert_time_to_seconds(decoded["notAfter"])))
    return found


def forget_partitions(partitions: list[tuple[str, int]]) -> None:
    """Drop the lag series of partitions this process no longer owns."""
    for topic, partition in partitions:
        with contextlib.suppress(KeyError):
            PROJECTOR_LAG.remove(topic, str(partition))


@contextlib.asynccontextmanager
async def service_telemetry(settings: Settings, label: str) -> AsyncIterator[MetricsServer | None]:
    """Metrics server and tracing of service `label`, for the block's duration.

    Enter it first and leave it last, so the final scrape and the last spans cover
    the shutdown: `await stack.enter_async_context(service_telemetry(settings, LABEL))`.
    """
    with tracing.session(settings, label):
        async with serve_metrics(settings, label) as server:
            yield server
