"""The tracking read model's former single module, kept as names only.

The SQL lives in shared/readmodel/, one module per table (shipments, vehicles,
vehicle_positions, shipment_tracking, eta_history, alert_outbox), with typed rows
in shared/readmodel/rows.py and the API view in shared/readmodel/messages.py. This
module re-exports the long-standing entry points for callers written against it
(tests, the bench, and tests/integration/release_probe.py, which runs the same
calls against a previous release's code); new code imports the table modules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shared import statecodec
from shared.domain.tracking import ACTIVE, ShipmentState
from shared.pb import common_pb2, tracking_pb2
from shared.readmodel import messages
from shared.readmodel.messages import ENTRIES_OMITTED, position_message, timeline_messages
from shared.readmodel.rows import Assignment, EtaRow, ShipmentKey, TrackingView, VehicleKey
from shared.readmodel.shipment_tracking import view_of
from shared.readmodel.shipments import (
    active_shipments_of,
    load_assignment,
    load_shipments,
    save_shipments,
)
from shared.readmodel.vehicle_positions import (
    HISTORY_COLUMNS,
    append_history,
    maintain_position_partitions,
)
from shared.readmodel.vehicles import load_vehicles, save_vehicles

#: Statuses in which a shipment travels with its vehicle (shared.domain.tracking.ACTIVE).
ACTIVE_STATUSES = tuple(sorted(ACTIVE))

__all__ = [
    "ACTIVE_STATUSES",
    "ENTRIES_OMITTED",
    "HISTORY_COLUMNS",
    "Assignment",
    "ShipmentKey",
    "VehicleKey",
    "active_shipments_of",
    "append_history",
    "eta_message",
    "load_assignment",
    "load_shipments",
    "load_vehicles",
    "maintain_position_partitions",
    "position_message",
    "save_shipments",
    "save_vehicles",
    "shipment_message",
    "timeline_messages",
]


def shipment_message(
    state: ShipmentState, tracking: TrackingView | Mapping[str, Any] | None
) -> tracking_pb2.Shipment:
    """messages.shipment_message; `tracking` may also be the decoded jsonb columns
    (`position`, `progress`, `eta`) of a shipment_tracking row."""
    if isinstance(tracking, Mapping):
        columns = ("position", "progress", "eta")
        tracking = view_of({k: _text(tracking.get(k)) for k in columns})
    return messages.shipment_message(state, tracking)


def eta_message(eta: EtaRow | Mapping[str, Any]) -> common_pb2.Eta:
    """messages.eta_message; `eta` may also be the decoded `eta` jsonb."""
    if isinstance(eta, Mapping):
        eta = statecodec.decode_as(EtaRow, eta)
    return messages.eta_message(eta)


def _text(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None
