"""GPS load client: drives gps-ingest's StreamPoints from its own process.

Run as `python -m bench.gps_client`; reads one JSON job (see `Job`) on its first stdin
line, then control lines (`pause`, `resume`, `stop`), and prints one JSON result
line on stdout when done. The orchestrator (bench.run) starts it, so the client's
CPU is visible as its own process and never stalls the orchestrator's clocks.

Each of `streams` workers takes its share of the vehicles and cycles through them:
for one vehicle it opens a stream with that vehicle's driver token, writes
`batches_per_stream` batches (pipelined, at most `pipeline` unanswered), closes its
side and reads the remaining answers. With `rate` > 0 the workers pace their batches
to that many points per second in total (open loop: a late batch goes out at once);
with `once`, every vehicle sends exactly one session, the sessions spread evenly over
`duration_s` (used to trigger alerts at a steady pace).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from bench.workload import (
    SPEED_MPS,
    TENANT,
    batches_per_stream,
    encode_points,
    encode_request,
    route_of,
    vehicle_id,
)
from shared.auth import Role, mint_token
from shared.config import DEV_JWT_SECRET
from shared.pb import gps_pb2

METHOD = "/cargotrack.v1.GpsIngestService/StreamPoints"


@dataclass
class Job:
    target: str
    vehicles: list[int]
    device: str
    batch: int
    start_s: int
    max_points_per_vehicle: int
    #: When the fleet left its origins (epoch seconds): positions follow from it.
    origin_s: int
    duration_s: float
    speed_mps: float = SPEED_MPS
    streams: int = 8
    batches_per_stream: int = 0  # 0: bench.workload.batches_per_stream(batch)
    pipeline: int = 32
    rate: float = 0.0
    once: bool = False
    channels: int = 2
    secret: str = DEV_JWT_SECRET


@dataclass
class Result:
    started: float = 0.0
    ended: float = 0.0
    batches: int = 0
    points: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    #: Acknowledged points per whole second since `started`.
    per_second: list[int] = field(default_factory=list)
    #: Send-to-acknowledgement seconds, a sample of at most ~20,000.
    ack_latencies: list[float] = field(default_factory=list)
    exhausted: bool = False
    #: The most fixes any vehicle used (its event-time window's used part).
    max_point: int = 0


class Client:
    def __init__(self, job: Job) -> None:
        if job.batches_per_stream <= 0:
            job.batches_per_stream = batches_per_stream(job.batch)
        self.job = job
        self.result = Result()
        self.running = asyncio.Event()
        self.running.set()
        self.stopping = asyncio.Event()
        self._tokens: dict[int, str] = {}
        self._next_point: dict[int, int] = {}
        self._next_sequence: dict[int, int] = {}
        self._sample_every = 1
        self._acks_seen = 0

    def _token(self, vehicle: int) -> str:
        token = self._tokens.get(vehicle)
        if token is None:
            token = mint_token(
                self.job.secret,
                role=Role.DRIVER,
                tenant_id=TENANT,
                subject=f"driver-{vehicle}",
                vehicle_id=vehicle_id(vehicle),
                ttl_s=6 * 3600,
            )
            self._tokens[vehicle] = token
        return token

    def _record_ack(self, sent_at: float, response: gps_pb2.StreamPointsResponse) -> None:
        now = time.monotonic()
        result = self.result
        if response.outcome != gps_pb2.BATCH_OUTCOME_ACCEPTED:
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(str(response).replace("\n", " ")[:300])
            return
        result.batches += 1
        result.points += response.accepted_points
        second = int(now - self._t0)
        while len(result.per_second) <= second:
            result.per_second.append(0)
        result.per_second[second] += response.accepted_points
        self._acks_seen += 1
        if self._acks_seen % self._sample_every == 0:
            result.ack_latencies.append(now - sent_at)
            if len(result.ack_latencies) >= 20_000:
                result.ack_latencies = result.ack_latencies[::2]
                self._sample_every *= 2

    async def _session(self, channel: grpc.aio.Channel, vehicle: int, pace: _Pacer | None) -> None:
        job = self.job
        call = channel.stream_stream(
            METHOD,
            request_serializer=None,
            response_deserializer=gps_pb2.StreamPointsResponse.FromString,
        )(metadata=(("authorization", f"Bearer {self._token(vehicle)}"),))
        window = asyncio.Semaphore(job.pipeline)
        sent: list[float] = []
        route = route_of(vehicle)

        async def read() -> None:
            index = 0
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                window.release()
                self._record_ack(sent[index], response)
                index += 1

        reader = asyncio.create_task(read())
        try:
            for _ in range(job.batches_per_stream):
                if self.stopping.is_set():
                    break
                await self.running.wait()
                first = self._next_point.get(vehicle, 0)
                if first + job.batch > job.max_points_per_vehicle:
                    self.result.exhausted = True
                    self.stopping.set()
                    break
                if pace is not None:
                    await pace.wait()
                sequence = self._next_sequence.get(vehicle, 1)
                request = encode_request(
                    vehicle_id(vehicle),
                    f"{vehicle_id(vehicle)}-{job.device}",
                    sequence,
                    encode_points(
                        route, job.origin_s, job.start_s, first, job.batch, job.speed_mps
                    ),
                )
                self._next_point[vehicle] = first + job.batch
                self._next_sequence[vehicle] = sequence + 1
                await window.acquire()
                sent.append(time.monotonic())
                await call.write(request)
            await call.done_writing()
            await reader
        except grpc.aio.AioRpcError as error:
            self.result.errors += 1
            if len(self.result.error_samples) < 5:
                self.result.error_samples.append(f"{error.code().name}: {error.details()}")
            reader.cancel()
        finally:
            if not reader.done():
                reader.cancel()

    async def _worker(
        self, channel: grpc.aio.Channel, vehicles: list[int], pace: _Pacer | None
    ) -> None:
        if not vehicles:
            return
        i = 0
        while not self.stopping.is_set():
            await self._session(channel, vehicles[i % len(vehicles)], pace)
            i += 1

    async def _once(self, channel: grpc.aio.Channel, vehicle: int, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        if not self.stopping.is_set():
            await self._session(channel, vehicle, None)

    async def run(self) -> Result:
        job = self.job
        options = [("grpc.max_send_message_length", 64 << 20)]
        channels = [
            grpc.aio.insecure_channel(job.target, options=[*options, ("grpc.channel_id", n)])
            for n in range(max(1, job.channels))
        ]
        try:
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), 30)
            for vehicle in job.vehicles:  # tokens before the clock starts
                self._token(vehicle)
            self._t0 = time.monotonic()
            self.result.started = time.time()
            deadline = self._t0 + job.duration_s
            stopper = asyncio.create_task(self._stop_at(deadline))
            if job.once:
                spacing = job.duration_s / max(1, len(job.vehicles))
                tasks = [
                    self._once(channels[n % len(channels)], v, self._t0 + n * spacing)
                    for n, v in enumerate(job.vehicles)
                ]
            else:
                streams = max(1, job.streams)
                pace = _Pacer(job.rate / job.batch / streams, self._t0) if job.rate > 0 else None
                tasks = [
                    self._worker(
                        channels[w % len(channels)],
                        job.vehicles[w::streams],
                        _Pacer(pace.per_s, self._t0 + w * pace.interval / streams)
                        if pace
                        else None,
                    )
                    for w in range(streams)
                ]
            await asyncio.gather(*tasks)
            stopper.cancel()
            self.result.ended = time.time()
            self.result.max_point = max(self._next_point.values(), default=0)
            return self.result
        finally:
            for channel in channels:
                await channel.close()

    async def _stop_at(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        self.stopping.set()
        self.running.set()


class _Pacer:
    """Releases callers at `per_s` per second from `t0` on (late callers go at once)."""

    def __init__(self, per_s: float, t0: float) -> None:
        self.per_s = per_s
        self.interval = 1.0 / per_s
        self._next = t0

    async def wait(self) -> None:
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next += self.interval


def _control(loop: asyncio.AbstractEventLoop, client: Client) -> None:
    """Read control lines from stdin (a thread: stdin is a pipe from the orchestrator)."""
    for line in sys.stdin:
        command = line.strip()
        if command == "pause":
            loop.call_soon_threadsafe(client.running.clear)
        elif command == "resume":
            loop.call_soon_threadsafe(client.running.set)
        elif command == "stop":
            loop.call_soon_threadsafe(client.stopping.set)
            loop.call_soon_threadsafe(client.running.set)


async def _main() -> None:
    job = Job(**json.loads(sys.stdin.readline()))
    client = Client(job)
    threading.Thread(
        target=_control, args=(asyncio.get_running_loop(), client), daemon=True
    ).start()
    print(json.dumps({"ready": True}), flush=True)
    result = await client.run()
    out: dict[str, Any] = asdict(result)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(_main())
