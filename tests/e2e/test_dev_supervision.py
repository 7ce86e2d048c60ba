"""`cargotrack dev` notices what a newcomer breaks, and operator commands find its stack.

One headless run (its own state directory and ports, tests/dev_helpers.py) serves
both checks:

- the projector is killed with SIGKILL: the run reports it at once (name, signal,
  its log), restarts it, the restarted projector consumes everything written up to
  its restart (lag back to 0 for what was there; the simulator keeps writing, so on
  a busy machine the headless `lag` may never sample exactly 0) and alerts keep
  arriving;
- `cargotrack rebuild` and `cargotrack env`, started in a directory whose
  `.cargotrack` is the run's state directory with no Kafka, PostgreSQL or
  cargotrack variable in their environment, find the running stack by themselves;
- killed once more, the projector has failed `--give-up-after 2` times within the
  window: the run stops cleanly (exit 2, one line naming it, no process left, the
  stack file removed).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devtools.view import PROJECTION
from services.registry import available_services
from shared.config import Settings, load_settings
from shared.db import connect
from shared.projection import load_offsets
from shared.running_stack import RUNNING_STACK_FILE, read_running_stack
from tests.dev_helpers import (
    CARGOTRACK,
    SUMMARY,
    DevRun,
    alive,
    as_int,
    dev_env,
    process_tree,
    summary_fields,
)
from tests.projection_helpers import end_offsets

READY_S = 150.0


@pytest.fixture
async def run(tmp_path: Path, state_dir: Path) -> AsyncIterator[DevRun]:
    dev = DevRun(
        dev_env(state_dir),
        tmp_path,
        *("--status-every", "2", "--give-up-after", "2", "--give-up-window", "900"),
    )
    await dev.start()
    try:
        yield dev
    finally:
        await dev.kill()


def service_pid(root: int, name: str) -> int:
    """The pid of `cargotrack serve NAME` under the process `root`."""
    for pid in process_tree(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and name.encode() in argv:
            return pid
    raise AssertionError(f"no {name} process under {root}")


async def wait_caught_up(settings: Settings, timeout_s: float) -> int:
    """Wait until the projection stored offsets up to Kafka's end offsets as they are
    now (everything written so far is applied); returns how far behind it was."""
    topics = settings.topics
    wanted = [topics.shipment_events, topics.delivery_confirmations, topics.gps_points]
    target = await end_offsets(settings, wanted)
    assert target, "no partitions"
    first: int | None = None
    async with asyncio.timeout(timeout_s):
        while True:
            connection = await connect(settings.database)
            try:
                stored = await load_offsets(connection, PROJECTION, list(target))
            finally:
                await connection.close()
            behind = sum(max(0, end - (stored.get(tp, -1) + 1)) for tp, end in target.items())
            first = behind if first is None else first
            if behind == 0:
                return first
            await asyncio.sleep(0.5)


async def operator_command(cwd: Path, *args: str) -> tuple[int, str, str]:
    """`cargotrack ARGS` from `cwd`, with nothing pointing it at any stack."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CARGOTRACK_", "KAFKA_", "DATABASE_"))
    }
    process = await asyncio.create_subprocess_exec(
        str(CARGOTRACK),
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.mark.timeout(420)
async def test_a_killed_projector_is_reported_and_restarted_and_rebuild_finds_the_stack(
    run: DevRun, tmp_path: Path, state_dir: Path
) -> None:
    await run.wait_for(lambda line: line.startswith("ready;"), READY_S)
    stack_file = state_dir / RUNNING_STACK_FILE
    assert stack_file.is_file()
    assert stack_file.stat().st_mode & 0o077 == 0
    await run.wait_for(lambda line: "] alert " in line, 90)

    # -- the projector dies -----------------------------------------------------------
    killed = service_pid(run.pid, "projector")
    os.kill(killed, signal.SIGKILL)
    killed_at = len(run.lines)
    report = await run.wait_for(lambda line: "projector exited (" in line, 30, start=killed_at)
    at = run.position(report)
    assert "projector exited (signal SIGKILL); restarting in 0.5s" in report, report
    assert "projector.log; last log: " in report, report
    restarted = await run.wait_for(
        lambda line: "projector restarted and ready" in line, 90, start=at
    )
    assert "(restart 1, pid " in restarted, restarted
    assert service_pid(run.pid, "projector") != killed
    after = run.position(restarted)

    stack = read_running_stack(state_dir)
    assert stack is not None
    settings = load_settings(stack.env)
    behind_at_restart = await wait_caught_up(settings, 120)
    line = await run.wait_for(
        lambda line: bool(SUMMARY.match(line)), 30, start=run.position(restarted)
    )
    fields = summary_fields(line)
    assert fields["restarts"] == "projector:1", line
    # Every service of the registry, plus Kafka and PostgreSQL.
    supervised = len(available_services()) + 2
    assert fields["running"] == f"{supervised}/{supervised}", line
    assert "down" not in fields, line
    alert = await run.wait_for(lambda line: "] alert " in line, 120, start=after)
    # While it was down the summary named it.
    down = [summary_fields(x) for x in run.lines[at:after] if SUMMARY.match(x)]
    assert all(f.get("down") == "projector" for f in down), down
    print(f"report: {report}\nrestart: {restarted}\nresumed: {alert}")
    print(f"behind at the restart: {behind_at_restart} records; then: {line}")

    # -- operator commands beside the run, nothing exported ---------------------------
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".cargotrack").symlink_to(state_dir)
    code, out, err = await operator_command(checkout, "rebuild")
    assert code == 0, f"{out}\n{err}"
    assert out.splitlines()[-1].startswith("rebuilt cargotrack from "), out
    assert f"cargotrack dev running in {state_dir}" in err, err
    kafka_port = run.env["CARGOTRACK_KAFKA_PORT"]
    assert f"Kafka 127.0.0.1:{kafka_port}" in err, err

    code, out, err = await operator_command(checkout, "env")
    assert code == 0, err
    assert f"export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}" in out.splitlines(), out
    assert "export CARGOTRACK_JWT_SECRET=" in out, out

    # The projector goes on after the rebuild switched the tables under it.
    await wait_caught_up(settings, 120)

    # -- a second failure within the window: the run gives up and names it ------------
    assert as_int(run.summaries()[-1], "shipments") >= 1
    tree = process_tree(run.pid)
    os.kill(service_pid(run.pid, "projector"), signal.SIGKILL)
    start = len(run.lines)
    line = await run.wait_for(lambda line: "projector exited (" in line, 30, start=start)
    assert "(signal SIGKILL); not restarting" in line, line
    await run.wait_for(lambda line: "projector failed 2 times within 900s" in line, 5, start=start)
    assert await run.wait(90) == 2, run.output()
    assert run.lines[-1] == "stopped", run.output()
    message = run.stderr_path.read_text().strip().splitlines()[-1]
    assert message.startswith("cargotrack: stopped because projector failed 2 times"), message
    assert "projector.log" in message
    survivors = {pid for pid in tree if alive(pid)}
    assert not survivors, f"left running: {survivors}"
    assert not stack_file.exists()
    code, _, err = await operator_command(checkout, "env")
    assert code == 2
    assert "no cargotrack dev is running" in err, err
