"""The delivery-confirmations pre-check's rules (services/delivery_confirmations/precheck.py),
without I/O: what the read model's row of a shipment says about one confirmation."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from devtools.devstack import LocalStack
from devtools.launcher import service_env
from services.delivery_confirmations.precheck import Outcome, verdict
from services.registry import SERVICES
from shared.config import ConfigError, load_settings
from shared.domain.tracking import (
    ASSIGNED,
    CANCELLED,
    CREATED,
    DELIVERED,
    DELIVERY_FAILED,
    IN_TRANSIT,
)
from shared.tracking_store import Assignment

SHIPMENT, VEHICLE, OTHER, CONFIRMATION = "shp-1", "van-a", "van-b", "conf-2"


def judge(assignment: Assignment | None, vehicle: str = VEHICLE) -> Outcome:
    return verdict(assignment, SHIPMENT, vehicle, CONFIRMATION).outcome


def test_a_shipment_the_read_model_does_not_know_is_left_to_the_fold() -> None:
    result = verdict(None, SHIPMENT, VEHICLE, CONFIRMATION)
    assert result == verdict(None, SHIPMENT, OTHER, CONFIRMATION)
    assert (result.outcome, result.reason) == (Outcome.UNKNOWN, None)


@pytest.mark.parametrize("status", [CREATED, ASSIGNED, IN_TRANSIT, DELIVERED, CANCELLED])
def test_a_shipment_without_vehicle_is_left_to_the_fold(status: int) -> None:
    assert judge(Assignment(status, "", None)) is Outcome.UNASSIGNED


@pytest.mark.parametrize("status", [ASSIGNED, IN_TRANSIT, DELIVERY_FAILED, DELIVERED])
def test_another_vehicle_is_refused_without_naming_the_assigned_one(status: int) -> None:
    result = verdict(Assignment(status, OTHER, None), SHIPMENT, VEHICLE, CONFIRMATION)
    assert result.outcome is Outcome.NOT_ASSIGNED
    assert result.reason is not None
    assert VEHICLE in result.reason
    assert OTHER not in result.reason


@pytest.mark.parametrize("status", [DELIVERED, CANCELLED])
def test_a_settled_proof_is_refused_but_its_own_retry_passes(status: int) -> None:
    assert judge(Assignment(status, VEHICLE, "conf-1")) is Outcome.SETTLED
    assert judge(Assignment(status, VEHICLE, CONFIRMATION)) is Outcome.PASSED


def test_the_assigned_vehicle_passes_while_no_proof_is_settled() -> None:
    assert judge(Assignment(IN_TRANSIT, VEHICLE, None)) is Outcome.PASSED
    # The TMS's `delivered` came first: the confirmation attaches the proof.
    assert judge(Assignment(DELIVERED, VEHICLE, None)) is Outcome.PASSED
    # A proof on a shipment that is not final (a later failed attempt) does not settle it.
    assert judge(Assignment(DELIVERY_FAILED, VEHICLE, "conf-1")) is Outcome.PASSED


def test_the_wrong_vehicle_is_refused_before_the_settled_proof() -> None:
    """A driver with no business with the shipment learns nothing of its delivery."""
    assert judge(Assignment(DELIVERED, OTHER, "conf-1")) is Outcome.NOT_ASSIGNED


def test_only_delivery_confirmations_and_the_gateway_may_run_without_a_database() -> None:
    environ = {
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
        "CARGOTRACK_JWT_SECRET": "unit-test-hs256-secret-0123456789abcdef",
    }
    assert load_settings(environ, database_optional=True).database.url == ""
    with pytest.raises(ConfigError, match="DATABASE_URL is not set"):
        load_settings(environ)
    optional = {name for name, spec in SERVICES.items() if spec.database_optional}
    # The http-gateway reads no database at all: it calls the gRPC services.
    assert optional == {"delivery-confirmations", "http-gateway"}


def test_cargotrack_dev_gives_delivery_confirmations_the_database() -> None:
    """So the local suite runs the pre-check (the launcher passes every service the
    stack's PostgreSQL)."""
    stack = SimpleNamespace(
        bootstrap_servers="127.0.0.1:9092", database_url="postgresql://pg/x", topic_env=dict
    )
    environment = service_env(cast(LocalStack, stack), {}, 50053)
    assert environment["DATABASE_URL"] == "postgresql://pg/x"
