"""Tracing: off by default, impossible to enable without OpenTelemetry, W3C in and out."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import structlog

from shared import tracing
from shared.config import ConfigError, load_settings

BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "CARGOTRACK_JWT_SECRET": "unit-test-hs256-secret-0123456789abcdef",
}
REPO = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make OpenTelemetry look uninstalled to find_spec."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}", name="opentelemetry")
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# --- configuration ----------------------------------------------------------------------


def test_tracing_is_off_by_default() -> None:
    assert load_settings(BASE).tracing is False


def test_tracing_cannot_be_enabled_without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    without_opentelemetry(monkeypatch)
    assert not tracing.available()
    with pytest.raises(ConfigError, match="CARGOTRACK_TRACING=1: OpenTelemetry is not installed"):
        load_settings({**BASE, "CARGOTRACK_TRACING": "1"})
    # Everything else still loads, and tracing off is fine.
    assert load_settings({**BASE, "CARGOTRACK_TRACING": "0"}).tracing is False


def test_a_bad_tracing_flag_is_named() -> None:
    with pytest.raises(ConfigError, match="CARGOTRACK_TRACING"):
        load_settings({**BASE, "CARGOTRACK_TRACING": "maybe"})


def test_nothing_imports_opentelemetry_while_tracing_is_off() -> None:
    """The services' modules import and run their tracing calls with OpenTelemetry
    unimportable: it is only imported once tracing is turned on."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = None  # any import of it fails
        import services.gps_ingest.app, services.shipment_events.app
        import services.delivery_confirmations.app, services.tracking_query.app
        import services.projector.app
        from shared import tracing
        assert not tracing.available() and not tracing.enabled()
        span = tracing.start_span("x", parent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
        assert span.traceparent == "" and not span.recording
        span.activate(); span.set_attribute("k", 1); span.end("error")
        with tracing.span("y", links=["bad"]) as inner:
            assert inner.traceparent == ""
        assert tracing.current_traceparent() == ""
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- with the SDK -------------------------------------------------------------------------

sdk: ModuleType | None
try:
    from opentelemetry.sdk import trace as sdk
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode
except ImportError:  # pragma: no cover - the SDK is a test dependency
    sdk = None

needs_sdk = pytest.mark.skipif(sdk is None, reason="opentelemetry-sdk is not installed")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    assert sdk is not None
    memory = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    try:
        yield memory
    finally:
        tracing.uninstall()
        provider.shutdown()


@needs_sdk
def test_a_span_continues_a_traceparent_and_hands_on_its_own(
    exporter: InMemorySpanExporter,
) -> None:
    span = tracing.start_span("server", parent=TRACEPARENT, kind="server")
    version, trace_id, span_id, flags = span.traceparent.split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert span_id != "b7ad6b7169203331"
    assert span.trace_id == trace_id
    span.end()
    (finished,) = exporter.get_finished_spans()
    assert finished.kind is SpanKind.SERVER
    assert finished.parent is not None
    assert finished.parent.span_id == 0xB7AD6B7169203331


@needs_sdk
def test_a_malformed_or_missing_traceparent_starts_a_new_trace(
    exporter: InMemorySpanExporter,
) -> None:
    for parent in ("", "garbage", "00-00000000000000000000000000000000-0000000000000000-01"):
        span = tracing.start_span("root", parent=parent)
        span.end()
    assert all(s.parent is None for s in exporter.get_finished_spans())
    assert tracing.span_context("garbage") is None


@needs_sdk
def test_the_current_span_is_in_the_log_context_and_hands_on_its_traceparent(
    exporter: InMemorySpanExporter,
) -> None:
    assert tracing.current_traceparent() == ""
    with tracing.span("batch", kind="consumer") as current:
        assert tracing.current_traceparent() == current.traceparent
        assert structlog.contextvars.get_contextvars()["trace_id"] == current.trace_id
        with tracing.span("child") as child:
            assert child.trace_id == current.trace_id
    assert "trace_id" not in structlog.contextvars.get_contextvars()
    assert tracing.current_traceparent() == ""
    child_span, batch_span = exporter.get_finished_spans()
    assert child_span.parent is not None
    assert batch_span.context is not None
    assert child_span.parent.span_id == batch_span.context.span_id


@needs_sdk
def test_links_are_deduplicated_valid_and_bounded(exporter: InMemorySpanExporter) -> None:
    parents = [f"00-{n:032x}-{n:016x}-01" for n in range(1, tracing.MAX_LINKS + 50)]
    with tracing.span("batch", links=[TRACEPARENT, TRACEPARENT, "bad", "", *parents]):
        pass
    (finished,) = exporter.get_finished_spans()
    assert len(finished.links) == tracing.MAX_LINKS
    first = finished.links[0].context
    assert (first.trace_id, first.span_id) == (
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
    )


@needs_sdk
def test_an_error_ends_a_span_with_status_error(exporter: InMemorySpanExporter) -> None:
    tracing.start_span("write").end("not stored: Kafka timed out")
    (finished,) = exporter.get_finished_spans()
    assert finished.status.status_code is StatusCode.ERROR
    assert finished.status.description == "not stored: Kafka timed out"


@needs_sdk
def test_a_session_installs_a_provider_only_when_none_is(
    exporter: InMemorySpanExporter,
) -> None:
    settings = load_settings({**BASE, "CARGOTRACK_TRACING": "1"})
    with tracing.session(settings, "gps-ingest"):
        tracing.start_span("inside").end()
    # The test's provider stayed in place, and still records.
    assert tracing.enabled()
    assert [s.name for s in exporter.get_finished_spans()] == ["inside"]


@needs_sdk
def test_a_session_sets_up_and_shuts_down_tracing() -> None:
    tracing.uninstall()
    settings = load_settings({**BASE, "CARGOTRACK_TRACING": "1"})
    with tracing.session(settings, "projector"):
        assert tracing.enabled()
        span = tracing.start_span("work")
        assert span.recording
        span.end()
    assert not tracing.enabled()
    with tracing.session(load_settings(BASE), "projector"):
        assert not tracing.enabled()
