"""Readiness: a service is SERVING only while its Kafka and PostgreSQL answer.

Liveness stays simple (the process answers gRPC at all); readiness is what a
load balancer or Kubernetes uses to route traffic away from an instance that has
lost a dependency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg
from aiokafka import AIOKafkaProducer

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[None]]


def kafka_check(producer: AIOKafkaProducer, timeout_s: float = 2.0) -> Check:
    """Passes when the producer's client can fetch cluster metadata in time."""

    async def check() -> None:
        async with asyncio.timeout(timeout_s):
            ok = await producer.client.fetch_all_metadata()
        if not ok.brokers():
            raise ConnectionError("Kafka returned no brokers")

    return check


def postgres_check(pool: asyncpg.Pool, timeout_s: float = 2.0) -> Check:
    """Passes when a pooled connection answers SELECT 1 in time."""

    async def check() -> None:
        async with asyncio.timeout(timeout_s):
            await pool.fetchval("SELECT 1")

    return check


async def monitor(
    checks: dict[str, Check],
    set_serving: Callable[[bool], Awaitable[None]],
    interval_s: float = 2.0,
    *,
    pause: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Run the checks forever; report SERVING only while all pass. Logs each change.

    Between rounds it awaits `pause(interval_s)` (a service may return sooner, e.g.
    when its Kafka link connects). The one readiness loop: `ServiceServer` runs it
    with the checks each service names."""
    serving: bool | None = None
    while True:
        failures = []
        for name, check in checks.items():
            try:
                await check()
            except Exception as error:  # any failure means not ready; the reason is logged
                failures.append(f"{name}: {error!r}")
        now_serving = not failures
        if now_serving != serving:
            if now_serving:
                log.info("ready")
            else:
                log.warning("not ready: %s", "; ".join(failures))
            await set_serving(now_serving)
            serving = now_serving
        await pause(interval_s)
