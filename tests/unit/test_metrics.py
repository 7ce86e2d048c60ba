"""The metrics module: labels, the write timer, and a metrics server that stops."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY

from shared import metrics
from shared.config import load_settings
from shared.pb import alerts_pb2

BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "CARGOTRACK_JWT_SECRET": "unit-test-hs256-secret-0123456789abcdef",
}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_alert_kinds_become_short_labels() -> None:
    assert metrics.alert_kind(alerts_pb2.ALERT_KIND_AT_RISK) == "at_risk"
    assert metrics.alert_kind(alerts_pb2.ALERT_KIND_STALE_TRACKING) == "stale_tracking"
    assert metrics.alert_kind(999) == "unknown"
    before = sample("cargotrack_alerts_published_total", kind="late")
    metrics.count_alerts_published(
        [alerts_pb2.ALERT_KIND_LATE] * 2 + [alerts_pb2.ALERT_KIND_RECOVERED]
    )
    assert sample("cargotrack_alerts_published_total", kind="late") == before + 2


def test_the_write_timer_counts_success_and_failure_but_not_cancellation() -> None:
    topic = {"topic": "unit.timer"}
    with metrics.produce_timer("unit.timer", 3):
        pass
    with pytest.raises(TimeoutError), metrics.produce_timer("unit.timer", 5):
        raise TimeoutError
    with pytest.raises(asyncio.CancelledError), metrics.produce_timer("unit.timer", 7):
        raise asyncio.CancelledError
    assert sample("cargotrack_kafka_produced_records_total", **topic) == 3
    assert sample("cargotrack_kafka_produce_seconds_count", **topic) == 1
    assert sample("cargotrack_kafka_produce_failures_total", **topic) == 1


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


async def test_the_server_serves_until_stopped() -> None:
    server = metrics.MetricsServer(0, "127.0.0.1")
    await server.stop()  # safe before start
    port = server.start()
    assert port > 0
    with pytest.raises(RuntimeError):
        server.start()
    text = await asyncio.to_thread(fetch, port)
    assert "# TYPE cargotrack_grpc_server_handled_total counter" in text
    assert "process_resident_memory_bytes" in text
    await server.stop()
    await server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(fetch, port)


def test_a_taken_port_names_the_variable() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="CARGOTRACK_METRICS_PORT"):
            metrics.MetricsServer(port, "127.0.0.1").start()


async def test_port_zero_in_the_settings_means_no_metrics_server() -> None:
    settings = load_settings(BASE)
    assert settings.metrics_port == 0
    async with metrics.serve_metrics(settings, "gps-ingest") as server:
        assert server is None
    assert sample("cargotrack_service_info", service="gps-ingest", version=metrics._version()) == 1


def test_lag_of_revoked_partitions_is_forgotten() -> None:
    metrics.PROJECTOR_LAG.labels("unit.topic", "0").set(5)
    metrics.PROJECTOR_LAG.labels("unit.topic", "1").set(7)
    metrics.forget_partitions([("unit.topic", 0), ("unit.topic", 9)])
    assert (
        REGISTRY.get_sample_value(
            "cargotrack_projector_consumer_lag", {"topic": "unit.topic", "partition": "0"}
        )
        is None
    )
    assert sample("cargotrack_projector_consumer_lag", topic="unit.topic", partition="1") == 7
