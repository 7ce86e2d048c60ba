"""`cargotrack dev` from the command line, headless, as a newcomer runs it.

Each run gets its own state directory and its own ports (tests/dev_helpers.py), so it
never meets a developer's `make up` or another test run. The run must reach a state
where shipments move and dispatch's subscriber received a delay alert within a
minute of being ready, stop cleanly on SIGINT (exit 0, no process of its tree left),
refuse to start a second copy (exit 2, one line naming the taken port), and reuse
its state on the next run.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from devtools.devstack import DevStackError
from devtools.launcher import (
    DEV_PORT_BASE_ENV,
    LOCK_FILE,
    check_ports,
    dev_service_ports,
    locked_state_dir,
    reset_state,
)
from tests.dev_helpers import (
    SUMMARY,
    DevRun,
    alive,
    as_int,
    dev_env,
    process_tree,
    summary_fields,
)

READY_S = 150.0  # Kafka and PostgreSQL from a warm cache; generous for busy machines
FIRST_ALERT_S = 60.0


def moving(fields: dict[str, str]) -> int:
    """Shipments past pick-up: on the road or delivered."""
    return sum(
        max(0, as_int(fields, name))
        for name in ("in_transit", "out_for_delivery", "delivered", "delivery_failed")
    )


@pytest.fixture
async def runs(tmp_path: Path) -> AsyncIterator[list[DevRun]]:
    """Runs started by a test; any still running at the end is killed with its tree."""
    started: list[DevRun] = []
    try:
        yield started
    finally:
        for run in started:
            await run.kill()


async def start(runs: list[DevRun], env: dict[str, str], tmp_path: Path, *args: str) -> DevRun:
    run = DevRun(env, tmp_path, *args)
    runs.append(run)
    await run.start()
    return run


@pytest.mark.timeout(240)
async def test_shipments_move_alerts_reach_dispatch_and_ctrl_c_stops_everything(
    tmp_path: Path, state_dir: Path, runs: list[DevRun]
) -> None:
    env = dev_env(state_dir)
    launched_at = time.monotonic()
    first = await start(runs, env, tmp_path, "--status-every", "2")
    await first.wait_for(lambda line: line.startswith("ready;"), READY_S)
    ready_at = time.monotonic()

    def alerted(line: str) -> bool:
        if not SUMMARY.match(line):
            return False
        fields = summary_fields(line)
        return as_int(fields, "LATE") >= 1 and moving(fields) >= 1

    line = await first.wait_for(alerted, FIRST_ALERT_S)
    took = time.monotonic() - ready_at
    fields = summary_fields(line)
    assert fields["dispatch"] == "subscribed"
    assert as_int(fields, "shipments") >= 2
    assert as_int(fields, "lag") >= 0
    assert float(fields["points/s"]) > 0
    assert float(fields["gps_records/s"]) > 0
    assert any(" alert LATE critical " in seen for seen in first.lines), first.output()

    # It printed the dispatch board and the tracking page of a simulated shipment, and
    # both answer (the page's data from the public route).
    (board,) = [seen.split()[-1] for seen in first.lines if seen.startswith("dispatch board ")]
    page = (await first.wait_for(lambda seen: seen.startswith("tracking page  http"), 30)).split()[
        -1
    ]
    async with aiohttp.ClientSession() as http:
        for url in (board, page, page.replace("/t/", "/v1/track/")):
            async with http.get(url) as response:
                assert response.status == 200, (url, await response.text())
    print(
        f"ready {ready_at - launched_at:.0f}s after launch; first LATE alert at dispatch"
        f" {took:.0f}s after ready: {line}"
    )

    # A second copy on the same ports and state (with --reset, even) fails at once.
    second = await start(runs, env, tmp_path, "--reset")
    code = await second.wait(60)
    message = second.stderr_path.read_text().strip()
    assert code == 2, second.output()
    assert len(message.splitlines()) == 1, message
    assert f"port {env['CARGOTRACK_KAFKA_PORT']} (Kafka) is already in use" in message
    assert "cargotrack dev" in message

    # ... and the first one goes on, its state untouched.
    count = as_int(fields, "shipments")
    await first.wait_for(
        lambda line: (
            bool(SUMMARY.match(line)) and as_int(summary_fields(line), "shipments") >= count
        ),
        30,
    )
    assert (Path(env["CARGOTRACK_STATE_DIR"]) / "kafka").is_dir()

    tree = process_tree(first.pid)
    assert len(tree) >= 1 + 6 + 2, tree  # launcher, six services, Kafka, PostgreSQL
    code = await first.interrupt()
    assert code == 0, first.output()
    assert first.lines[-1] == "stopped", first.output()
    # The launcher reaps its children (and PostgreSQL its backends) before it exits.
    survivors = {pid for pid in tree if alive(pid)}
    assert not survivors, f"left running: {survivors}"


@pytest.mark.timeout(240)
async def test_a_second_run_reuses_the_state_and_reset_starts_afresh(
    tmp_path: Path, state_dir: Path, runs: list[DevRun]
) -> None:
    env = dev_env(state_dir)
    first = await start(runs, env, tmp_path, "--status-every", "2", "--vehicles", "3")
    await first.wait_for(lambda line: line.startswith("ready;"), READY_S)
    await first.wait_for(
        lambda line: bool(SUMMARY.match(line)) and moving(summary_fields(line)) >= 1, 60
    )
    assert await first.interrupt() == 0, first.output()
    before = as_int(first.summaries()[-1], "shipments")
    assert before >= 1

    # Same state: the first run's shipments are still there (cancelled on its stop),
    # and the second run adds its own (new ids: nothing is deduplicated away).
    again = await start(runs, env, tmp_path, "--status-every", "2", "--vehicles", "3")
    await again.wait_for(lambda line: line.startswith("ready;"), READY_S)
    line = await again.wait_for(
        lambda line: (
            bool(SUMMARY.match(line))
            and as_int(summary_fields(line), "shipments") > before
            and moving(summary_fields(line)) >= 1
        ),
        60,
    )
    assert as_int(summary_fields(line), "cancelled") >= 1, again.output()
    assert await again.interrupt() == 0, again.output()

    # --reset: empty again (no simulator, so nothing new arrives).
    fresh = await start(
        runs, env, tmp_path, "--reset", "--no-simulator", "--status-every", "1", "--exit-after", "4"
    )
    assert await fresh.wait(READY_S) == 0, fresh.output()
    summaries = fresh.summaries()
    assert summaries, fresh.output()
    assert summaries[-1]["shipments"] == "0"
    assert summaries[-1]["dispatch"] == "subscribed"


# -- the checks that make a second copy fail fast (no processes) ------------------------


def test_service_ports_follow_the_base() -> None:
    assert list(dev_service_ports({}).values()) == list(range(50051, 50060))
    moved = dev_service_ports({DEV_PORT_BASE_ENV: "41000"})
    assert moved["gps-ingest"] == 41000
    assert moved["projector"] == 41005
    assert moved["learner"] == 41006
    assert moved["webhooks"] == 41007
    assert moved["http-gateway"] == 41008
    with pytest.raises(DevStackError, match=DEV_PORT_BASE_ENV):
        dev_service_ports({DEV_PORT_BASE_ENV: "nope"})
    with pytest.raises(DevStackError, match=DEV_PORT_BASE_ENV):
        dev_service_ports({DEV_PORT_BASE_ENV: "65533"})


def test_a_taken_port_is_named_in_one_line(tmp_path: Path) -> None:
    env = dev_env(tmp_path)
    ports = dev_service_ports(env)
    check_ports(env, ports)  # all free
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["tracking-query"]))
        taken.listen()
        with pytest.raises(DevStackError) as error:
            check_ports(env, ports)
    message = str(error.value)
    assert f"port {ports['tracking-query']} (tracking-query gRPC) is already in use" in message
    assert DEV_PORT_BASE_ENV in message
    assert "\n" not in message


def test_the_state_directory_is_locked_and_reset_keeps_the_lock(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with locked_state_dir(state):
        (state / "kafka").mkdir()
        (state / "logs.txt").write_text("x")
        taken = r"in use by another cargotrack dev \(pid \d+\)"
        with pytest.raises(DevStackError, match=taken), locked_state_dir(state):
            pass
        reset_state(state)
        assert [p.name for p in state.iterdir()] == [LOCK_FILE]
        assert (state / LOCK_FILE).read_text().strip() == str(os.getpid())
    with locked_state_dir(state):  # released
        pass
