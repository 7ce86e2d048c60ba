"""The Supervisor's lifecycle (shared/runtime.py), without I/O."""

from __future__ import annotations

import asyncio

import pytest

from shared import runtime
from shared.runtime import Supervisor


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
