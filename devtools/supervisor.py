"""`cargotrack dev` keeps what it started running: report an exit, restart, give up.

Two layers:

- **the policy** (`RestartPolicy.decide`, `describe_exit`): pure functions of the
  times a process exited; unit-tested without processes. A process that exits is
  restarted after an exponential backoff (`first_delay_s`, doubled per exit still
  inside the window, at most `max_delay_s`); once it has exited `max_failures`
  times within `window_s` seconds the run gives up on it. Exits older than the
  window are forgotten, so a service that ran fine for a while starts again with
  the shortest delay.
- **the shell** (`Supervisor`): one watcher task per supervised process (a
  `Supervised`: the services, and Kafka and PostgreSQL when the run started them),
  which waits for the exit, reports it (`Exited`: name, exit code or signal, the
  last lines of its log), sleeps the backoff, starts it again (`Restarted`, once it
  is ready again) or gives up (`GaveUp`, and `Supervisor.failed` is set: the
  launcher then stops everything and exits non-zero naming it). While Kafka or
  PostgreSQL is down, services are not restarted until it is back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from devtools.devstack.errors import DevStackError
from devtools.devstack.process import log_tail
from shared.lifecycle import Lifecycle

__all__ = [
    "Event",
    "Exited",
    "GaveUp",
    "GiveUp",
    "Restart",
    "RestartPolicy",
    "Restarted",
    "Supervised",
    "Supervisor",
    "UnitStatus",
    "describe_exit",
]

log = logging.getLogger(__name__)

#: How many log lines an exit report quotes.
LOG_LINES = 3
#: At most this much of the log's tail goes into the report.
TAIL_CHARS = 400
#: How many reports the view keeps.
RECENT_EVENTS = 3

# -- the policy (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Restart:
    """Start the process again after `delay_s` seconds; `failures` exits in the window."""

    delay_s: float
    failures: int


@dataclass(frozen=True)
class GiveUp:
    """Stop trying: `failures` exits within `window_s` seconds."""

    failures: int
    window_s: float


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a process that exited, and when to give up on it."""

    #: Give up once a process exited this many times within `window_s`.
    max_failures: int = 5
    window_s: float = 60.0
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if self.window_s <= 0 or self.first_delay_s < 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError("window_s > 0 and 0 <= first_delay_s <= max_delay_s required")

    def decide(self, exits: Sequence[float], now: float) -> Restart | GiveUp:
        """The decision after the latest of `exits` (monotonic times, oldest first).

        Only exits within the last `window_s` seconds (up to `now`) count. With n of
        them: `GiveUp` when n >= max_failures, else `Restart` after first_delay_s *
        2**(n-1) seconds, at most max_delay_s (n == 0, a call without a recent exit,
        restarts after first_delay_s).
        """
        recent = sum(1 for at in exits if now - self.window_s < at <= now)
        if recent >= self.max_failures:
            return GiveUp(recent, self.window_s)
        delay = self.first_delay_s * 2 ** max(0, recent - 1)
        return Restart(min(delay, self.max_delay_s), recent)


def describe_exit(returncode: int | None) -> str:
    """`exit code N`, `signal SIGKILL` (a negative return code), or `exited` (unknown)."""
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


# -- what the shell reports --------------------------------------------------------------


@dataclass(frozen=True)
class Exited:
    """A supervised process stopped (or could not be started again)."""

    name: str
    how: str
    log_path: Path
    last_log: str
    restart_in_s: float | None

    def line(self) -> str:
        then = (
            f"restarting in {self.restart_in_s:.1f}s"
            if self.restart_in_s is not None
            else "not restarting"
        )
        tail = f"; last log: {self.last_log}" if self.last_log else ""
        return f"{self.name} exited ({self.how}); {then}; log {self.log_path}{tail}"


@dataclass(frozen=True)
class Restarted:
    """A supervised process is ready again after its `restarts`-th restart."""

    name: str
    restarts: int
    pid: int | None

    def line(self) -> str:
        pid = f", pid {self.pid}" if self.pid is not None else ""
        return f"{self.name} restarted and ready (restart {self.restarts}{pid})"


@dataclass(frozen=True)
class GaveUp:
    """A supervised process failed too often: the run stops."""

    name: str
    failures: int
    window_s: float
    how: str
    log_path: Path

    def line(self) -> str:
        return (
            f"{self.name} failed {self.failures} times within {self.window_s:.0f}s "
            f"(last: {self.how}); giving up, see {self.log_path}"
        )


Event = Exited | Restarted | GaveUp


@dataclass
class UnitStatus:
    """What the view shows of one supervised process."""

    name: str
    state: str = "running"
    restarts: int = 0
    last_exit: str | None = None
    history: list[float] = field(default_factory=list)


class Supervised(Protocol):
    """A process the supervisor can watch and start again."""

    @property
    def name(self) -> str: ...

    @property
    def log_path(self) -> Path: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def infrastructure(self) -> bool:
        """True for Kafka and PostgreSQL: services wait for them before restarting."""
        ...

    async def wait_exit(self) -> int | None:
        """Wait until the running process exits; its return code (None: unknown)."""
        ...

    async def restart(self) -> None:
        """Start the process again and wait until it is ready; DevStackError if not.

        Leaves nothing running when it fails or is cancelled.
        """
        ...


class Supervisor(Lifecycle):
    """Watches started processes; restarts them by `policy`; sets `failed` on giving up.

    `start()` begins watching (the processes must already run), `stop()` stops
    watching and cancels a restart in progress (which kills what it started); both
    idempotent, `async with`. Stop the supervisor *before* stopping the processes,
    or their orderly exits would be taken for failures. `on_event` is called for
    every `Exited`, `Restarted` and `GaveUp`; `failure` holds the `GaveUp`.
    `failed` (the caller's event, e.g. its stop event, or a new one) is set on
    giving up, and when a watcher fails unexpectedly (a bug: `stop()` re-raises it).
    """

    def __init__(
        self,
        units: Sequence[Supervised],
        policy: RestartPolicy,
        on_event: Callable[[Event], None],
        clock: Callable[[], float] = time.monotonic,
        failed: asyncio.Event | None = None,
    ) -> None:
        self.units = list(units)
        self.policy = policy
        self.on_event = on_event
        self.failed = failed or asyncio.Event()
        self.failure: GaveUp | None = None
        self._clock = clock
        self._status = {unit.name: UnitStatus(unit.name) for unit in self.units}
        self._infrastructure_up = asyncio.Event()
        self._infrastructure_up.set()
        self._down: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        #: The latest reports, newest first, stamped with the local time (for the view).
        self.recent: collections.deque[str] = collections.deque(maxlen=RECENT_EVENTS)

    def statuses(self) -> list[UnitStatus]:
        """Every supervised process, in the order given (copies)."""
        return [
            UnitStatus(s.name, s.state, s.restarts, s.last_exit, list(s.history))
            for s in self._status.values()
        ]

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError("Supervisor.start() called twice")
        self._tasks = [
            asyncio.create_task(self._watch(unit), name=f"supervise:{unit.name}")
            for unit in self.units
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error

    def _emit(self, event: Event) -> None:
        log.info("%s", event.line())
        self.recent.appendleft(f"{time.strftime('%H:%M:%S')} {event.line()}")
        self.on_event(event)

    def _set_down(self, unit: Supervised, down: bool) -> None:
        if not unit.infrastructure:
            return
        (self._down.add if down else self._down.discard)(unit.name)
        if self._down:
            self._infrastructure_up.clear()
        else:
            self._infrastructure_up.set()

    async def _watch(self, unit: Supervised) -> None:
        try:
            await self._supervise(unit)
        except Exception:
            log.exception("supervising %s failed", unit.name)
            self.failed.set()
            raise

    async def _supervise(self, unit: Supervised) -> None:
        status = self._status[unit.name]
        while True:
            how = describe_exit(await unit.wait_exit())
            self._set_down(unit, True)
            # Restart attempts that fail count as exits too, until one succeeds.
            while True:
                now = self._clock()
                status.history.append(now)
                status.last_exit = how
                decision = self.policy.decide(status.history, now)
                if isinstance(decision, GiveUp):
                    status.state = "given up"
                    self.failure = GaveUp(
                        unit.name, decision.failures, decision.window_s, how, unit.log_path
                    )
                    self._emit(Exited(unit.name, how, unit.log_path, _tail(unit.log_path), None))
                    self._emit(self.failure)
                    self.failed.set()
                    return
                status.state = f"restarting ({how})"
                self._emit(
                    Exited(unit.name, how, unit.log_path, _tail(unit.log_path), decision.delay_s)
                )
                await asyncio.sleep(decision.delay_s)
                if not unit.infrastructure:
                    status.state = "waiting for Kafka/PostgreSQL"
                    await self._infrastructure_up.wait()
                status.state = "starting"
                try:
                    await unit.restart()
                except DevStackError as error:
                    how = f"did not start again: {error}"
                    continue
                break
            status.restarts += 1
            status.state = "running"
            self._set_down(unit, False)
            self._emit(Restarted(unit.name, status.restarts, unit.pid))


def _tail(path: Path) -> str:
    """The last LOG_LINES lines of a log, JSON lines shortened to `level: event`."""
    with contextlib.suppress(Exception):
        lines = log_tail(path, lines=LOG_LINES, max_chars=1_000_000).split(" | ")
        text = " | ".join(_readable(line) for line in lines if line)
        return text if len(text) <= TAIL_CHARS else "…" + text[-TAIL_CHARS:]
    return ""


def _readable(line: str) -> str:
    """A service's JSON log line (CARGOTRACK_LOG_FORMAT=json) as `level: event`."""
    if not line.startswith("{"):
        return line
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict) or "event" not in record:
        return line
    return f"{record.get('level', '?')}: {record['event']}"
