"""Measuring helpers: percentiles, load clients as subprocesses, offsets, RSS samples."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.stack import rss_bytes
from shared.config import Settings


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def slope_per_minute(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples, per minute; 0 for < 3 samples."""
    if len(samples) < 3:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in samples)
    return cov / var * 60.0


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


#: The checkout holding `bench/`, `shared/` and `services/`.
REPO_ROOT = Path(__file__).resolve().parents[1]


class JsonClient:
    """A load client subprocess (`python -m MODULE`): a JSON job in, a JSON result out.

    Control lines (`pause`, `resume`, `stop`) may be sent while it runs. The process
    is killed if the block is left before it finished.
    """

    def __init__(self, module: str, job: Mapping[str, Any]) -> None:
        self.module = module
        self.job = dict(job)
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            cwd=REPO_ROOT,  # where `bench` is importable from
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=256 << 20,  # the result line carries latency samples
        )
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(self.job).encode() + b"\n")
        await self.process.stdin.drain()

    async def send(self, command: str) -> None:
        process = self.process
        if process is None or process.stdin is None or process.returncode is not None:
            return
        with contextlib.suppress(ConnectionError):
            process.stdin.write(command.encode() + b"\n")
            await process.stdin.drain()

    async def result(self, timeout_s: float) -> dict[str, Any]:
        """The client's result line (its last JSON line); raises if it fails."""
        assert self.process is not None
        assert self.process.stdout is not None
        last: dict[str, Any] | None = None
        async with asyncio.timeout(timeout_s):
            async for line in self.process.stdout:
                with contextlib.suppress(ValueError):
                    last = json.loads(line)
            code = await self.process.wait()
        if code != 0 or last is None or "ready" in last:
            raise RuntimeError(f"{self.module} failed with exit status {code}")
        return last

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()

    async def __aenter__(self) -> JsonClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


async def run_client(module: str, job: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    async with JsonClient(module, job) as client:
        return await client.result(timeout_s)


class Offsets:
    """Kafka end offsets and the projection's stored offsets of one topic."""

    def __init__(self, settings: Settings, topic: str, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.topic = topic
        self.pool = pool
        self.consumer = AIOKafkaConsumer(**settings.kafka.client_options())
        self.partitions: list[TopicPartition] = []

    async def start(self) -> None:
        await self.consumer.start()
        for _ in range(100):
            found = self.consumer.partitions_for_topic(self.topic)
            if found:
                self.partitions = [TopicPartition(self.topic, p) for p in sorted(found)]
                return
            await self.consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {self.topic} not found")

    async def stop(self) -> None:
        await self.consumer.stop()

    async def ends(self) -> dict[int, int]:
        """Next offset of every partition."""
        found = await self.consumer.end_offsets(self.partitions)
        return {tp.partition: int(offset) for tp, offset in found.items()}

    async def stored(self, projection: str = "tracking") -> dict[int, int]:
        """Last applied offset per partition (-1 when none)."""
        rows = await self.pool.fetch(
            "SELECT partition, last_offset FROM projection_offsets"
            " WHERE projection = $1 AND topic = $2",
            projection,
            self.topic,
        )
        stored = {r["partition"]: int(r["last_offset"]) for r in rows}
        return {tp.partition: stored.get(tp.partition, -1) for tp in self.partitions}

    async def lag(self) -> int:
        """Records written but not yet applied by the projection."""
        ends, stored = await self.ends(), await self.stored()
        return sum(max(0, end - 1 - stored[p]) for p, end in ends.items())

    async def wait_applied(self, ends: Mapping[int, int], timeout_s: float) -> float:
        """Wait until the projection applied everything below `ends`; return when (wall)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stored = await self.stored()
            if all(stored.get(p, -1) >= end - 1 for p, end in ends.items()):
                return time.time()
            if time.monotonic() > deadline:
                behind = {p: (stored.get(p), end) for p, end in ends.items()}
                raise TimeoutError(f"projection not caught up on {self.topic}: {behind}")
            await asyncio.sleep(0.02)


@dataclass
class RssSeries:
    """RSS samples (wall time, bytes) of each service, tagged with the phase."""

    samples: dict[str, list[tuple[float, int, str]]] = field(default_factory=dict)
    phase: str = "setup"

    def add(self, name: str, at: float, rss: int) -> None:
        self.samples.setdefault(name, []).append((at, rss, self.phase))

    def peak(self, name: str, phases: Iterable[str]) -> int:
        wanted = set(phases)
        return max((rss for _, rss, ph in self.samples.get(name, []) if ph in wanted), default=0)

    def slope_mb_per_min(self, name: str, phase: str, skip_fraction: float = 0.25) -> float:
        points = [(t, rss) for t, rss, ph in self.samples.get(name, []) if ph == phase]
        points = points[int(len(points) * skip_fraction) :]
        if not points:
            return 0.0
        t0 = points[0][0]
        return slope_per_minute([(t - t0, rss / 1e6) for t, rss in points])

    def phase_window(self, name: str, phase: str) -> tuple[float, float]:
        """(first, last) RSS in MB of the phase's samples after the warm-up quarter."""
        points = [rss for _, rss, ph in self.samples.get(name, []) if ph == phase]
        points = points[int(len(points) * 0.25) :]
        if not points:
            return (0.0, 0.0)
        return points[0] / 1e6, points[-1] / 1e6


async def sample_rss(pids: Mapping[str, int], series: RssSeries, interval_s: float = 1.0) -> None:
    """Sample every process's RSS until cancelled."""
    while True:
        now = time.time()
        for name, pid in pids.items():
            rss = rss_bytes(pid)
            if rss is not None:
                series.add(name, now, rss)
        await asyncio.sleep(interval_s)


async def sample_load(series: list[tuple[float, float]], interval_s: float = 5.0) -> None:
    """Sample the 1-minute load average until cancelled."""
    while True:
        series.append((time.time(), os.getloadavg()[0]))
        await asyncio.sleep(interval_s)
