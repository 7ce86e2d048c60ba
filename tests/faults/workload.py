"""The fault suite's workload: a seeded plan, and the clients that drive it over gRPC.

`make_plan(seed, size, base)` decides everything the clients will send (shipments,
their lifecycle events and delivery confirmations, vehicles and their GPS batches,
including points ingest must refuse) from the seed alone: the same seed gives the
same plan. `Workload` runs the clients against the ingest services:

- one `GpsDriver` per vehicle: one bidirectional StreamPoints stream at a time,
  up to `window` batches in flight; it keeps every unacknowledged batch and, after
  any end of the stream (UNAVAILABLE, a deadline, a cut connection, a server
  killed), opens a new stream and resends them with their original sequence, in
  their original order (the contract of docs/ingest.md);
- `EventsClient`s (the TMS): each owns some shipments and sends their lifecycle
  events in order, one event per shipment per call (RecordEvents, or RecordEvent
  when only one is ready), the next event of a shipment only after the previous
  one was acknowledged; then the shipment's delivery confirmation
  (ConfirmDelivery). A failed call is retried unchanged (same event ids).

Everything the services acknowledged is recorded in the `Ledger`, which the
checker compares with PostgreSQL. The clients give up only at the workload's
deadline; what is unacknowledged then stays so in the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import grpc

from shared.auth import Role
from shared.domain.ids import gps_batch_event_id
from shared.envelopes import timestamp
from shared.pb import (
    common_pb2,
    delivery_pb2,
    delivery_pb2_grpc,
    gps_pb2,
    gps_pb2_grpc,
    shipment_pb2,
    shipment_pb2_grpc,
)
from tests.ingest_helpers import Metadata, bearer

TENANT = "acme"

#: Status codes after which a client retries (the service or the network failed).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
#: What grpc-core itself reports, client side, when a stream breaks under a call it
#: is writing to (the server process killed mid-stream: grpc/grpc#36066). No
#: cargotrack server sends it (their INTERNAL says "internal error (<type>)").
CORE_BROKEN_STREAM = "Internal error from Core"


def retryable(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a call that ended so failed in the service or the network (retry it),
    rather than answered: a broken contract if a cargotrack server said it."""
    return code in RETRYABLE or (code == grpc.StatusCode.INTERNAL and details == CORE_BROKEN_STREAM)


#: Reconnect quickly after a server restart (the default back-off grows to minutes).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)
#: Per call (unary) and per stream deadlines: a hung server ends in a retry, not a hang.
CALL_TIMEOUT_S = 10.0
STREAM_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Size:
    """How much work one scenario does, and how many faults it injects."""

    name: str
    shipments: int
    vehicles: int
    batches: int
    points: int
    faults: int
    #: How long the paced workload takes when nothing breaks.
    duration_s: float
    #: The clients' deadline: after it they stop retrying.
    deadline_s: float


REDUCED = Size(
    "reduced",
    shipments=24,
    vehicles=4,
    batches=30,
    points=5,
    faults=2,
    duration_s=6.0,
    deadline_s=90.0,
)
FULL = Size(
    "full",
    shipments=240,
    vehicles=16,
    batches=150,
    points=10,
    faults=6,
    duration_s=45.0,
    deadline_s=300.0,
)


@dataclass(eq=False)
class Item:
    """One thing a client sends: a shipment event, a delivery confirmation or a GPS batch."""

    #: The envelope event id it gets (GPS: gps_batch_event_id of tenant, device, sequence).
    key: str
    kind: str  # "event" | "confirmation" | "gps"
    #: Shipment id (events, confirmations) or vehicle id (GPS).
    aggregate: str
    payload: shipment_pb2.ShipmentEvent | delivery_pb2.DeliveryConfirmation | gps_pb2.GpsBatch
    #: GPS: how many of the batch's points ingest must accept (0: the batch is REJECTED).
    valid_points: int = 0
    attempts: int = 0
    #: Attempts that ended without an acknowledgement.
    failures: int = 0
    acked: bool = False
    ack_order: int = -1
    #: time.monotonic() when the client got the acknowledgement (tests/faults/gaps.py).
    acked_at: float = 0.0
    #: GPS: the answer's outcome and accepted point count.
    outcome: int = 0
    accepted_points: int = 0

    @property
    def batch(self) -> gps_pb2.GpsBatch:
        assert isinstance(self.payload, gps_pb2.GpsBatch)
        return self.payload

    @property
    def event(self) -> shipment_pb2.ShipmentEvent:
        assert isinstance(self.payload, shipment_pb2.ShipmentEvent)
        return self.payload

    @property
    def confirmation(self) -> delivery_pb2.DeliveryConfirmation:
        assert isinstance(self.payload, delivery_pb2.DeliveryConfirmation)
        return self.payload

    @property
    def expect_stored(self) -> bool:
        return self.kind != "gps" or self.valid_points > 0


@dataclass
class Ledger:
    """What the clients sent, and what the services acknowledged."""

    items: dict[str, Item] = field(default_factory=dict)
    #: Status codes of failed attempts, by name.
    errors: Counter[str] = field(default_factory=Counter)
    #: Answers that broke the contract (wrong sequence, wrong outcome, bad status).
    violations: list[str] = field(default_factory=list)
    resent: int = 0
    #: Calls or streams the fault injector cut while something was unacknowledged.
    cut_in_flight: int = 0
    _acks: itertools.count[int] = field(default_factory=itertools.count)

    def add(self, item: Item) -> Item:
        assert item.key not in self.items, item.key
        self.items[item.key] = item
        return item

    def acknowledge(self, item: Item) -> None:
        if item.acked:
            self.violations.append(f"{item.kind} {item.key} acknowledged twice")
            return
        item.acked = True
        item.ack_order = next(self._acks)
        item.acked_at = time.monotonic()

    def failed(self, items: Sequence[Item], code: str) -> None:
        for item in items:
            item.failures += 1
        self.errors[code] += 1

    @property
    def expected(self) -> list[Item]:
        """Items the services should acknowledge as stored (not REJECTED batches)."""
        return [i for i in self.items.values() if i.expect_stored]

    def progress(self) -> float:
        expected = self.expected
        return sum(i.acked for i in expected) / max(1, len(expected))


@dataclass(frozen=True)
class ShipmentPlan:
    shipment_id: str
    vehicle_id: str
    #: Lifecycle events in order, then the delivery confirmation if there is one.
    steps: tuple[Item, ...]


@dataclass(frozen=True)
class VehiclePlan:
    vehicle_id: str
    device_id: str
    batches: tuple[Item, ...]


@dataclass(frozen=True)
class Plan:
    seed: int
    size: Size
    shipments: tuple[ShipmentPlan, ...]
    vehicles: tuple[VehiclePlan, ...]


def _event(
    shipment_id: str, event_id: str, at: datetime, **kind: Any
) -> shipment_pb2.ShipmentEvent:
    return shipment_pb2.ShipmentEvent(
        event_id=event_id, shipment_id=shipment_id, occurred_at=timestamp(at), **kind
    )


def _lifecycle(rng: random.Random) -> list[str]:
    """A lifecycle, with the detours real shipments take (and a few impossible moves)."""
    steps = ["created", "vehicle_assigned", "picked_up", "in_transit"]
    if rng.random() < 0.2:
        steps.append("exception")
    roll = rng.random()
    if roll < 0.1:
        return [*steps, "cancelled"]
    if roll < 0.25:
        steps += ["out_for_delivery", "delivery_failed", "out_for_delivery"]
    else:
        steps.append("out_for_delivery")
    if rng.random() < 0.08:
        steps.append("picked_up")  # backwards: recorded as an anomaly, never a crash
    ending = rng.random()
    if ending < 0.35:
        return [*steps, "delivered"]
    if ending < 0.75:
        return [*steps, "confirmation"]
    return [*steps, "delivered", "confirmation"]


def make_plan(seed: int, size: Size, base: datetime) -> Plan:
    """Everything the clients will send, decided by the seed (times relative to `base`)."""
    rng = random.Random(seed)
    vehicles: list[VehiclePlan] = []
    for v in range(size.vehicles):
        vehicle_id = f"veh-{v:03d}"
        device_id = f"dev-{v:03d}"
        lat0, lon0 = 52.40 + 0.02 * v, 13.30
        batches: list[Item] = []
        for s in range(1, size.batches + 1):
            batch = gps_pb2.GpsBatch(vehicle_id=vehicle_id, device_id=device_id, sequence=s)
            rejected = rng.random() < 0.03
            bad = -1 if rejected or rng.random() > 0.08 else rng.randrange(size.points)
            valid = 0
            for i in range(size.points):
                j = (s - 1) * size.points + i
                point = batch.points.add(
                    latitude=lat0 + rng.uniform(-1e-5, 1e-5),
                    longitude=lon0 + 0.0003 * j,
                    accuracy_m=5.0,
                    speed_mps=20.0,
                    heading_deg=90.0,
                )
                point.recorded_at.CopyFrom(timestamp(base + timedelta(seconds=2 * j)))
                if rejected or i == bad:
                    point.latitude = math.nan if rng.random() < 0.5 else 95.0
                else:
                    valid += 1
            key = gps_batch_event_id(TENANT, device_id, s)
            batches.append(Item(key, "gps", vehicle_id, batch, valid_points=valid))
        vehicles.append(VehiclePlan(vehicle_id, device_id, tuple(batches)))

    shipments: list[ShipmentPlan] = []
    for n in range(size.shipments):
        shipment_id = f"shp-{n:05d}"
        vehicle_id = rng.choice(vehicles).vehicle_id
        start = base + timedelta(minutes=rng.randrange(0, 30))
        destination = common_pb2.LatLng(
            latitude=52.40 + rng.uniform(0, 0.1), longitude=13.30 + rng.uniform(0.05, 0.3)
        )
        steps: list[Item] = []
        for i, kind in enumerate(_lifecycle(rng)):
            at = start + timedelta(minutes=5 * i)
            event_id = f"{shipment_id}-e{i}-{kind}"
            if kind == "confirmation":
                far = rng.random() < 0.1
                confirmation = delivery_pb2.DeliveryConfirmation(
                    confirmation_id=f"{shipment_id}-pod",
                    shipment_id=shipment_id,
                    vehicle_id=vehicle_id,
                    recipient_name="A. Recipient",
                    confirmed_at=timestamp(at),
                    location=common_pb2.LatLng(
                        latitude=destination.latitude + (0.05 if far else 0.0),
                        longitude=destination.longitude,
                    ),
                    method=delivery_pb2.CONFIRMATION_METHOD_SIGNATURE,
                    proof_sha256=hashlib.sha256(shipment_id.encode()).hexdigest(),
                )
                steps.append(
                    Item(confirmation.confirmation_id, "confirmation", shipment_id, confirmation)
                )
                continue
            fields: dict[str, Any]
            if kind == "created":
                window = common_pb2.TimeWindow(
                    start=timestamp(start + timedelta(hours=2)),
                    end=timestamp(start + timedelta(hours=4)),
                )
                fields = {
                    "created": shipment_pb2.ShipmentCreated(
                        customer_id=f"cust-{n % 7}",
                        origin=common_pb2.LatLng(latitude=52.40, longitude=13.30),
                        destination=destination,
                        promised_window=window,
                        reference=f"order {n}",
                    )
                }
            elif kind == "vehicle_assigned":
                fields = {
                    "vehicle_assigned": shipment_pb2.VehicleAssigned(
                        vehicle_id=vehicle_id, driver_id=f"drv-{vehicle_id}", stop_sequence=1
                    )
                }
            elif kind == "delivery_failed":
                fields = {
                    "delivery_failed": shipment_pb2.DeliveryFailed(
                        reason=shipment_pb2.DELIVERY_FAILURE_REASON_RECIPIENT_ABSENT
                    )
                }
            elif kind == "exception":
                fields = {
                    "exception": shipment_pb2.ShipmentException(
                        kind=shipment_pb2.EXCEPTION_KIND_WEATHER, description="storm"
                    )
                }
            elif kind == "cancelled":
                fields = {"cancelled": shipment_pb2.Cancelled(reason="customer request")}
            else:
                message = {
                    "picked_up": shipment_pb2.PickedUp,
                    "in_transit": shipment_pb2.InTransit,
                    "out_for_delivery": shipment_pb2.OutForDelivery,
                    "delivered": shipment_pb2.Delivered,
                }[kind]()
                fields = {kind: message}
            steps.append(
                Item(event_id, "event", shipment_id, _event(shipment_id, event_id, at, **fields))
            )
        shipments.append(ShipmentPlan(shipment_id, vehicle_id, tuple(steps)))
    return Plan(seed, size, tuple(shipments), tuple(vehicles))


def ledger_for(plan: Plan) -> Ledger:
    ledger = Ledger()
    for vehicle in plan.vehicles:
        for item in vehicle.batches:
            ledger.add(item)
    for shipment in plan.shipments:
        for item in shipment.steps:
            ledger.add(item)
    return ledger


@dataclass
class Targets:
    """Where the ingest services listen ("127.0.0.1:port"); a restart may move them."""

    gps: str
    events: str
    confirmations: str


def open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))


def _code_name(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.code().name)
    return type(error).__name__


class _Cut(Exception):
    """The fault injector cancelled the call (a client-side disconnect)."""


class GpsDriver:
    """One driver's app: streams its vehicle's batches, resends what is unanswered."""

    def __init__(
        self,
        vehicle: VehiclePlan,
        targets: Targets,
        ledger: Ledger,
        *,
        window: int,
        pace_s: float,
    ) -> None:
        self.vehicle = vehicle
        self.targets = targets
        self.ledger = ledger
        self.window = window
        self.pace_s = pace_s
        self.metadata: Metadata = bearer(Role.DRIVER, tenant=TENANT, vehicle_id=vehicle.vehicle_id)
        self.unacked: deque[Item] = deque()
        self.sessions = 0
        self._next = 0
        self._call: Any = None
        self._cut = False
        self._new_channel = False

    @property
    def done(self) -> bool:
        return self._next >= len(self.vehicle.batches) and not self.unacked

    def disconnect(self, *, new_channel: bool = False) -> bool:
        """Cut the current stream if batches are in flight (True if it did)."""
        if self._call is None or not self.unacked or self._cut:
            return False
        self._cut = True
        self._new_channel = new_channel
        self.ledger.cut_in_flight += 1
        self._call.cancel()
        return True

    async def run(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        channel = open_channel(self.targets.gps)
        try:
            while not self.done and loop.time() < deadline:
                if self._new_channel:
                    await channel.close()
                    channel = open_channel(self.targets.gps)
                    self._new_channel = False
                ended_cleanly = await self._session(channel, deadline - loop.time())
                if not ended_cleanly and not self.done:
                    await asyncio.sleep(0.1 + 0.2 * random.random())
        finally:
            await channel.close()

    async def _session(self, channel: grpc.aio.Channel, left_s: float) -> bool:
        """One stream: resend the unanswered batches, then go on; False if it broke."""
        self.sessions += 1
        self._cut = False
        stub = gps_pb2_grpc.GpsIngestServiceStub(channel)
        call = stub.StreamPoints(metadata=self.metadata, timeout=min(STREAM_TIMEOUT_S, left_s))
        self._call = call
        space = asyncio.Event()
        writer = asyncio.create_task(self._write(call, space))
        try:
            while True:
                answer = await call.read()
                if answer is grpc.aio.EOF:
                    break
                self._answered(answer)
                space.set()
            code = await call.code()
            if code != grpc.StatusCode.OK:
                self._failed(code.name)
                details = await call.details()
                if not retryable(code, details):
                    self.ledger.violations.append(
                        f"{self.vehicle.vehicle_id}: stream ended with {code.name}: {details}"
                    )
                return False
            if not self.done:
                self.ledger.violations.append(
                    f"{self.vehicle.vehicle_id}: stream ended OK with batches unanswered"
                )
                return False
            return True
        except grpc.aio.AioRpcError as error:
            self._failed(_code_name(error))
            if not retryable(error.code(), error.details()):
                self.ledger.violations.append(
                    f"{self.vehicle.vehicle_id}: stream ended with {error.code().name}: "
                    f"{error.details()}"
                )
            return False
        except asyncio.CancelledError:
            if not self._cut:
                raise
            self._failed("CLIENT_CUT")
            return False
        finally:
            self._call = None
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    async def _write(self, call: Any, space: asyncio.Event) -> None:
        for item in list(self.unacked):  # resend, original order, original sequence
            item.attempts += 1
            self.ledger.resent += 1
            await call.write(gps_pb2.StreamPointsRequest(batch=item.batch))
        batches = self.vehicle.batches
        while self._next < len(batches):
            while len(self.unacked) >= self.window:
                space.clear()
                await space.wait()
            item = batches[self._next]
            self._next += 1
            self.unacked.append(item)
            item.attempts += 1
            await call.write(gps_pb2.StreamPointsRequest(batch=item.batch))
            await asyncio.sleep(self.pace_s * random.uniform(0.5, 1.5))
        await call.done_writing()

    def _answered(self, answer: gps_pb2.StreamPointsResponse) -> None:
        if not self.unacked:
            self.ledger.violations.append(
                f"{self.vehicle.vehicle_id}: answer for sequence {answer.sequence} "
                "with nothing in flight"
            )
            return
        item = self.unacked.popleft()
        batch = item.payload
        assert isinstance(batch, gps_pb2.GpsBatch)
        expected = (
            gps_pb2.BATCH_OUTCOME_REJECTED
            if item.valid_points == 0
            else gps_pb2.BATCH_OUTCOME_ACCEPTED
            if item.valid_points == len(batch.points)
            else gps_pb2.BATCH_OUTCOME_PARTIALLY_ACCEPTED
        )
        if answer.sequence != batch.sequence or answer.outcome != expected:
            self.ledger.violations.append(
                f"{self.vehicle.vehicle_id}: answer (sequence {answer.sequence}, outcome "
                f"{answer.outcome}) for batch {batch.sequence} expecting outcome {expected}"
            )
        if answer.outcome != gps_pb2.BATCH_OUTCOME_REJECTED and (
            answer.accepted_points != item.valid_points
        ):
            self.ledger.violations.append(
                f"{self.vehicle.vehicle_id}: batch {batch.sequence} accepted "
                f"{answer.accepted_points} points, expected {item.valid_points}"
            )
        item.outcome = answer.outcome
        item.accepted_points = answer.accepted_points
        self.ledger.acknowledge(item)

    def _failed(self, code: str) -> None:
        self.ledger.failed(list(self.unacked), code)


class EventsClient:
    """A TMS: sends its shipments' events in order (one per shipment per call), then
    their delivery confirmations, retrying failed calls unchanged."""

    def __init__(
        self,
        shipments: Sequence[ShipmentPlan],
        targets: Targets,
        ledger: Ledger,
        *,
        per_call: int,
        pace_s: float,
        seed: int,
    ) -> None:
        self.shipments = list(shipments)
        self.targets = targets
        self.ledger = ledger
        self.per_call = per_call
        self.pace_s = pace_s
        self.rng = random.Random(seed)
        self.shipper = bearer(Role.SHIPPER, tenant=TENANT)
        self.ops = bearer(Role.OPS, tenant=TENANT)
        self._cursor = {s.shipment_id: 0 for s in self.shipments}
        self._call: Any = None
        self._cut = False
        self._new_channel = False
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def done(self) -> bool:
        return all(self._cursor[s.shipment_id] >= len(s.steps) for s in self.shipments)

    def disconnect(self, *, new_channel: bool = False) -> bool:
        """Cancel the call in flight, if any (True if it did)."""
        if self._call is None or self._cut:
            return False
        self._cut = True
        self._new_channel = new_channel
        self.ledger.cut_in_flight += 1
        self._call.cancel()
        return True

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = open_channel(target)
        return channel

    async def run(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.done and loop.time() < deadline:
                ready = [
                    (s, s.steps[self._cursor[s.shipment_id]])
                    for s in self.shipments
                    if self._cursor[s.shipment_id] < len(s.steps)
                ]
                self.rng.shuffle(ready)
                ready = ready[: self.per_call]
                events = [item for _, item in ready if item.kind == "event"]
                confirmations = [item for _, item in ready if item.kind == "confirmation"]
                if events and await self._until_acked(events, deadline, self._send_events):
                    self._advance(events)
                for confirmation in confirmations:
                    if await self._until_acked([confirmation], deadline, self._confirm):
                        self._advance([confirmation])
                await asyncio.sleep(self.pace_s * self.rng.uniform(0.5, 1.5))
        finally:
            for channel in self._channels.values():
                await channel.close()

    def _advance(self, items: list[Item]) -> None:
        for item in items:
            self._cursor[item.aggregate] += 1

    async def _until_acked(
        self,
        items: list[Item],
        deadline: float,
        send: Callable[[list[Item]], Any],
    ) -> bool:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            if self._new_channel:
                for channel in self._channels.values():
                    await channel.close()
                self._channels.clear()
                self._new_channel = False
            for item in items:
                item.attempts += 1
                if item.attempts > 1:
                    self.ledger.resent += 1
            self._cut = False
            try:
                await send(items)
            except grpc.aio.AioRpcError as error:
                self.ledger.failed(items, _code_name(error))
                if not retryable(error.code(), error.details()):
                    self.ledger.violations.append(
                        f"{items[0].key}: {error.code().name} {error.details()}"
                    )
                    return False
            except asyncio.CancelledError:
                if not self._cut:
                    raise
                self.ledger.failed(items, "CLIENT_CUT")
            else:
                for item in items:
                    self.ledger.acknowledge(item)
                return True
            finally:
                self._call = None
            await asyncio.sleep(0.1 + 0.2 * self.rng.random())
        return False

    async def _send_events(self, items: list[Item]) -> None:
        stub = shipment_pb2_grpc.ShipmentEventsServiceStub(self._channel(self.targets.events))
        events = [item.event for item in items]
        if len(events) == 1:
            self._call = stub.RecordEvent(
                shipment_pb2.RecordEventRequest(event=events[0]),
                metadata=self.shipper,
                timeout=CALL_TIMEOUT_S,
            )
            answer = await self._call
            ids = [answer.event_id]
        else:
            self._call = stub.RecordEvents(
                shipment_pb2.RecordEventsRequest(events=events),
                metadata=self.shipper,
                timeout=CALL_TIMEOUT_S,
            )
            answers = await self._call
            ids = [result.event_id for result in answers.results]
        if ids != [item.key for item in items]:
            self.ledger.violations.append(f"answer ids {ids} for {[i.key for i in items]}")

    async def _confirm(self, items: list[Item]) -> None:
        [item] = items
        stub = delivery_pb2_grpc.DeliveryConfirmationsServiceStub(
            self._channel(self.targets.confirmations)
        )
        self._call = stub.ConfirmDelivery(
            delivery_pb2.ConfirmDeliveryRequest(confirmation=item.confirmation),
            metadata=self.ops,
            timeout=CALL_TIMEOUT_S,
        )
        answer = await self._call
        if answer.confirmation_id != item.key:
            self.ledger.violations.append(f"confirmation answer {answer.confirmation_id}")


class Workload:
    """Every client of a plan, run together until done or the deadline."""

    def __init__(self, plan: Plan, targets: Targets, *, clients: int = 3) -> None:
        self.plan = plan
        self.targets = targets
        self.ledger = ledger_for(plan)
        size = plan.size
        self.drivers = [
            GpsDriver(
                vehicle,
                targets,
                self.ledger,
                window=8,
                pace_s=size.duration_s / max(1, size.batches),
            )
            for vehicle in plan.vehicles
        ]
        # Each round a client sends the next step of each of its shipments: a shipment
        # of n steps takes n rounds, so the pace spreads the longest over the duration.
        longest = max((len(s.steps) for s in plan.shipments), default=1)
        per_call = -(-len(plan.shipments) // clients)
        self.tms = [
            EventsClient(
                plan.shipments[c::clients],
                targets,
                self.ledger,
                per_call=per_call,
                pace_s=size.duration_s / longest,
                seed=plan.seed * 100 + c,
            )
            for c in range(clients)
        ]
        self.rng = random.Random(plan.seed + 1)
        self.finished = asyncio.Event()

    async def run(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.plan.size.deadline_s
        try:
            await asyncio.gather(
                *(driver.run(deadline) for driver in self.drivers),
                *(client.run(deadline) for client in self.tms),
            )
        finally:
            self.finished.set()

    async def wait_progress(self, fraction: float, timeout_s: float = 120.0) -> None:
        """Until that fraction of the expected items is acknowledged (or the workload ended)."""
        async with asyncio.timeout(timeout_s):
            while self.ledger.progress() < fraction and not self.finished.is_set():  # noqa: ASYNC110 - polls the ledger
                await asyncio.sleep(0.02)

    def in_flight(self) -> int:
        """GPS batches sent and not yet answered, over all drivers."""
        return sum(len(driver.unacked) for driver in self.drivers)

    def cut_some(self, *, new_channel: bool = False) -> int:
        """Cut the calls of a random half of the clients that have something in flight."""
        clients: list[GpsDriver | EventsClient] = [*self.drivers, *self.tms]
        self.rng.shuffle(clients)
        cut = 0
        for client in clients[: max(1, len(clients) // 2)]:
            cut += client.disconnect(new_channel=new_channel)
        return cut

    async def cut_when_in_flight(self, *, new_channel: bool = False, within_s: float = 2.0) -> int:
        """Cut calls as soon as some are in flight, waiting up to `within_s` for that moment.

        A fast ingest answers within milliseconds, so one random instant often finds
        nothing in flight; polling the clients every millisecond catches the window.
        Returns how many calls were cut (0 only if none was in flight in that time).
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + within_s
        while not self.finished.is_set() and loop.time() < give_up:
            cut = self.cut_some(new_channel=new_channel)
            if cut:
                return cut
            await asyncio.sleep(0.001)
        return 0
