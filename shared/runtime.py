"""Running a service process: one server shape, one supervisor, signals, back-off.

Every cargotrack service is a `ServiceServer`: resources (pools, producers, Kafka
links) opened in order, one gRPC server (with health), supervised tasks (consumer
loops, relays, the readiness monitor) and readiness checks. `serve()` runs one
until SIGTERM/SIGINT and drains it in order; `cargotrack serve` reaches it through
`run_service`, which handles those signals from the moment the process starts.
docs/architecture.md ("One server shape") shows a minimal service.

`Supervisor` starts named tasks, waits until one fails or a stop is requested,
cancels the rest, waits for them, and re-raises the first error. `Backoff` is the
one retry delay policy (first delay, doubling up to a cap, no jitter).

A stop signal is noted from the first moment of `cargotrack serve`
(`shared.early_signals`, installed by the console script before any other import) and
acted on once `serve()` runs. grpc, Kafka and PostgreSQL are imported only where they
are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from shared.early_signals import STOP_SIGNALS, note_stop_signals, noted_signal
from shared.lifecycle import Lifecycle

if TYPE_CHECKING:
    from shared.config import Settings
    from shared.readiness import Check
    from shared.rpc import GrpcApp

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a cancelled task may take to finish before it is cancelled again.
CANCEL_AGAIN_AFTER_S = 5.0
#: How often the readiness checks run.
READINESS_INTERVAL_S = 2.0


@dataclass
class Backoff:
    """Delays between retries: `first_s`, then multiplied by `factor` per retry up to
    `max_s`; `reset()` after a success starts again from `first_s`. No jitter: each
    retrying process is alone in what it retries (one connection, one reader).

    `next()` returns the delay to wait now and advances; `sleep()` waits it.
    """

    first_s: float
    max_s: float
    factor: float = 2.0
    _next: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(
                f"Backoff needs 0 < first_s <= max_s, got {self.first_s}, {self.max_s}"
            )
        if self.factor < 1:
            raise ValueError(f"Backoff factor must be at least 1, got {self.factor}")
        self._next = self.first_s

    def next(self) -> float:
        """The delay before the next attempt; the one after it is longer (up to max_s)."""
        delay = self._next
        self._next = min(self._next * self.factor, self.max_s)
        return delay

    def reset(self) -> None:
        """After a success: the next delay is first_s again."""
        self._next = self.first_s

    async def sleep(self) -> None:
        """Wait the next delay."""
        await asyncio.sleep(self.next())


class Supervisor:
    """Runs named tasks until the first failure or a stop request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._stop = asyncio.Event()
        self._replaced: dict[signal.Signals, Any] = {}

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def spawn(self, name: str, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Start a task now; it is supervised from here on."""
        if name in self._tasks:
            coroutine.close()
            raise ValueError(f"task {name!r} already exists")
        self._tasks[name] = asyncio.create_task(coroutine, name=f"{self.name}:{name}")

    def request_stop(self) -> None:
        """Ask run() to shut down; safe to call any number of times, from signal handlers too."""
        self._stop.set()

    async def wait_stop_requested(self) -> None:
        await self._stop.wait()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a graceful stop (a second one is not special).

        A signal noted before (`shared.early_signals`: while the process was
        starting) counts as a stop request too."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            self._replaced[sig] = signal.getsignal(sig)
            loop.add_signal_handler(sig, self.request_stop)
        early = noted_signal()
        if early is not None:
            log.info("stop requested (%s) while starting", signal.Signals(early).name)
            self.request_stop()

    def remove_signal_handlers(self) -> None:
        """Give SIGTERM and SIGINT back to the handlers they had before."""
        loop = asyncio.get_running_loop()
        for sig, handler in self._replaced.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)
        self._replaced.clear()

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
        while tasks:
            for task in tasks:
                task.cancel()
            _, tasks = await asyncio.wait(tasks, timeout=CANCEL_AGAIN_AFTER_S)
            if tasks:
                # Library code can swallow a cancellation that races with its own
                # completion (asyncio.wait_for on 3.11, for one): cancel again, never hang.
                log.warning(
                    "tasks still running after cancel: %s", sorted(t.get_name() for t in tasks)
                )
        results = await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for task, result in zip(self._tasks.values(), results, strict=True):
            if isinstance(result, Exception):
                log.error("task %s failed while stopping: %r", task.get_name(), result)


class ServiceServer(Lifecycle):
    """One service, running: resources, one gRPC server, supervised tasks, readiness.

    A service subclasses it and implements `_start()`, which
    - opens resources in order with `await self.enter(context_manager)` (or registers
      a teardown with `self.on_stop(coroutine_function)`); they are closed in reverse
      order after the gRPC server stopped;
    - starts its gRPC server with `await self.serve_grpc(app)` (a `GrpcApp`: with no
      services, health only); it serves with health NOT_SERVING until the checks pass;
    - names its long-running tasks with `self.spawn(name, coroutine)` and its
      readiness checks with `self.check(name, check)` (a `shared.readiness.Check`).

    `start()` enters the service's telemetry (metrics, tracing) first, runs
    `_start()`, then starts the tasks and the readiness monitor under one
    `Supervisor`, and returns the gRPC port. A failure half way stops whatever
    started (start twice is an error).

    `stop()` drains in this order: health NOT_SERVING (kept so), every task cancelled
    and awaited (none is left running), `_drain()` (a service's hook: end open
    streams), the gRPC server's grace period for in-flight calls, then the resources
    in reverse order, telemetry last. Idempotent and safe after a failed start;
    `async with` does start and stop.

    `wait()` returns after a stop and raises the first task failure: nothing a task
    raises is swallowed (the supervisor logs it too, and `serve()` re-raises it).
    """

    def __init__(
        self,
        settings: Settings,
        label: str,
        *,
        readiness_interval_s: float = READINESS_INTERVAL_S,
    ) -> None:
        self.settings = settings
        self.label = label
        self.readiness_interval_s = readiness_interval_s
        self.port: int | None = None
        self.app: GrpcApp | None = None
        self._stack = contextlib.AsyncExitStack()
        self._supervisor = Supervisor(label)
        self._pending: list[tuple[str, Coroutine[Any, Any, Any]]] = []
        self._checks: dict[str, Check] = {}
        self._readiness_pause: Callable[[float], Awaitable[object]] = asyncio.sleep
        self._supervised: asyncio.Task[None] | None = None
        self._started = False

    # --- what _start() uses ---------------------------------------------------------

    async def enter(self, resource: contextlib.AbstractAsyncContextManager[T]) -> T:
        """Enter an async context manager now; it is exited when the service stops."""
        return await self._stack.enter_async_context(resource)

    def on_stop(self, teardown: Callable[[], Awaitable[object]]) -> None:
        """Await `teardown()` when the service stops (after the gRPC server stopped,
        in reverse order of registration)."""
        self._stack.push_async_callback(teardown)

    async def serve_grpc(self, app: GrpcApp) -> int:
        """Start the service's gRPC server, health NOT_SERVING until the checks pass."""
        if self.app is not None:
            raise RuntimeError(f"{self.label} already serves gRPC")
        self.on_stop(app.stop)
        self.port = await app.start()
        self.app = app
        await app.set_serving(False)
        return self.port

    def spawn(self, name: str, coroutine: Coroutine[Any, Any, Any]) -> None:
        """A long-running task, started once `_start()` returned; its end (other than
        by stop) stops the service, its error is what `wait()` raises."""
        if self._supervised is not None:
            coroutine.close()
            raise RuntimeError("spawn() tasks in _start()")
        self._pending.append((name, coroutine))

    def check(
        self,
        name: str,
        check: Check,
        *,
        pause: Callable[[float], Awaitable[object]] | None = None,
    ) -> None:
        """A readiness check: health is SERVING only while every check passes.
        `pause(interval_s)` replaces the sleep between rounds (to re-check sooner)."""
        self._checks[name] = check
        if pause is not None:
            self._readiness_pause = pause

    # --- the lifecycle ----------------------------------------------------------------

    async def _start(self) -> None:
        raise NotImplementedError

    async def _drain(self) -> None:
        """A service's own step of the drain, after its tasks stopped and before the
        gRPC server's grace period (end open streams so clients move at once)."""

    async def start(self) -> int:
        """Start everything; return the gRPC port."""
        if self._started:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._started = True
        from shared import metrics, readiness

        try:
            # Entered first, left last: metrics and traces cover the whole shutdown.
            await self.enter(metrics.service_telemetry(self.settings, self.label))
            await self._start()
            app = self.app
            if app is None:
                raise RuntimeError(f"{type(self).__name__}._start() must call serve_grpc()")
            # Exit callbacks run in reverse: health first, then tasks, then _drain.
            self.on_stop(self._drain)
            self.on_stop(self._stop_tasks)
            self.on_stop(self._health_draining)
            pending, self._pending = self._pending, []
            for name, coroutine in pending:
                self._supervisor.spawn(name, coroutine)
            if self._checks:
                self._supervisor.spawn(
                    "readiness",
                    readiness.monitor(
                        self._checks,
                        app.set_serving,
                        self.readiness_interval_s,
                        pause=self._readiness_pause,
                    ),
                )
            self._supervised = asyncio.create_task(
                self._supervisor.run(), name=f"{self.label}:supervisor"
            )
        except BaseException:
            for _name, coroutine in self._pending:
                coroutine.close()
            self._pending = []
            # Tasks spawned before the failure (if any) are cancelled and awaited.
            self._supervisor.request_stop()
            with contextlib.suppress(Exception):
                await self._supervisor.run()
            await self._stack.aclose()
            raise
        assert self.port is not None
        log.info(
            "%s listening on %s:%d",
            self.label,
            self.settings.grpc.host,
            self.port,
            extra={"service": self.label, "port": self.port},
        )
        return self.port

    async def wait(self) -> None:
        """Until `stop()` (returns) or a task fails (raises its error). Cancelling the
        wait stops nothing: `stop()` does, in order."""
        if self._supervised is None:
            raise RuntimeError("start() first")
        await asyncio.shield(self._supervised)

    async def stop(self) -> None:
        await self._stack.aclose()

    async def _health_draining(self) -> None:
        assert self.app is not None
        await self.app.set_serving(False)
        # From here on the readiness monitor cannot set SERVING again.
        await self.app.health.enter_graceful_shutdown()

    async def _stop_tasks(self) -> None:
        supervised = self._supervised
        if supervised is None:
            return
        self._supervisor.request_stop()
        # A failure was logged by the supervisor and is what wait() raises.
        with contextlib.suppress(Exception):
            await asyncio.shield(supervised)


async def serve(server: ServiceServer) -> None:
    """Run a service until SIGTERM/SIGINT, then drain it in order and return (exit
    status 0); a task failure is re-raised after the drain.

    The signals are handled before anything starts: one arriving during the start
    cancels the start (what had started stops) and returns. Prints
    "<label> listening on host:port" to stdout once serving, so a launcher that
    asked for port 0 can find the port.
    """
    supervisor = Supervisor(server.label)
    supervisor.install_signal_handlers()
    try:
        await _serve(server, supervisor)
    finally:
        supervisor.remove_signal_handlers()


async def _serve(server: ServiceServer, supervisor: Supervisor) -> None:
    if supervisor.stop_requested:
        return
    starting = asyncio.create_task(server.start(), name=f"{server.label}:start")
    stop_requested = asyncio.create_task(supervisor.wait_stop_requested())
    try:
        await asyncio.wait({starting, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_requested.cancel()
        if not starting.done():
            # A stop request (or our own cancellation) while starting: start() stops
            # what it had started.
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    if starting.cancelled():
        log.info("%s: stopped while starting", server.label)
        return
    try:
        port = starting.result()
        print(f"{server.label} listening on {server.settings.grpc.host}:{port}", flush=True)
        supervisor.spawn("serve", server.wait())
        await supervisor.run()
    finally:
        await server.stop()


def run_service(module_name: str, settings: Settings) -> None:
    """What `cargotrack serve NAME` does: `asyncio.run(module.run(settings))`, with
    SIGTERM/SIGINT noted (`note_stop_signals`) before the service's module is
    imported and after its event loop closed, so one arriving at any moment ends in a
    drain and exit status 0, never in the default death by signal."""
    note_stop_signals()
    module = importlib.import_module(module_name)
    run: Callable[[Settings], Coroutine[Any, Any, None]] = module.run
    try:
        asyncio.run(run(settings))
    finally:
        # Closing the loop restored the default handlers: keep noting until exit.
        note_stop_signals()
    sys.stdout.flush()


async def periodically(interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
    """Run action every interval_s until cancelled; an exception in action ends the loop."""
    while True:
        await action()
        await asyncio.sleep(interval_s)
