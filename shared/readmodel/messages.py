"""The API view of the tracking read model: stored rows as protobuf messages (pure).

shared.readmodel.shipments and shared.readmodel.shipment_tracking read the rows;
these functions turn them into what the query service answers and what an alert
carries, so the projector and the query service show an ETA the same way.
"""

from __future__ import annotations

from datetime import datetime

from shared.domain.geo import Fix
from shared.domain.tracking import TIMELINE_HEAD, ShipmentState
from shared.envelopes import timestamp
from shared.pb import common_pb2, delivery_pb2, tracking_pb2
from shared.readmodel.rows import EtaRow, Progress, TrackingView


def _latlng(point: tuple[float, float] | None) -> common_pb2.LatLng | None:
    return common_pb2.LatLng(latitude=point[0], longitude=point[1]) if point else None


def position_message(position: Fix) -> common_pb2.Position:
    """The API's Position of a fix: unknown speed, heading and accuracy are 0 there."""
    return common_pb2.Position(
        location=common_pb2.LatLng(latitude=position.lat, longitude=position.lon),
        recorded_at=timestamp(position.at),
        speed_mps=position.speed_mps or 0.0,
        heading_deg=position.heading_deg or 0.0,
        accuracy_m=position.accuracy_m or 0.0,
    )


#: Kind of the entry that stands for the entries the fold dropped at its bound.
ENTRIES_OMITTED = "entries_omitted"


def timeline_messages(state: ShipmentState) -> list[tracking_pb2.TimelineEntry]:
    """The timeline as messages, in log order. When the fold dropped entries at its
    bound (shared.domain.tracking.TIMELINE_HEAD / TIMELINE_TAIL), one entry of kind
    ENTRIES_OMITTED, detail "N entries omitted", stands where they were."""
    entries = []
    for index, entry in enumerate(state.timeline):
        if index == TIMELINE_HEAD and state.timeline_dropped:
            entries.append(
                tracking_pb2.TimelineEntry(
                    kind=ENTRIES_OMITTED,
                    status=state.timeline[index - 1].status_after,
                    detail=f"{state.timeline_dropped} entries omitted",
                )
            )
        message = tracking_pb2.TimelineEntry(
            event_id=entry.event_id,
            kind=entry.kind,
            status=entry.status_after,
            detail=entry.detail,
            anomaly=entry.anomaly,
        )
        if entry.occurred_at:
            message.occurred_at.CopyFrom(timestamp(entry.occurred_at))
        if entry.recorded_at:
            message.recorded_at.CopyFrom(timestamp(entry.recorded_at))
        entries.append(message)
    return entries


def shipment_message(state: ShipmentState, tracking: TrackingView | None) -> tracking_pb2.Shipment:
    """The API view of a shipment: its folded state plus live tracking (position, ETA)."""
    message = tracking_pb2.Shipment(
        shipment_id=state.shipment_id,
        customer_id=state.customer_id,
        status=state.status,
        planned_route=state.planned_route,
        reference=state.reference,
        vehicle_id=state.vehicle_id,
        driver_id=state.driver_id,
        tracking_token=state.tracking_token,
        delivery_attempts=state.delivery_attempts,
    )
    if (origin := _latlng(state.origin)) is not None:
        message.origin.CopyFrom(origin)
    if (destination := _latlng(state.destination)) is not None:
        message.destination.CopyFrom(destination)
    if state.promised_window:
        message.promised_window.start.CopyFrom(timestamp(state.promised_window[0]))
        message.promised_window.end.CopyFrom(timestamp(state.promised_window[1]))
    for name in ("created_at", "updated_at", "delivered_at"):
        moment = getattr(state, name)
        if moment is not None:
            getattr(message, name).CopyFrom(timestamp(moment))
    if state.proof is not None:
        proof = state.proof
        message.proof.CopyFrom(
            delivery_pb2.DeliveryConfirmation(
                confirmation_id=proof.confirmation_id,
                shipment_id=state.shipment_id,
                vehicle_id=proof.vehicle_id,
                recipient_name=proof.recipient_name,
                method=proof.method,
                proof_sha256=proof.proof_sha256,
                note=proof.note,
            )
        )
        if proof.confirmed_at:
            message.proof.confirmed_at.CopyFrom(timestamp(proof.confirmed_at))
        if (where := _latlng(proof.location)) is not None:
            message.proof.location.CopyFrom(where)
    for anomaly in state.anomalies:
        entry = message.anomalies.add(event_id=anomaly.event_id, reason=anomaly.reason)
        if anomaly.occurred_at:
            entry.occurred_at.CopyFrom(timestamp(anomaly.occurred_at))
    if tracking is not None:
        if tracking.position is not None:
            message.last_position.CopyFrom(position_message(tracking.position))
        if tracking.progress is not None:
            message.progress.CopyFrom(progress_message(tracking.progress))
        if tracking.eta is not None:
            message.eta.CopyFrom(eta_message(tracking.eta))
    return message


def progress_message(progress: Progress) -> common_pb2.Progress:
    return common_pb2.Progress(
        route_length_m=progress.route_length_m,
        travelled_m=progress.travelled_m,
        remaining_m=progress.remaining_m,
        on_route=progress.on_route,
        off_route_m=progress.off_route_m,
    )


def eta_message(row: EtaRow) -> common_pb2.Eta:
    """The Eta message of a stored ETA (shipment_tracking.eta, or an alert's basis)."""
    eta = common_pb2.Eta(
        confidence=row.confidence,
        method=row.method,  # type: ignore[arg-type]
        remaining_m=row.remaining_m,
        model_version=row.model_version,
    )
    moments: dict[str, datetime | None] = {
        "estimated_arrival": row.estimated_arrival,
        "earliest": row.earliest,
        "latest": row.latest,
        "computed_at": row.computed_at,
    }
    for name, moment in moments.items():
        if moment is not None:
            getattr(eta, name).CopyFrom(timestamp(moment))
    if row.position_age_s is not None:
        eta.position_age.FromNanoseconds(int(float(row.position_age_s) * 1e9))
    return eta
