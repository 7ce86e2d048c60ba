"""The tracking projection's I/O shell: load states, fold a batch, write once.

Per poll batch (inside the runner's transaction): load the states of every
shipment and vehicle the batch touches in one query each, fold the records in
log order with the pure folds of shared.domain.tracking, and write each changed
state once (coalesced), the accepted GPS points with COPY, and the live
tracking (position, progress, ETA, alerts) of shipments whose vehicle moved.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat

from services.projector.freshness import ReceiptAges
from services.projector.live import LiveTracker
from shared.config import TopicSettings
from shared.db import Connection
from shared.domain import tracking
from shared.domain.geo import Fix
from shared.domain.tracking import ShipmentState, VehicleState
from shared.pb import envelope_pb2
from shared.projection import Delivered
from shared.readmodel import shipments, vehicle_positions, vehicles
from shared.readmodel.rows import ShipmentKey, VehicleKey

log = logging.getLogger(__name__)

#: GPS records folded between two yields to the event loop.
FOLD_YIELD_EVERY = 64

SHIPMENT_PAYLOADS = ("shipment_event", "delivery_confirmation")


def shipment_key(envelope: envelope_pb2.Envelope) -> ShipmentKey:
    payload = envelope.WhichOneof("payload")
    shipment_id = (
        envelope.shipment_event.shipment_id
        if payload == "shipment_event"
        else envelope.delivery_confirmation.shipment_id
    )
    return envelope.tenant_id, shipment_id


def merge_by_recorded_time(records: Sequence[Delivered]) -> list[Delivered]:
    """Interleave the partitions of a batch by the time cargotrack accepted each record.

    A shipment's lifecycle events and its delivery confirmation arrive on two
    topics; within a poll batch they come partition by partition. Each
    partition's order is kept exactly (it is the log's order); across
    partitions the records are merged by `recorded_at`, so a confirmation
    accepted after the `out_for_delivery` event is folded after it even when
    both arrive in one poll.
    """
    streams: dict[tuple[str, int], list[Delivered]] = {}
    for record in records:
        streams.setdefault((record.topic, record.partition), []).append(record)
    if len(streams) <= 1:
        return list(records)

    def accepted_at(record: Delivered) -> tuple[int, int]:
        stamp = record.envelope.recorded_at
        return stamp.seconds, stamp.nanos

    return list(heapq.merge(*streams.values(), key=accepted_at))


@dataclass
class BatchEffect:
    """What one batch changed (for metrics and tests)."""

    shipments: dict[ShipmentKey, ShipmentState] = field(default_factory=dict)
    vehicles_moved: dict[VehicleKey, VehicleState] = field(default_factory=dict)
    history_points: int = 0
    #: The history rows added, per vehicle: (event id, fix). The fix objects are the
    #: ones the fold decoded: the history COPY, the vehicle's motion and the track
    #: cache share them (one object per point).
    new_points: dict[VehicleKey, list[tuple[str, Fix]]] = field(default_factory=dict)
    ignored: int = 0


class TrackingProjection:
    """Shipment state, vehicle positions and live tracking, from three topics."""

    name = "tracking"

    def __init__(
        self,
        topics: TopicSettings,
        live: LiveTracker | None = None,
        *,
        freshness: ReceiptAges | None = None,
    ) -> None:
        self.topics = (topics.shipment_events, topics.delivery_confirmations, topics.gps_points)
        #: What each topic carries: anything else there was written by mistake.
        self.payloads = {
            topics.shipment_events: ("shipment_event",),
            topics.delivery_confirmations: ("delivery_confirmation",),
            topics.gps_points: ("gps_batch",),
        }
        self.live = live
        #: The running projector's receipt-to-visible ages; None where the records are
        #: history being replayed (a rebuild), whose age says nothing about freshness.
        self.freshness = freshness
        self.last_effect = BatchEffect()

    async def apply(self, connection: Connection, records: Sequence[Delivered]) -> None:
        effect = BatchEffect()
        shipment_records = []
        gps_records = []
        for record in records:
            payload = record.envelope.WhichOneof("payload")
            if payload in SHIPMENT_PAYLOADS:
                shipment_records.append(record)
            elif payload == "gps_batch":
                gps_records.append(record)
            else:
                # Not ours to fold (the runner dead-letters these when it checks payloads).
                effect.ignored += 1
        if shipment_records:
            await self._fold_shipments(connection, merge_by_recorded_time(shipment_records), effect)
        if gps_records:
            await self._fold_vehicles(connection, gps_records, effect)
        if self.live is not None:
            await self.live.update(
                connection, effect.vehicles_moved, effect.shipments, effect.new_points
            )
        if self.freshness is not None:
            self.freshness.stage(gps_records)
        self.last_effect = effect

    def committed(self) -> None:
        """The transaction of the last `apply` committed."""
        if self.freshness is not None:
            self.freshness.committed()  # first: its clock reads as close to COMMIT as can be
        if self.live is not None:
            self.live.committed()

    def forget(self) -> None:
        """The last `apply` did not commit, or partitions changed hands."""
        if self.freshness is not None:
            self.freshness.forget()
        if self.live is not None:
            self.live.forget()

    async def _fold_shipments(
        self, connection: Connection, records: list[Delivered], effect: BatchEffect
    ) -> None:
        states: dict[ShipmentKey, ShipmentState] = await shipments.load_shipments(
            connection, (shipment_key(r.envelope) for r in records)
        )
        for record in records:
            key = shipment_key(record.envelope)
            before = states.get(key)
            after = tracking.apply(before, record.envelope)
            if after is not None and after is not before:
                states[key] = after
                effect.shipments[key] = after
        await shipments.save_shipments(connection, list(effect.shipments.values()))

    async def _fold_vehicles(
        self, connection: Connection, records: list[Delivered], effect: BatchEffect
    ) -> None:
        def key_of(envelope: envelope_pb2.Envelope) -> VehicleKey:
            return envelope.tenant_id, envelope.gps_batch.vehicle_id

        states: dict[VehicleKey, VehicleState] = await vehicles.load_vehicles(
            connection, (key_of(r.envelope) for r in records)
        )
        loaded_positions = {k: s.last_position for k, s in states.items()}
        changed: dict[VehicleKey, VehicleState] = {}
        history = effect.new_points
        for n, record in enumerate(records):
            if n and n % FOLD_YIELD_EVERY == 0:
                await asyncio.sleep(0)  # heartbeats: a poll batch can hold 10^5+ points
            envelope = record.envelope
            key = key_of(envelope)
            before = states.get(key)
            after, points = tracking.fold_gps(before, envelope)
            if points:
                added = history.get(key)
                if added is None:
                    added = history[key] = []
                added.extend(zip(repeat(envelope.event_id), points))
            if after is not before:
                states[key] = after
                changed[key] = after
        await vehicles.save_vehicles(connection, list(changed.values()))
        effect.history_points = await vehicle_positions.append_history(connection, history)
        effect.vehicles_moved = {
            key: state
            for key, state in changed.items()
            if state.last_position is not None and state.last_position != loaded_positions.get(key)
        }
