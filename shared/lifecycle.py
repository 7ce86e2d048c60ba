"""`async with` for the project's long-lived components.

A component with `start()` and `stop()` (servers, the local stack, the dev view,
the simulator's uplinks) gets `async with component:` from `Lifecycle`: start on
entry, stop on exit, and stop when `start()` fails half way, so nothing it
launched before the failure is left running. `stop()` must therefore be safe
after a partial start, and idempotent. Services build on it through
`shared.runtime.ServiceServer`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Lifecycle:
    """Base for components started and stopped explicitly (see the module docstring)."""

    async def start(self) -> object:
        """Start everything the component runs; returns once it is ready (servers
        return their port)."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop and release everything started; idempotent, safe after a partial start."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
