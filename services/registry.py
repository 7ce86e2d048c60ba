"""The deployables: which services exist, where their code is, which port each takes.

A leaf module (it imports no service), so everything that starts services reads the
same list: `cargotrack serve NAME` (services/cli.py), `cargotrack dev`
(devtools/launcher.py, which also gives the ports in this order) and the tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["SERVICES", "ServiceSpec", "available_services"]


@dataclass(frozen=True)
class ServiceSpec:
    """A deployable: its module (with `async def run(settings)`) and default gRPC port."""

    name: str
    module: str
    default_port: int
    summary: str
    #: It runs without PostgreSQL when DATABASE_URL is unset (see load_settings).
    database_optional: bool = False
    #: It may run CARGOTRACK_PROCESSES > 1 worker processes behind one port
    #: (shared/workers.py): a stateless gRPC front, where any worker can answer any
    #: call. Not the projector, the learner or webhooks (consumer-group members, caches
    #: and leases of their own), and not the others until measured.
    several_processes: bool = False


SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec(
            "gps-ingest",
            "services.gps_ingest.app",
            50051,
            "GPS batches from drivers' apps",
            several_processes=True,
        ),
        ServiceSpec(
            "shipment-events", "services.shipment_events.app", 50052, "shipment lifecycle events"
        ),
        ServiceSpec(
            "delivery-confirmations",
            "services.delivery_confirmations.app",
            50053,
            "proofs of delivery",
            database_optional=True,
        ),
        ServiceSpec(
            "tracking-query",
            "services.tracking_query.app",
            50054,
            "shipment queries",
            several_processes=True,
        ),
        ServiceSpec("dispatch", "services.dispatch.app", 50055, "delay alert subscriptions"),
        ServiceSpec("projector", "services.projector.app", 50056, "folds the streams into state"),
        ServiceSpec("learner", "services.learner.app", 50057, "learns speeds, publishes models"),
        ServiceSpec("webhooks", "services.webhooks.app", 50058, "signed webhook deliveries"),
        ServiceSpec(
            "http-gateway",
            "services.http_gateway.app",
            50059,
            "HTTP/JSON, SSE, tracking page, dispatch board",
            database_optional=True,
        ),
    )
}


def available_services() -> list[ServiceSpec]:
    """The services whose code exists in this checkout, in start order."""
    found = []
    for spec in SERVICES.values():
        try:
            importlib.import_module(spec.module)
        except ModuleNotFoundError as error:
            if error.name and spec.module.startswith(error.name):
                continue
            raise
        found.append(spec)
    return found
