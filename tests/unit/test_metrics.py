"""The metrics module: labels, the write timer, and a metrics server that stops."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from pathlib import Path

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


#: Two self-signed test certificates (no key is kept): notAfter 2036-11-30 00:07:27 UTC
#: and 2028-01-07 00:07:31 UTC.
CERT_2036 = """-----BEGIN CERTIFICATE-----
MIIBdTCCARygAwIBAgIBATAKBggqhkjOPQQDAjAaMRgwFgYDVQQDDA9jYXJnb3Ry
YWNrLXRlc3QwHhcNMjYxMjAzMDAwNzI3WhcNMzYxMTMwMDAwNzI3WjAaMRgwFgYD
VQQDDA9jYXJnb3RyYWNrLXRlc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAS2
Lf++vPqxKwT3D56ZDZZsqOt51I3FlCzwEgIH8RVFOYXlLBCwo6rCzoRwIjPujsKp
kvdvhTOCK0KeEpgLNsGWo1MwUTAdBgNVHQ4EFgQU4vizxu8VwVc1y+BcscM8dhMC
ra0wHwYDVR0jBBgwFoAU4vizxu8VwVc1y+BcscM8dhMCra0wDwYDVR0TAQH/BAUw
AwEB/zAKBggqhkjOPQQDAgNHADBEAiAx2NJlVs5bOw0X57h0nBVMPP1gQPB1QGoh
TfQifoK/0wIgK1XmzFMKYklGJ4E07l+2JxIMg+kkLUyTGzxvDzEpckk=
-----END CERTIFICATE-----
"""
CERT_2028 = """-----BEGIN CERTIFICATE-----
MIIBfDCCASKgAwIBAgIBAjAKBggqhkjOPQQDAjAdMRswGQYDVQQDDBJjYXJnb3Ry
YWNrLXRlc3QtY2EwHhcNMjYxMjAzMDAwNzMxWhcNMjgwMTA3MDAwNzMxWjAdMRsw
GQYDVQQDDBJjYXJnb3RyYWNrLXRlc3QtY2EwWTATBgcqhkjOPQIBBggqhkjOPQMB
BwNCAATu1RSyQfJW8x+ykGU9P6PFqTy/7RuUshyY6c/QW4vwEQcp4SCNj9VXgERP
4eKo49CZX2+CUzEYaF2MeBu1OP7Do1MwUTAdBgNVHQ4EFgQUj9kcC2NArc+qZeLT
H2XyCw6Q+vMwHwYDVR0jBBgwFoAUj9kcC2NArc+qZeLTH2XyCw6Q+vMwDwYDVR0T
AQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiAIr7NmxeDXrWfP+8TInbUx9Yak
Tagd4VtD2DFAYkh/IAIhAKTtLSLi9xF4PyytJaPy++JZyNDzfRVQbFerOdd8iQ2T
-----END CERTIFICATE-----
"""


def test_certificate_expiry_is_the_earliest_not_after(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text(CERT_2036 + CERT_2028)
    assert metrics.record_certificate_expiry("kafka_ca", str(bundle)) == 1830816451.0
    exported = REGISTRY.get_sample_value(
        "cargotrack_tls_certificate_expiry_timestamp_seconds", {"certificate": "kafka_ca"}
    )
    assert exported == 1830816451.0


def test_certificate_expiry_without_a_certificate_exports_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    assert metrics.record_certificate_expiry("grpc_server", None) is None
    assert metrics.record_certificate_expiry("grpc_server", str(empty)) is None
    assert metrics.record_certificate_expiry("grpc_server", str(tmp_path / "absent.pem")) is None
