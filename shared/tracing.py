"""OpenTelemetry tracing across gRPC → Kafka → projector; off unless CARGOTRACK_TRACING=1.

The trace of a write crosses three hops:

1. `shared.rpc.TelemetryInterceptor` starts a SERVER span per RPC, continuing the
   caller's `traceparent` metadata when it sent one, and makes it current for the
   RPC (each RPC runs in its own task, so nothing leaks to other calls).
2. The ingest services write the W3C traceparent of the current span (for GPS: of
   a span per batch, child of the stream's span) into `Envelope.traceparent`, and
   `shared.envelopes.headers_for` copies it into the Kafka `traceparent` header.
3. `shared.projection.ProjectionRunner` applies each poll batch under one CONSUMER
   span that *links* to the context of every record in it (a batch folds records
   of many traces, so none of them is its parent).

OpenTelemetry is optional: this module imports it lazily, `load_settings` refuses
CARGOTRACK_TRACING=1 when it is not installed, and with tracing off every function
here is a cheap no-op (`start_span` returns a handle that does nothing).

Spans are exported only when an exporter is installed: with
`opentelemetry-exporter-otlp-proto-grpc` in the image, `setup` adds an OTLP
exporter configured by the standard OTEL_EXPORTER_OTLP_* variables. Without one,
tracing still gives every log line of a traced call its `trace_id` and carries the
trace through Kafka. The sampler follows the SDK's OTEL_TRACES_SAMPLER variables
(default: every root span, and whatever the caller sampled).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Literal

import structlog

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Tracer

    from shared.config import Settings

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "cargotrack"
#: OpenTelemetry's default limit of links per span; more would be dropped silently.
MAX_LINKS = 128

Kind = Literal["internal", "server", "client", "producer", "consumer"]
Attributes = Mapping[str, str | int | float | bool]

_tracer: Tracer | None = None
_provider: TracerProvider | None = None


def available() -> bool:
    """True when opentelemetry-api and opentelemetry-sdk are installed."""
    try:
        return importlib.util.find_spec("opentelemetry.sdk.trace") is not None
    except ModuleNotFoundError:
        return False


def enabled() -> bool:
    """True when this process traces (setup() or install() was called)."""
    return _tracer is not None


def setup(service_name: str) -> bool:
    """Install a TracerProvider for this process, named `service_name`.

    Does nothing and returns False when one is installed already (a test's
    in-memory provider, or another service of the same process); True when this
    call installed it, and should call `shutdown()` at the end.
    """
    if _provider is not None:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": service_name, "service.namespace": "cargotrack"})
    provider = TracerProvider(resource=resource)
    exporter = _otlp_exporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing on: exporting spans over OTLP")
    else:
        log.info("tracing on: no exporter installed; trace ids go to logs and Kafka headers")
    install(provider)
    # For libraries that trace through the global API. Set once per process.
    with contextlib.suppress(Exception):
        trace.set_tracer_provider(provider)
    return True


def _otlp_exporter() -> SpanExporter | None:
    """An OTLP span exporter when its package is installed (it reads OTEL_EXPORTER_OTLP_*)."""
    name = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except ModuleNotFoundError:
        return None
    exporter: SpanExporter = importlib.import_module(name).OTLPSpanExporter()
    return exporter


def install(provider: TracerProvider) -> None:
    """Trace with `provider` (tests pass one with an in-memory exporter)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION_NAME)


def uninstall() -> None:
    """Stop tracing in this process (the provider is left as it is)."""
    global _tracer, _provider
    _tracer = None
    _provider = None


def shutdown() -> None:
    """Flush and stop the provider, then stop tracing."""
    provider = _provider
    uninstall()
    if provider is not None:
        provider.shutdown()


@contextlib.contextmanager
def session(settings: Settings, service_name: str) -> Iterator[None]:
    """Trace for the block's duration when settings.tracing is on."""
    installed = settings.tracing and setup(service_name)
    try:
        yield
    finally:
        if installed:
            shutdown()


# --- traceparent <-> span context ---------------------------------------------------------


def _extract(traceparent: str, tracestate: str = "") -> OtelContext:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return TraceContextTextMapPropagator().extract(carrier)


def span_context(traceparent: str) -> SpanContext | None:
    """The span context a W3C traceparent names, or None when it is empty or malformed."""
    if not traceparent:
        return None
    from opentelemetry import trace

    context = trace.get_current_span(_extract(traceparent)).get_span_context()
    return context if context.is_valid else None


def _traceparent_of(span: Span) -> str:
    context = span.get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def current_traceparent() -> str:
    """The W3C traceparent of the current span; "" when tracing is off or none is current."""
    if _tracer is None:
        return ""
    from opentelemetry import trace

    return _traceparent_of(trace.get_current_span())


def _links(traceparents: Iterable[str]) -> list[Link]:
    from opentelemetry.trace import Link

    seen: set[tuple[int, int]] = set()
    links: list[Link] = []
    for traceparent in traceparents:
        context = span_context(traceparent)
        if context is None or (context.trace_id, context.span_id) in seen:
            continue
        seen.add((context.trace_id, context.span_id))
        links.append(Link(context))
        if len(links) == MAX_LINKS:
            break
    return links


# --- spans ----------------------------------------------------------------------------------


class SpanHandle:
    """A started span, or nothing when tracing is off (every method is then a no-op)."""

    def __init__(self, span: Span | None = None) -> None:
        self._span = span

    @property
    def recording(self) -> bool:
        return self._span is not None

    @property
    def traceparent(self) -> str:
        """The span's W3C traceparent ("" without a span)."""
        return "" if self._span is None else _traceparent_of(self._span)

    @property
    def trace_id(self) -> str:
        if self._span is None:
            return ""
        return f"{self._span.get_span_context().trace_id:032x}"

    def set_attribute(self, key: str, value: str | int | float | bool) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def activate(self) -> None:
        """Make this the current span for the rest of the current task, and put its
        trace id into the log context.

        Never undone: only for a context that ends with the unit of work, such as a
        gRPC call's own task.
        """
        if self._span is None:
            return
        from opentelemetry import context, trace

        context.attach(trace.set_span_in_context(self._span))
        structlog.contextvars.bind_contextvars(trace_id=self.trace_id)

    def end(self, error: str | None = None) -> None:
        """End the span; with `error`, its status is ERROR with that description."""
        if self._span is None:
            return
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()
        self._span = None


def _kind(kind: Kind) -> SpanKind:
    from opentelemetry.trace import SpanKind

    return {
        "internal": SpanKind.INTERNAL,
        "server": SpanKind.SERVER,
        "client": SpanKind.CLIENT,
        "producer": SpanKind.PRODUCER,
        "consumer": SpanKind.CONSUMER,
    }[kind]


def start_span(
    name: str,
    *,
    parent: str | None = None,
    parent_state: str = "",
    kind: Kind = "internal",
    links: Iterable[str] = (),
    attributes: Attributes | None = None,
) -> SpanHandle:
    """Start a span (not made current); `end()` it.

    parent None continues the current span; a traceparent string continues that
    context (an empty or malformed one starts a new trace). `links` are traceparents
    of related contexts. With tracing off, returns a handle that does nothing.
    """
    tracer = _tracer
    if tracer is None:
        return SpanHandle()
    context = None if parent is None else _extract(parent, parent_state)
    span = tracer.start_span(
        name,
        context=context,
        kind=_kind(kind),
        attributes=dict(attributes or {}),
        links=_links(links),
    )
    return SpanHandle(span)


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: Kind = "internal",
    links: Iterable[str] = (),
    attributes: Attributes | None = None,
) -> Iterator[SpanHandle]:
    """A child of the current span, current (and its trace id in the log context) inside
    the block; an exception escaping the block marks it ERROR. No-op when off."""
    tracer = _tracer
    if tracer is None:
        yield SpanHandle()
        return
    with tracer.start_as_current_span(
        name,
        kind=_kind(kind),
        attributes=dict(attributes or {}),
        links=_links(links),
    ) as current:
        handle = SpanHandle(current)
        with structlog.contextvars.bound_contextvars(trace_id=handle.trace_id):
            yield handle
