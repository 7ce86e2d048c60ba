"""A loop that runs beside a fault scenario as an asyncio task: the keeper that
restarts crashed processes, the probes and meters that sample what users feel."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self


class Background:
    """A subclass's `_run` as an asyncio task: `start()` begins it, `stop()` cancels it
    and returns once it has ended (re-raising what it failed with, if it failed);
    `async with` starts it on entry and stops it on exit. Stopping what was never
    started does nothing."""

    #: The task's name, as asyncio shows it.
    task_name = "background"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        """The loop; runs until cancelled."""
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()
