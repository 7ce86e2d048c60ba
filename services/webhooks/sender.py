"""The sender half of the worker: attempts due deliveries with backoff, in order per shipment.

Loop: read the oldest pending delivery of each (endpoint, shipment) with the
database's clock, pick the due ones (shared.domain.webhooks.deliverable), lease them
(so another worker replica does not attempt them too), POST each, and record the
outcome fenced by the lease: delivered (2xx), pending again with the next attempt
after an exponential backoff, or dead after CARGOTRACK_WEBHOOK_MAX_ATTEMPTS. A later
alert of a shipment is never attempted before the earlier one finished, so a
receiver sees a shipment's alerts in order, though a retried one may repeat
(at least once: the Cargotrack-Alert-Id header is the deduplication key).

A worker that dies mid-attempt leaves a lease that runs out after
WebhookSettings.lease_s; any worker then attempts the delivery again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import aiohttp
import asyncpg

from services.webhooks.guard import GuardedResolver, TargetRefused, check_addresses
from shared import metrics
from shared.config import WebhookSettings
from shared.domain import webhooks as rules
from shared.readmodel import webhooks as store

log = logging.getLogger(__name__)

#: Bytes of a failed response's body kept in the delivery log (never read further).
MAX_ERROR_BODY = 256
USER_AGENT = "cargotrack-webhooks/1"


class Sender:
    def __init__(
        self,
        settings: WebhookSettings,
        pool: asyncpg.Pool,
        *,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self._jitter = jitter
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New deliveries were recorded: look now instead of after the poll interval."""
        self._wake.set()

    def session(self) -> aiohttp.ClientSession:
        settings = self.settings
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(settings.allow_private),
            use_dns_cache=False,  # every connection resolves, and checks, again
            limit=settings.concurrency,
        )
        timeout = aiohttp.ClientTimeout(
            total=settings.timeout_s, sock_connect=settings.connect_timeout_s
        )
        # trust_env stays off: no proxy from the environment carries webhooks.
        return aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers={"User-Agent": USER_AGENT}
        )

    async def run(self) -> None:
        """Deliver until cancelled; a database error ends it (the process restarts).
        On the way out, attempts in flight are abandoned and their leases released, so
        another worker takes them at once rather than after the lease."""
        in_flight: dict[asyncio.Task[None], store.Claimed] = {}
        async with self.session() as session:
            try:
                while True:
                    self._wake.clear()
                    free = self.settings.concurrency - len(in_flight)
                    for delivery in await self._claim(free) if free > 0 else []:
                        task = asyncio.create_task(
                            self.attempt(session, delivery),
                            name=f"webhook-delivery-{delivery.delivery_id}",
                        )
                        in_flight[task] = delivery
                    waker = asyncio.create_task(self._wake.wait())
                    await asyncio.wait(
                        {waker, *in_flight},
                        timeout=self.settings.poll_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    waker.cancel()
                    for task in [task for task in in_flight if task.done()]:
                        del in_flight[task]
                        task.result()  # a database error ends the loop
            finally:
                for task in in_flight:
                    task.cancel()
                await asyncio.gather(*in_flight, return_exceptions=True)
                unfinished = [d for t, d in in_flight.items() if t.cancelled()]
                await self._release(unfinished)

    async def _release(self, claimed: list[store.Claimed]) -> None:
        if not claimed:
            return
        try:
            async with asyncio.timeout(5), self.pool.acquire() as connection:
                await store.release(connection, claimed)
        except Exception as error:  # their leases run out instead
            log.warning("could not release %d webhook leases: %r", len(claimed), error)

    async def _claim(self, limit: int) -> list[store.Claimed]:
        async with self.pool.acquire() as connection:
            now, heads = await store.pending_heads(connection, limit)
            due = rules.deliverable(heads, now, limit)
            return await store.claim(
                connection, [d.delivery_id for d in due], self.settings.lease_s
            )

    async def attempt(self, session: aiohttp.ClientSession, delivery: store.Claimed) -> None:
        """POST one delivery and record the outcome."""
        started = time.perf_counter()
        status_code, error = await self.post(session, delivery)
        metrics.WEBHOOK_ATTEMPT_LATENCY.observe(time.perf_counter() - started)
        attempts = delivery.attempts + 1
        retry_in = 0.0
        if rules.is_success(status_code):
            status, outcome = store.DELIVERED, "delivered"
        elif rules.is_dead(attempts, self.settings.max_attempts):
            status, outcome = store.DEAD, "dead"
        else:
            status, outcome = store.PENDING, "retry"
            retry_in = rules.retry_delay_s(
                attempts, self.settings.backoff_s, self.settings.backoff_max_s, self._jitter()
            )
        async with self.pool.acquire() as connection:
            recorded = await store.record_attempt(
                connection,
                delivery,
                status=status,
                status_code=status_code,
                error=error,
                retry_in_s=retry_in,
            )
        if not recorded:
            log.info(
                "delivery %d: outcome not recorded (webhook deleted, or lease lost)",
                delivery.delivery_id,
            )
            return
        metrics.WEBHOOK_DELIVERIES.labels(outcome).inc()
        if status == store.DEAD:
            log.warning(
                "delivery %d of alert %s to webhook %s dead after %d attempts: %s",
                delivery.delivery_id,
                delivery.alert_id,
                delivery.webhook_id,
                attempts,
                error,
            )
        elif status == store.PENDING:
            log.info(
                "delivery %d attempt %d failed (%s); next in %.1f s",
                delivery.delivery_id,
                attempts,
                error,
                retry_in,
            )

    async def post(
        self, session: aiohttp.ClientSession, delivery: store.Claimed
    ) -> tuple[int, str]:
        """One attempt: (HTTP status, "" ) or (status or 0, why it failed)."""
        target, violations = rules.check_url(delivery.url, allow_http=self.settings.allow_http)
        if target is None:
            return 0, "URL refused: " + "; ".join(v.description for v in violations)
        try:
            if target.address is not None:  # aiohttp does not resolve literals
                check_addresses(target.host, [target.address], self.settings.allow_private)
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                rules.ALERT_ID_HEADER: delivery.alert_id,
                rules.SIGNATURE_HEADER: rules.signature_header(
                    delivery.secret, timestamp, delivery.body
                ),
                "Cargotrack-Webhook-Id": delivery.webhook_id,
                "Cargotrack-Attempt": str(delivery.attempts + 1),
            }
            async with session.post(
                delivery.url, data=delivery.body, headers=headers, allow_redirects=False
            ) as response:
                if rules.is_success(response.status):
                    return response.status, ""
                head = await response.content.read(MAX_ERROR_BODY)
                text = head.decode(errors="replace").strip()
                return response.status, f"HTTP {response.status}" + (f": {text}" if text else "")
        except TargetRefused as refused:
            return 0, f"target refused: {refused}"
        except TimeoutError:
            return 0, f"no response within {self.settings.timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as error:
            return 0, f"{type(error).__name__}: {error}"
