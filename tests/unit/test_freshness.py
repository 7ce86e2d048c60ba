"""Receipt-to-visible ages (services/projector/freshness.py): observed only on commit,
once per GPS record, from the envelope's recorded_at; without Kafka or PostgreSQL."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from services.projector.freshness import ReceiptAges
from shared.metrics import FRESHNESS_BUCKETS, PROJECTOR_GPS_FRESHNESS
from shared.pb import envelope_pb2
from shared.projection import Delivered

NOW = 1_800_000_000.0


def gps_record(offset: int, received_at: float | None) -> Delivered:
    envelope = envelope_pb2.Envelope(event_id=f"e{offset}")
    envelope.gps_batch.vehicle_id = "van-1"
    if received_at is not None:
        seconds = int(received_at)
        envelope.recorded_at.seconds = seconds
        envelope.recorded_at.nanos = round((received_at - seconds) * 1e9)
    return Delivered("gps-points", 0, offset, b"van-1", envelope)


def meter() -> tuple[ReceiptAges, Histogram, CollectorRegistry]:
    registry = CollectorRegistry()
    histogram = Histogram("ages_seconds", "test", buckets=FRESHNESS_BUCKETS, registry=registry)
    return ReceiptAges(histogram, clock=lambda: NOW), histogram, registry


def observed(registry: CollectorRegistry) -> tuple[float, float]:
    count = registry.get_sample_value("ages_seconds_count")
    total = registry.get_sample_value("ages_seconds_sum")
    assert count is not None
    assert total is not None
    return count, total


def bucket(registry: CollectorRegistry, le: str) -> float:
    value = registry.get_sample_value("ages_seconds_bucket", {"le": le})
    assert value is not None
    return value


def test_committed_records_are_observed_once_each_with_their_age() -> None:
    ages, _, registry = meter()
    ages.stage([gps_record(1, NOW - 0.030), gps_record(2, NOW - 0.250), gps_record(3, NOW - 2.0)])
    assert observed(registry) == (0, 0)  # applied, not committed: nothing visible yet
    ages.committed()
    count, total = observed(registry)
    assert count == 3
    assert abs(total - 2.28) < 1e-5
    assert bucket(registry, "0.05") == 1
    assert bucket(registry, "0.25") == 2
    assert bucket(registry, "2.5") == 3
    ages.committed()  # a second call has nothing staged: the records are not counted twice
    assert observed(registry)[0] == 3


def test_a_transaction_that_did_not_commit_is_never_observed() -> None:
    ages, _, registry = meter()
    ages.stage([gps_record(1, NOW - 0.1), gps_record(2, NOW - 0.1)])
    ages.forget()
    ages.committed()  # e.g. the runner's offsets-only commit after isolating a bad record
    assert observed(registry) == (0, 0)


def test_each_apply_replaces_what_was_staged() -> None:
    ages, _, registry = meter()
    ages.stage([gps_record(1, NOW - 5.0), gps_record(2, NOW - 5.0)])
    ages.stage([gps_record(3, NOW - 0.02)])  # one transaction at a time
    ages.committed()
    count, total = observed(registry)
    assert count == 1
    assert abs(total - 0.02) < 1e-5


def test_a_clock_behind_the_ingest_clock_counts_as_zero_and_no_receipt_is_left_out() -> None:
    ages, _, registry = meter()
    ages.stage([gps_record(1, NOW + 0.5), gps_record(2, None)])
    assert ages.staged == 1
    ages.committed()
    assert observed(registry) == (1, 0.0)


def test_the_production_histogram_has_buckets_around_the_100_ms_target() -> None:
    bounds = [
        float(sample.labels["le"])
        for metric in PROJECTOR_GPS_FRESHNESS.collect()
        for sample in metric.samples
        if sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf"
    ]
    assert (bounds[0], bounds[-1]) == (0.005, 30.0)
    assert {0.05, 0.075, 0.1, 0.15} <= set(bounds)
