"""Running a service process: one supervisor, signals, ordered shutdown.

A service is a set of long-running tasks (a gRPC server waiting for
termination, a consumer loop, a health monitor). `Supervisor` starts them, waits
until one fails or a stop is requested (SIGTERM/SIGINT), cancels the rest, waits
for them, and re-raises the first error. Resources are closed afterwards by the
caller's AsyncExitStack in reverse order of opening, so a gRPC server drains
before the Kafka producer it writes to is flushed and closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

#: How long a cancelled task may take to finish before it is cancelled again.
CANCEL_AGAIN_AFTER_S = 5.0


class Supervisor:
    """Runs named tasks until the first failure or a stop request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._stop = asyncio.Event()

    def spawn(self, name: str, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Start a task now; it is supervised from here on."""
        if name in self._tasks:
            coroutine.close()
            raise ValueError(f"task {name!r} already exists")
        self._tasks[name] = asyncio.create_task(coroutine, name=f"{self.name}:{name}")

    def request_stop(self) -> None:
        """Ask run() to shut down; safe to call any number of times, from signal handlers too."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a graceful stop (a second one is not special)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def run(self) -> None:
        """Wait for a stop request or the first task to end; then cancel and await the rest.

        A task ending on its own (without a stop request) is an error unless it
        returned normally after stop was requested. The first exception is
        re-raised after every task finished; CancelledError of this coroutine
        propagates after cleanup.
        """
        stop_waiter = asyncio.create_task(self._stop.wait(), name=f"{self.name}:stop")
        try:
            pending = {stop_waiter, *self._tasks.values()}
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            first_error: BaseException | None = None
            for task in done:
                if task is stop_waiter:
                    continue
                if task.cancelled():
                    continue
                error = task.exception()
                if error is not None:
                    first_error = first_error or error
                    log.error("task %s failed: %r", task.get_name(), error, exc_info=error)
                elif not self._stop.is_set():
                    log.warning("task %s ended unexpectedly; stopping", task.get_name())
        finally:
            stop_waiter.cancel()
            await self._cancel_all()
        if first_error is not None:
            raise first_error

    async def _cancel_all(self) -> None:
        tasks = set(self._tasks.values())
        while True:
            for task in tasks:
                task.cancel()
            _, tasks = await asyncio.wait(tasks, timeout=CANCEL_AGAIN_AFTER_S)
            if not tasks:
                break
            # Library code can swallow a cancellation that races with its own
            # completion (asyncio.wait_for on 3.11, for one): cancel again, never hang.
            log.warning("tasks still running after cancel: %s", sorted(t.get_name() for t in tasks))
        results = await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for task, result in zip(self._tasks.values(), results, strict=True):
            if isinstance(result, Exception):
                log.error("task %s failed while stopping: %r", task.get_name(), result)


async def periodically(interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
    """Run action every interval_s until cancelled; an exception in action ends the loop."""
    while True:
        await action()
        await asyncio.sleep(interval_s)


async def wait_forever() -> None:
    """A task that only ends when cancelled (keeps a server-only service alive)."""
    await asyncio.Event().wait()
