"""The typed rows of the tracking read model's tables, stored through shared.statecodec.

Pure (no database driver): the table modules beside this one hold the SQL that
reads and writes these rows, and the projector's pure live-tracking core
(services/projector/decide.py) builds them without importing any I/O library.

A jsonb column holds `statecodec.encode(row_part)`; decoding ignores keys a type
does not declare and gives declared fields missing from old rows their defaults,
so rows written by the previous release read back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shared.domain.alerts import AlertConditions
from shared.domain.eta import EtaEstimate
from shared.domain.geo import Fix
from shared.domain.tracking import ShipmentState

ShipmentKey = tuple[str, str]  # (tenant_id, shipment_id)
VehicleKey = tuple[str, str]  # (tenant_id, vehicle_id)


# --- shipments ----------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """What the read model says about a shipment, for the delivery-confirmations pre-check:
    its status, its assigned vehicle ('' for none) and the confirmation id of its proof
    (None when it holds none)."""

    status: int
    vehicle_id: str
    proof_confirmation_id: str | None


# --- shipment_tracking --------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """shipment_tracking.progress: how far along its planned route the shipment is."""

    route_length_m: float = 0.0
    travelled_m: float = 0.0
    remaining_m: float = 0.0
    on_route: bool = False
    off_route_m: float = 0.0


@dataclass(frozen=True)
class EtaRow:
    """shipment_tracking.eta: the ETA the API shows (shared.readmodel.messages.eta_message),
    plus the model's full estimate (`model`, the display chain the next estimate
    continues) and the version of the speed model behind it (0: no learned version)."""

    model_version: int = 0
    estimated_arrival: datetime | None = None
    earliest: datetime | None = None
    latest: datetime | None = None
    confidence: float = 0.0
    #: common_pb2.EtaMethod value (1 route, 2 great circle).
    method: int = 0
    remaining_m: float = 0.0
    position_age_s: float | None = None
    #: The event time the ETA is for (the vehicle's newest position then).
    computed_at: datetime | None = None
    model: EtaEstimate | None = None


@dataclass(frozen=True)
class Cursor:
    """The alert debouncer's private cursor (shipment_tracking.observed_at / observed):
    the event time of the last observation fed to the debouncer, and its estimate
    (the chain of estimates that carries the off-route hysteresis)."""

    observed_at: datetime
    observed: EtaEstimate | None = None


@dataclass(frozen=True)
class TrackingRow:
    """One shipment's live tracking row as the projector writes it.

    `progress` and `eta` None keep the stored values; the cursor is written with
    the ETA (a row whose ETA is kept keeps its cursor too).
    """

    tenant_id: str
    shipment_id: str
    vehicle_id: str
    position: Fix
    progress: Progress | None
    eta: EtaRow | None
    conditions: AlertConditions
    cursor: Cursor | None = None


@dataclass(frozen=True)
class StoredTracking:
    """What the projector reads back of a shipment's tracking row before deciding."""

    conditions: AlertConditions
    eta: EtaRow | None
    cursor: Cursor | None


@dataclass(frozen=True)
class TrackingView:
    """What the query service reads of a shipment's tracking row (None: not known yet)."""

    position: Fix | None = None
    progress: Progress | None = None
    eta: EtaRow | None = None


@dataclass(frozen=True)
class StaleCandidate:
    """A moving shipment whose tracking position is older than the stale threshold."""

    tenant_id: str
    shipment_id: str
    position: Fix
    conditions: AlertConditions
    shipment: ShipmentState


# --- eta_history --------------------------------------------------------------------


@dataclass(frozen=True)
class EtaHistoryRow:
    """One ETA computed for a shipment, keyed by the position time it was computed at."""

    tenant_id: str
    shipment_id: str
    position_at: datetime
    computed_at: datetime
    estimated_arrival: datetime
    remaining_m: float
    method: int
    model_version: int


# --- alert_outbox -------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxAlert:
    """An alert to insert into the outbox: `payload` is the serialized alerts_pb2.Alert."""

    alert_id: str
    tenant_id: str
    shipment_id: str
    payload: bytes


@dataclass(frozen=True)
class UnpublishedAlert:
    """An outbox row not yet published, as the relay claims it."""

    id: int
    alert_id: str
    tenant_id: str
    shipment_id: str
    payload: bytes
    created_at: datetime
