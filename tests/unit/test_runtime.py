"""The server shape (shared/runtime.py): Supervisor, ServiceServer, serve, Backoff; without I/O."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from shared import runtime
from shared.config import load_settings
from shared.runtime import Backoff, ServiceServer, Supervisor, serve


async def test_a_stop_request_cancels_every_task_and_run_returns() -> None:
    supervisor = Supervisor("test")
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    supervisor.spawn("a", forever("a"))
    supervisor.spawn("b", forever("b"))
    running = asyncio.create_task(supervisor.run())
    await asyncio.sleep(0)
    supervisor.request_stop()
    await asyncio.wait_for(running, 5)
    assert sorted(cancelled) == ["a", "b"]


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncio.wait_for on 3.11 can lose a cancellation that races with completion; a
    task that lost one must not keep the service from stopping."""
    monkeypatch.setattr(runtime, "CANCEL_AGAIN_AFTER_S", 0.05)
    supervisor = Supervisor("test")
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 1:
                    continue  # the lost cancellation
                raise

    supervisor.spawn("stubborn", stubborn())
    running = asyncio.create_task(supervisor.run())
    await asyncio.sleep(0)
    supervisor.request_stop()
    await asyncio.wait_for(running, 5)
    assert swallowed == 2


async def test_a_failing_task_stops_the_others_and_its_error_is_raised() -> None:
    supervisor = Supervisor("test")

    async def fail() -> None:
        raise RuntimeError("boom")

    supervisor.spawn("idle", asyncio.Event().wait())
    supervisor.spawn("fail", fail())
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(supervisor.run(), 5)


# --- Backoff ---------------------------------------------------------------------------


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    backoff = Backoff(0.2, 5.0)
    assert [backoff.next() for _ in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def test_backoff_reset_starts_again_from_the_first_delay() -> None:
    backoff = Backoff(1.0, 10.0)
    assert [backoff.next() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    backoff.reset()
    assert [backoff.next() for _ in range(2)] == [1.0, 2.0]


def test_backoff_takes_another_factor_and_never_exceeds_the_cap() -> None:
    backoff = Backoff(1.0, 7.0, factor=3.0)
    delays = [backoff.next() for _ in range(6)]
    assert delays == [1.0, 3.0, 7.0, 7.0, 7.0, 7.0]
    assert all(0 < delay <= 7.0 for delay in delays)


@pytest.mark.parametrize(("first", "most", "factor"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5)])
def test_backoff_refuses_delays_that_do_not_make_sense(
    first: float, most: float, factor: float
) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(first, most, factor)


# --- ServiceServer ---------------------------------------------------------------------


class FakeHealth:
    def __init__(self, steps: list[str]) -> None:
        self.steps = steps

    async def enter_graceful_shutdown(self) -> None:
        self.steps.append("health: graceful shutdown")


class FakeApp:
    """What ServiceServer uses of a GrpcApp, recording the order of the calls."""

    def __init__(self, steps: list[str]) -> None:
        self.steps = steps
        self.health = FakeHealth(steps)
        self.serving: list[bool] = []
        self.became_serving = asyncio.Event()

    async def start(self) -> int:
        self.steps.append("grpc: start")
        return 4242

    async def set_serving(self, serving: bool) -> None:
        self.serving.append(serving)
        if serving:
            self.became_serving.set()

    async def stop(self) -> None:
        self.steps.append("grpc: stop")


class Resource:
    def __init__(self, name: str, steps: list[str]) -> None:
        self.name = name
        self.steps = steps

    async def __aenter__(self) -> Resource:
        self.steps.append(f"{self.name}: open")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.steps.append(f"{self.name}: close")


class Example(ServiceServer):
    """A service with one resource, one task and one check: what docs/architecture.md shows."""

    def __init__(
        self,
        steps: list[str],
        *,
        task: Callable[[], Coroutine[Any, Any, None]] | None = None,
        fail_start: bool = False,
        ready: bool = True,
    ) -> None:
        super().__init__(
            load_settings(
                {"CARGOTRACK_DEV_MODE": "1", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
                database_optional=True,
            ),
            "example",
            readiness_interval_s=0.01,
        )
        self.steps = steps
        self.app_fake = FakeApp(steps)
        self._task = task
        self._fail_start = fail_start
        self._ready = ready
        self.checked = asyncio.Event()

    async def _start(self) -> None:
        await self.enter(Resource("pool", self.steps))
        await self.serve_grpc(self.app_fake)  # type: ignore[arg-type]
        self.spawn("work", self._task() if self._task else self._forever())
        self.check("dependency", self._check)
        if self._fail_start:
            raise RuntimeError("start failed")

    async def _check(self) -> None:
        self.checked.set()
        if not self._ready:
            raise ConnectionError("down")

    async def _forever(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            self.steps.append("work: stopped")

    async def _drain(self) -> None:
        self.steps.append("drain")


async def test_a_service_starts_in_order_and_drains_in_reverse() -> None:
    steps: list[str] = []
    server = Example(steps)
    async with server:
        assert server.port == 4242
        await asyncio.wait_for(server.app_fake.became_serving.wait(), 5)
        assert server.app_fake.serving[0] is False  # NOT_SERVING until the checks pass
    assert steps == [
        "pool: open",
        "grpc: start",
        "health: graceful shutdown",
        "work: stopped",
        "drain",
        "grpc: stop",
        "pool: close",
    ]
    assert server.app_fake.serving[-1] is False
    await server.wait()  # stopped: returns


async def test_a_failing_check_keeps_the_service_not_serving() -> None:
    server = Example([], ready=False)
    async with server:
        await asyncio.wait_for(server.checked.wait(), 5)
        await asyncio.sleep(0.05)
        assert True not in server.app_fake.serving


async def test_a_failing_task_is_raised_by_wait_and_nothing_is_left_running() -> None:
    steps: list[str] = []

    async def fail() -> None:
        raise RuntimeError("boom")

    server = Example(steps, task=fail)
    async with server:
        with pytest.raises(RuntimeError, match="boom"):
            await asyncio.wait_for(server.wait(), 5)
    assert steps[-2:] == ["grpc: stop", "pool: close"]
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in others if t.get_name().startswith("example:")]


async def test_a_failed_start_stops_what_started_and_starts_no_task() -> None:
    steps: list[str] = []
    server = Example(steps, fail_start=True)
    with pytest.raises(RuntimeError, match="start failed"):
        async with server:
            pass
    assert steps == ["pool: open", "grpc: start", "grpc: stop", "pool: close"]
    await server.stop()  # idempotent
    assert steps[-1] == "pool: close"


async def test_serve_drains_and_returns_on_a_stop_request() -> None:
    """What SIGTERM does: serve() returns (exit status 0) after the drain."""
    steps: list[str] = []
    server = Example(steps)
    serving = asyncio.create_task(serve(server))
    await asyncio.wait_for(server.app_fake.became_serving.wait(), 5)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(serving, 5)
    assert steps[-3:] == ["drain", "grpc: stop", "pool: close"]


async def test_serve_reraises_a_task_failure_after_the_drain() -> None:
    steps: list[str] = []

    async def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(serve(Example(steps, task=fail)), 5)
    assert steps[-2:] == ["grpc: stop", "pool: close"]
