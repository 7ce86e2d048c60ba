"""Starting and stopping the devstack's servers together (devtools/devstack/process.py):
a failed start cancels the others and undoes, a failed stop lets the others finish."""

from __future__ import annotations

import asyncio

import pytest

from devtools.devstack.process import start_all, stop_all


async def test_start_all_returns_once_every_start_succeeded() -> None:
    started: list[str] = []
    undone: list[bool] = []

    async def start(name: str) -> None:
        await asyncio.sleep(0)
        started.append(name)

    async def undo() -> None:
        undone.append(True)

    await start_all({"kafka": start("kafka"), "postgres": start("postgres")}, undo=undo)
    assert sorted(started) == ["kafka", "postgres"]
    assert not undone


async def test_a_failed_start_cancels_the_others_then_undoes_and_raises_it() -> None:
    events: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            events.append("slow cancelled")
            raise

    async def failing() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("port taken")

    async def undo() -> None:
        events.append("undone")

    with pytest.raises(RuntimeError, match="port taken"):
        await start_all({"slow": slow(), "failing": failing()}, undo=undo)
    # The other start had ended (cancelled) before the undo ran.
    assert events == ["slow cancelled", "undone"]


async def test_stop_all_finishes_every_stop_then_raises_the_first_failure() -> None:
    stopped: list[str] = []

    async def stop(name: str, problem: str | None = None) -> None:
        await asyncio.sleep(0)
        stopped.append(name)
        if problem is not None:
            raise RuntimeError(problem)

    with pytest.raises(RuntimeError, match="first"):
        await stop_all([stop("a", "first"), stop("b"), stop("c", "second")])
    assert sorted(stopped) == ["a", "b", "c"]
    await stop_all([stop("d")])
    assert stopped[-1] == "d"
