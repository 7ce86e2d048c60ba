"""One simulated vehicle: drives its rounds, plays its driver's app and its TMS events.

A round's plan (`plan.py`) is carried out against the wall clock: the vehicle sleeps
until the next upload or milestone is due and acts. Times sent to the services are
the round's start (UTC) plus the planned offset, so every GPS fix and event is
stamped with when it "happened", never in the future. If a call is slow, later
actions are simply late; their timestamps stay as planned.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from devtools.fleet_simulator.clients import DriverApp, Tms, event_id
from devtools.fleet_simulator.config import SimulatorConfig
from devtools.fleet_simulator.plan import (
    BadPoint,
    Batch,
    Milestone,
    RoundPlan,
    ShipmentPlan,
    Step,
    plan_round,
    vehicle_id,
)
from devtools.fleet_simulator.routes import RecordedTrip
from devtools.fleet_simulator.stats import SimulatorStats
from devtools.fleet_simulator.uplink import GpsUplink
from shared.envelopes import timestamp, utc_now
from shared.pb import common_pb2, delivery_pb2, gps_pb2, shipment_pb2

__all__ = ["OpenShipments", "Vehicle"]

log = logging.getLogger(__name__)

#: Shipments created and not yet delivered, by id (the simulator cancels them on stop).
OpenShipments = dict[str, ShipmentPlan]
#: The UTC time of an offset (seconds) from the round's start.
Clock = Callable[[float], datetime]


def _latlng(point: tuple[float, float]) -> common_pb2.LatLng:
    return common_pb2.LatLng(latitude=point[0], longitude=point[1])


class Vehicle:
    """Drives rounds until cancelled (see the module docstring)."""

    def __init__(
        self,
        no: int,
        config: SimulatorConfig,
        trips: Sequence[RecordedTrip],
        run_id: str,
        *,
        uplink: GpsUplink,
        tms: Tms,
        app: DriverApp,
        stats: SimulatorStats,
        open_shipments: OpenShipments,
    ) -> None:
        self.no = no
        self.vehicle_id = vehicle_id(no)
        self.config = config
        self.trips = trips
        self.run_id = run_id
        self.uplink = uplink
        self.tms = tms
        self.app = app
        self.stats = stats
        self.open = open_shipments

    async def run(self) -> None:
        """Drive round after round until cancelled."""
        await asyncio.sleep((self.no - 1) * self.config.stagger_s)
        round_no = 0
        while True:
            plan = plan_round(self.config, self.trips, self.no, round_no, self.run_id)
            log.info("%s round %d: %s", self.vehicle_id, round_no, plan.describe()["shipments"])
            await self.drive(plan)
            self.stats.rounds += 1
            round_no += 1

    async def drive(self, plan: RoundPlan) -> None:
        """Carry out one round's plan against the wall clock."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        start = utc_now()

        def at(offset_s: float) -> datetime:
            return start + timedelta(seconds=offset_s)

        shipments = plan.shipments
        created = [self._created(s, at(0.0), start) for s in shipments]
        assigned = [
            self._event(
                s,
                "vehicle_assigned",
                at(0.0),
                vehicle_assigned=shipment_pb2.VehicleAssigned(
                    vehicle_id=self.vehicle_id,
                    driver_id=f"driver-{self.no:02d}",
                    stop_sequence=s.stop_sequence,
                ),
            )
            for s in shipments
        ]
        if await self.tms.record(created + assigned):
            self.stats.shipments_created += len(shipments)
            self.open.update({s.shipment_id: s for s in shipments})

        # Uploads and milestones in time order; at equal times milestones go first.
        actions: list[tuple[float, int, Batch | Milestone]] = [
            (m.at_s, 0, m) for m in plan.milestones
        ] + [(b.send_at_s, 1, b) for b in plan.batches]
        actions.sort(key=lambda a: (a[0], a[1]))
        for offset, _, action in actions:
            delay = t0 + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if isinstance(action, Batch):
                await self._upload(plan, action, at)
            else:
                await self._milestone(plan, action, at)
        delay = t0 + plan.end_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    # -- GPS ------------------------------------------------------------------------

    async def _upload(self, plan: RoundPlan, batch: Batch, at: Clock) -> None:
        points = [
            gps_pb2.GpsPoint(
                recorded_at=timestamp(at(w.at_s)),
                latitude=w.lat,
                longitude=w.lon,
                accuracy_m=8.0,
                speed_mps=w.speed_mps,
                heading_deg=w.heading_deg % 360.0,
            )
            for w in plan.waypoints[batch.start : batch.end]
        ]
        if batch.bad_point is not None and points:
            points.append(self._broken(points[-1], batch.bad_point))
        await self.uplink.wait_for_room()
        self.uplink.submit(points, drop_stream=batch.drop_stream)

    @staticmethod
    def _broken(good: gps_pb2.GpsPoint, how: BadPoint) -> gps_pb2.GpsPoint:
        """A copy of `good` broken the way a misbehaving phone breaks a fix."""
        bad = gps_pb2.GpsPoint()
        bad.CopyFrom(good)
        if how is BadPoint.NAN_LATITUDE:
            bad.latitude = math.nan
        elif how is BadPoint.FUTURE_TIMESTAMP:
            bad.recorded_at.CopyFrom(timestamp(utc_now() + timedelta(hours=1)))
        elif how is BadPoint.NULL_ISLAND:
            bad.latitude = 0.0
            bad.longitude = 0.0
        else:
            bad.speed_mps = -1.0
        return bad

    # -- lifecycle ------------------------------------------------------------------

    def _event(
        self,
        shipment: ShipmentPlan,
        kind: str,
        moment: datetime,
        attempt: int = 1,
        **payload: object,
    ) -> shipment_pb2.ShipmentEvent:
        return shipment_pb2.ShipmentEvent(
            event_id=event_id(self.config.tenant, shipment.shipment_id, kind, attempt),
            shipment_id=shipment.shipment_id,
            occurred_at=timestamp(moment),
            **payload,  # type: ignore[arg-type]
        )

    def _created(
        self, shipment: ShipmentPlan, moment: datetime, start: datetime
    ) -> shipment_pb2.ShipmentEvent:
        begin, end = shipment.window_s
        return self._event(
            shipment,
            "created",
            moment,
            created=shipment_pb2.ShipmentCreated(
                customer_id=shipment.customer_id,
                origin=_latlng(shipment.origin),
                destination=_latlng(shipment.destination),
                promised_window=common_pb2.TimeWindow(
                    start=timestamp(start + timedelta(seconds=begin)),
                    end=timestamp(start + timedelta(seconds=end)),
                ),
                planned_route=shipment.planned_route,
                reference=shipment.reference,
            ),
        )

    async def _milestone(self, plan: RoundPlan, milestone: Milestone, at: Clock) -> None:
        moment = at(milestone.at_s)
        every = plan.shipments
        step = milestone.step
        if step is Step.PICKED_UP:
            picked_up = shipment_pb2.PickedUp()
            await self.tms.record(
                [self._event(s, "picked_up", moment, picked_up=picked_up) for s in every]
            )
        elif step is Step.IN_TRANSIT:
            in_transit = shipment_pb2.InTransit()
            await self.tms.record(
                [self._event(s, "in_transit", moment, in_transit=in_transit) for s in every]
            )
        elif step is Step.BAD_EVENT:
            # A scanner glitch: an exception report without a kind (refused, logged).
            await self.tms.record(
                [
                    self._event(
                        every[0],
                        "exception",
                        moment,
                        exception=shipment_pb2.ShipmentException(description="scanner glitch"),
                    )
                ]
            )
        else:
            shipment = every[milestone.shipment]
            if step is Step.OUT_FOR_DELIVERY:
                attempt = 2 if self._failed_before(plan, milestone) else 1
                await self.tms.record(
                    [
                        self._event(
                            shipment,
                            "out_for_delivery",
                            moment,
                            attempt,
                            out_for_delivery=shipment_pb2.OutForDelivery(),
                        )
                    ]
                )
            elif step is Step.ARRIVE and shipment.fails_first_attempt:
                await self._fail(plan, milestone.shipment, at)
            else:
                await self._deliver(shipment, moment)

    @staticmethod
    def _failed_before(plan: RoundPlan, milestone: Milestone) -> bool:
        return any(
            m.step is Step.ARRIVE and m.shipment == milestone.shipment and m.at_s < milestone.at_s
            for m in plan.milestones
        )

    async def _fail(self, plan: RoundPlan, index: int, at: Clock) -> None:
        """The first attempt fails; the TMS names when the next one is planned."""
        shipment = plan.shipments[index]
        arrive, retry = (
            next(m.at_s for m in plan.milestones if m.step is step and m.shipment == index)
            for step in (Step.ARRIVE, Step.HAND_OVER)
        )
        failed = self._event(
            shipment,
            "delivery_failed",
            at(arrive),
            delivery_failed=shipment_pb2.DeliveryFailed(
                reason=shipment.failure_reason,  # type: ignore[arg-type]
                note="nobody answered the door",
                retry_at=timestamp(at(retry)),
            ),
        )
        if await self.tms.record([failed]):
            self.stats.delivery_failures += 1

    async def _deliver(self, shipment: ShipmentPlan, moment: datetime) -> None:
        """The driver's proof of delivery, then the TMS's `delivered`."""
        attempt = 2 if shipment.fails_first_attempt else 1
        # The second attempt finds a neighbour at home.
        neighbour = delivery_pb2.CONFIRMATION_METHOD_HANDED_TO_NEIGHBOUR
        method = neighbour if attempt == 2 else shipment.method
        confirmation = delivery_pb2.DeliveryConfirmation(
            confirmation_id=event_id(
                self.config.tenant, shipment.shipment_id, "confirmation", attempt
            ),
            shipment_id=shipment.shipment_id,
            vehicle_id=self.vehicle_id,
            recipient_name=shipment.recipient,
            confirmed_at=timestamp(moment),
            location=_latlng(shipment.destination),
            method=method,  # type: ignore[arg-type]
            proof_sha256=shipment.proof_sha256 if attempt == 1 else "",
        )
        await self.app.confirm(confirmation)
        delivered = self._event(
            shipment, "delivered", moment, attempt, delivered=shipment_pb2.Delivered()
        )
        if await self.tms.record([delivered]):
            self.stats.shipments_delivered += 1
            self.open.pop(shipment.shipment_id, None)
