"""`cargotrack dev`'s supervision: the restart policy (pure) and the supervisor's
loop driven by fake processes (no process is started)."""

from __future__ import annotations

import asyncio
import io
import signal
from pathlib import Path

import pytest
from rich.console import Console

from devtools.devstack import DevStackError
from devtools.supervisor import (
    Event,
    Exited,
    GaveUp,
    GiveUp,
    Restart,
    Restarted,
    RestartPolicy,
    Supervisor,
    UnitStatus,
    describe_exit,
)
from devtools.view import STATUSES, Snapshot, render, summary_line
from tests.dev_helpers import summary_fields

POLICY = RestartPolicy(max_failures=5, window_s=60.0, first_delay_s=0.5, max_delay_s=4.0)


# -- the policy ----------------------------------------------------------------------


def test_the_first_exit_restarts_after_the_shortest_delay() -> None:
    assert POLICY.decide([100.0], now=100.0) == Restart(0.5, 1)


def test_the_delay_doubles_per_exit_in_the_window_up_to_the_cap() -> None:
    decisions = [POLICY.decide([100.0 + i for i in range(n)], now=100.0 + n) for n in (1, 2, 3, 4)]
    assert decisions == [Restart(0.5, 1), Restart(1.0, 2), Restart(2.0, 3), Restart(4.0, 4)]
    capped = RestartPolicy(max_failures=10, first_delay_s=0.5, max_delay_s=3.0)
    assert capped.decide([1, 2, 3, 4, 5, 6], now=6) == Restart(3.0, 6)


def test_five_exits_within_the_window_give_up() -> None:
    exits = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert POLICY.decide(exits, now=50.0) == GiveUp(5, 60.0)


def test_exits_older_than_the_window_are_forgotten() -> None:
    # Four old exits, then one more 61 s after the first: only the last ones count.
    exits = [0.0, 1.0, 2.0, 3.0, 70.0]
    assert POLICY.decide(exits, now=70.0) == Restart(0.5, 1)
    # A service that ran fine for longer than the window starts again with the
    # shortest delay, however often it failed before.
    assert POLICY.decide([*range(4), 200.0], now=200.0) == Restart(0.5, 1)


def test_the_limits_are_configurable() -> None:
    once = RestartPolicy(max_failures=1)
    assert once.decide([5.0], now=5.0) == GiveUp(1, 60.0)
    short = RestartPolicy(max_failures=2, window_s=5.0)
    assert short.decide([0.0, 6.0], now=6.0) == Restart(0.5, 1)
    assert short.decide([3.0, 6.0], now=6.0) == GiveUp(2, 5.0)
    with pytest.raises(ValueError, match="max_failures"):
        RestartPolicy(max_failures=0)
    with pytest.raises(ValueError, match="window_s"):
        RestartPolicy(window_s=0)


def test_exits_are_described_by_code_or_signal_name() -> None:
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV"
    assert describe_exit(None) == "exited"


# -- the supervisor's loop, with fake processes ---------------------------------------


class FakeUnit:
    """A process the test makes exit (`exit(code)`) and whose restarts it can fail."""

    def __init__(self, name: str, log_path: Path, *, infrastructure: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self.infrastructure = infrastructure
        self.pid: int | None = 1000
        self.restarts = 0
        self.fail_restarts = 0
        self.restart_gate: asyncio.Event | None = None
        self._exit: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def exit(self, code: int | None) -> None:
        self._exit.set_result(code)

    async def wait_exit(self) -> int | None:
        return await self._exit

    async def restart(self) -> None:
        if self.restart_gate is not None:
            await self.restart_gate.wait()
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise DevStackError(f"{self.name} exited with status 1 during start")
        self.restarts += 1
        self.pid = 1000 + self.restarts
        self._exit = asyncio.get_running_loop().create_future()


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.changed.set()

    async def until(self, count: int) -> list[Event]:
        async with asyncio.timeout(5):
            while len(self.events) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.events


FAST = RestartPolicy(max_failures=3, window_s=60.0, first_delay_s=0.0, max_delay_s=0.0)


@pytest.mark.timeout(10)
async def test_an_exit_is_reported_with_its_log_and_the_process_restarted(tmp_path: Path) -> None:
    log = tmp_path / "projector.log"
    log.write_text(
        "starting\nbatch applied\n"
        '{"event": "last words", "level": "error", "timestamp": "2026-12-02T23:53:13Z"}\n'
    )
    unit = FakeUnit("projector", log)
    other = FakeUnit("dispatch", tmp_path / "dispatch.log")
    seen = Recorder()
    async with Supervisor([unit, other], FAST, seen) as supervisor:
        unit.exit(-signal.SIGKILL)
        events = await seen.until(2)
        exited, restarted = events
        assert isinstance(exited, Exited)
        assert exited.name == "projector"
        assert exited.how == "signal SIGKILL"
        assert exited.restart_in_s == 0.0
        assert exited.last_log == "starting | batch applied | error: last words"
        assert "projector exited (signal SIGKILL)" in exited.line()
        assert restarted == Restarted("projector", 1, 1001)
        statuses = {s.name: s for s in supervisor.statuses()}
        assert statuses["projector"].restarts == 1
        assert statuses["projector"].state == "running"
        assert statuses["projector"].last_exit == "signal SIGKILL"
        assert statuses["dispatch"].restarts == 0
        assert supervisor.recent[0].endswith(restarted.line())
        assert not supervisor.failed.is_set()
        # The restarted process is watched again.
        unit.exit(3)
        events = await seen.until(4)
        assert isinstance(events[2], Exited)
        assert events[2].how == "exit code 3"
        assert events[3] == Restarted("projector", 2, 1002)


@pytest.mark.timeout(10)
async def test_a_process_failing_too_often_is_given_up_and_named(tmp_path: Path) -> None:
    unit = FakeUnit("projector", tmp_path / "projector.log")
    unit.fail_restarts = 10  # every restart fails: exits 2 and 3 are failed starts
    seen = Recorder()
    async with Supervisor([unit], FAST, seen) as supervisor:
        unit.exit(1)
        async with asyncio.timeout(5):
            await supervisor.failed.wait()
    failure = supervisor.failure
    assert isinstance(failure, GaveUp)
    assert failure.name == "projector"
    assert failure.failures == 3
    assert "did not start again" in failure.how
    assert "projector failed 3 times within 60s" in failure.line()
    assert isinstance(seen.events[-1], GaveUp)
    assert [type(e) for e in seen.events] == [Exited, Exited, Exited, GaveUp]
    assert seen.events[-2].restart_in_s is None  # type: ignore[union-attr]
    assert supervisor.statuses()[0].state == "given up"
    assert unit.restarts == 0


@pytest.mark.timeout(10)
async def test_services_wait_for_kafka_before_restarting(tmp_path: Path) -> None:
    kafka = FakeUnit("kafka", tmp_path / "broker.log", infrastructure=True)
    kafka.restart_gate = asyncio.Event()
    service = FakeUnit("projector", tmp_path / "projector.log")
    seen = Recorder()
    async with Supervisor([kafka, service], FAST, seen) as supervisor:
        kafka.exit(-signal.SIGKILL)
        await seen.until(1)
        service.exit(1)
        await seen.until(2)
        for _ in range(20):  # the service's restart is held while Kafka is down
            await asyncio.sleep(0)
        assert service.restarts == 0
        states = {s.name: s.state for s in supervisor.statuses()}
        assert states["projector"] == "waiting for Kafka/PostgreSQL"
        kafka.restart_gate.set()
        await seen.until(4)
        assert {e.name for e in seen.events if isinstance(e, Restarted)} == {
            "kafka",
            "projector",
        }
        assert service.restarts == 1


@pytest.mark.timeout(10)
async def test_stopping_cancels_a_restart_in_progress(tmp_path: Path) -> None:
    unit = FakeUnit("projector", tmp_path / "projector.log")
    unit.restart_gate = asyncio.Event()  # never set: the restart hangs
    seen = Recorder()
    supervisor = Supervisor([unit], FAST, seen)
    await supervisor.start()
    unit.exit(1)
    await seen.until(1)
    await supervisor.stop()
    await supervisor.stop()  # idempotent
    assert unit.restarts == 0
    assert not supervisor.failed.is_set()


@pytest.mark.timeout(10)
async def test_a_bug_in_a_watcher_sets_the_callers_event_and_is_raised_on_stop(
    tmp_path: Path,
) -> None:
    class Broken(FakeUnit):
        async def restart(self) -> None:
            raise RuntimeError("bug")

    unit = Broken("projector", tmp_path / "projector.log")
    stop = asyncio.Event()
    supervisor = Supervisor([unit], FAST, Recorder(), failed=stop)
    await supervisor.start()
    unit.exit(1)
    async with asyncio.timeout(5):
        await stop.wait()
    assert supervisor.failure is None
    with pytest.raises(RuntimeError, match="bug"):
        await supervisor.stop()


# -- what the view and the headless line show of it -------------------------------------


def _snapshot(processes: list[UnitStatus], events: list[str]) -> Snapshot:
    return Snapshot(
        elapsed_s=61,
        tenant="demo",
        statuses=dict.fromkeys(STATUSES, 0),
        etas=[],
        dispatch="subscribed",
        alerts_total=0,
        alerts_by_kind={},
        latest_alerts=[],
        points_per_s=1.0,
        records_per_s=1.0,
        lag=3,
        simulator=None,
        processes=processes,
        process_events=events,
    )


def test_the_summary_line_counts_running_processes_and_restarts() -> None:
    healthy = _snapshot([UnitStatus("kafka"), UnitStatus("projector", restarts=2)], [])
    fields = summary_fields(summary_line(healthy))
    assert fields["running"] == "2/2"
    assert fields["restarts"] == "projector:2"
    assert "down" not in fields
    down = _snapshot(
        [UnitStatus("kafka", state="starting"), UnitStatus("projector", state="restarting")], []
    )
    fields = summary_fields(summary_line(down))
    assert fields["running"] == "0/2"
    assert fields["restarts"] == "0"
    assert fields["down"] == "kafka,projector"
    assert "running" not in summary_fields(summary_line(_snapshot([], [])))


def test_the_view_names_processes_their_restarts_and_the_latest_exit() -> None:
    snapshot = _snapshot(
        [
            UnitStatus("gps-ingest"),
            UnitStatus("projector", state="restarting (signal SIGKILL)", restarts=1),
        ],
        ["12:00:01 projector exited (signal SIGKILL); restarting in 0.5s"],
    )
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(render(snapshot, 120))
    text = " ".join(out.getvalue().split())
    assert "processes: gps-ingest · projector restarting (signal SIGKILL) (1 restart)" in text
    assert "12:00:01 projector exited (signal SIGKILL)" in text
