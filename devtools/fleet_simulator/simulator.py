"""The simulated fleet: vehicles, their apps and the TMS, as real gRPC clients."""

from __future__ import annotations

import asyncio
import logging

import grpc

from devtools.fleet_simulator.clients import DriverApp, Tms, TokenSource, event_id
from devtools.fleet_simulator.config import SimulatorConfig, Targets, default_run_id
from devtools.fleet_simulator.plan import vehicle_id
from devtools.fleet_simulator.routes import RecordedTrip, load_trips
from devtools.fleet_simulator.stats import SimulatorStats
from devtools.fleet_simulator.uplink import GpsUplink
from devtools.fleet_simulator.vehicle import OpenShipments, Vehicle
from shared.auth import Role
from shared.envelopes import timestamp, utc_now
from shared.lifecycle import Lifecycle
from shared.pb import shipment_pb2

__all__ = ["FleetSimulator", "run"]

log = logging.getLogger(__name__)

#: Bounds of the clean stop: answers for batches in flight, then the cancellations.
FLUSH_S = 2.0
CANCEL_S = 3.0


class FleetSimulator(Lifecycle):
    """Runs `config.vehicles` vehicles against the ingest services at `targets`.

    Lifecycle: `start()` (once) loads the trips, opens one channel per target and
    starts every vehicle; `wait()` returns only by raising the first vehicle's error;
    `stop()` stops the vehicles, lets each app flush its unanswered GPS batches (at
    most FLUSH_S), records `cancelled` for shipments not delivered (`cancel_on_stop`,
    at most CANCEL_S) and closes the channels. `stop()` is idempotent and safe before
    `start()`; `async with` does both.
    """

    def __init__(
        self, config: SimulatorConfig, targets: Targets, *, stats: SimulatorStats | None = None
    ) -> None:
        self.config = config
        self.targets = targets
        self.stats = stats or SimulatorStats()
        self.run_id = config.run_id or default_run_id()
        self.open: OpenShipments = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._uplinks: list[GpsUplink] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._tms: Tms | None = None
        self._started = False
        self._stopped = False

    def _channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            self._channels[target] = grpc.aio.insecure_channel(target)
        return self._channels[target]

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("FleetSimulator.start() called twice")
        self._started = True
        config = self.config
        trips: list[RecordedTrip] = await asyncio.to_thread(
            load_trips, config.datasets, config.data_dir, sliced=config.sliced_data
        )
        if not trips:
            raise ValueError(f"no usable trips in {', '.join(config.datasets)}")
        self._tms = Tms(
            self._channel(self.targets.events),
            TokenSource(
                config.jwt_secret, role=Role.OPS, tenant=config.tenant, subject="tms@simulator"
            ),
            self.stats,
        )
        for no in range(1, config.vehicles + 1):
            vehicle = vehicle_id(no)
            driver = TokenSource(
                config.jwt_secret,
                role=Role.DRIVER,
                tenant=config.tenant,
                subject=f"driver-{no:02d}@simulator",
                vehicle_id=vehicle,
            )
            uplink = GpsUplink(
                self._channel(self.targets.gps),
                vehicle_id=vehicle,
                # A new device id per run: a device that loses its counter takes a new id.
                device_id=f"phone-{no:02d}-{self.run_id}",
                metadata=driver.metadata,
                stats=self.stats,
            )
            await uplink.start()
            self._uplinks.append(uplink)
            app = DriverApp(self._channel(self.targets.confirmations), driver, self.stats)
            driving = Vehicle(
                no,
                config,
                trips,
                self.run_id,
                uplink=uplink,
                tms=self._tms,
                app=app,
                stats=self.stats,
                open_shipments=self.open,
            )
            self._tasks.append(asyncio.create_task(driving.run(), name=f"vehicle:{vehicle}"))
        log.info(
            "fleet simulator: run %s, %d vehicle(s) on %d recorded trip(s) of %s, seed %d",
            self.run_id,
            config.vehicles,
            len(trips),
            "+".join(config.datasets),
            config.seed,
        )

    async def wait(self) -> None:
        """Wait until a vehicle or a GPS uplink fails, and raise its error (neither
        ends on its own before stop())."""
        if not self._tasks:
            raise RuntimeError("start() first")
        watched = [*self._tasks, *(asyncio.ensure_future(u.wait()) for u in self._uplinks)]
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in watched[len(self._tasks) :]:
                task.cancel()
        raise RuntimeError("a simulated vehicle stopped driving")

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(uplink.stop(FLUSH_S) for uplink in self._uplinks))
        if self.config.cancel_on_stop and self.open and self._tms is not None:
            await self._cancel_open()
        for channel in self._channels.values():
            await channel.close()

    async def _cancel_open(self) -> None:
        assert self._tms is not None
        now = timestamp(utc_now())
        events = [
            shipment_pb2.ShipmentEvent(
                event_id=event_id(self.config.tenant, shipment_id, "cancelled"),
                shipment_id=shipment_id,
                occurred_at=now,
                cancelled=shipment_pb2.Cancelled(reason="simulation stopped"),
            )
            for shipment_id in sorted(self.open)
        ]
        try:
            async with asyncio.timeout(CANCEL_S):
                for start in range(0, len(events), 500):
                    if await self._tms.record(events[start : start + 500]):
                        self.stats.shipments_cancelled += len(events[start : start + 500])
        except (TimeoutError, grpc.aio.AioRpcError) as error:
            log.warning("could not cancel %d open shipment(s): %r", len(events), error)
        else:
            log.info("cancelled %d shipment(s) not delivered before the stop", len(events))
        self.open.clear()


async def run(
    config: SimulatorConfig,
    targets: Targets,
    *,
    stats: SimulatorStats | None = None,
    stop: asyncio.Event | None = None,
) -> SimulatorStats:
    """Simulate until `stop` is set (or the task is cancelled); stop cleanly; return the
    counters. A vehicle's failure is re-raised after the same clean stop."""
    async with FleetSimulator(config, targets, stats=stats) as simulator:
        failing = asyncio.ensure_future(simulator.wait())
        stopping = asyncio.ensure_future(stop.wait() if stop else asyncio.Event().wait())
        try:
            await asyncio.wait({failing, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if failing.done():
                failing.result()
        finally:
            for task in (failing, stopping):
                task.cancel()
            await asyncio.wait({failing, stopping})
    return simulator.stats
