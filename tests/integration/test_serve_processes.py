"""`cargotrack serve tracking-query` with CARGOTRACK_PROCESSES=2 (shared/workers.py), as a
process on the session's PostgreSQL: two worker processes answer on one port, SIGTERM
drains both and exits 0, and a worker that dies ends the service with status 1 after
the other one drained (the behaviour docs/operations.md documents: Kubernetes restarts
the container)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.ingest_helpers import wait_health

#: Health checks made over fresh connections: the kernel spreads connections by a hash
#: of their addresses, so all of them landing on one of two workers has odds 2**-39.
CALLS = 40


def free_port_run(count: int) -> int:
    """A port p such that p .. p + count - 1 are all free now: the parent's metrics port
    and, above it, its workers'."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65536:
            continue
        probes = [socket.socket() for _ in range(count)]
        try:
            for offset, probe in enumerate(probes):
                probe.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return base
    raise AssertionError(f"no {count} consecutive free ports")


def children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is `pid` (Linux /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", text, re.MULTILINE) and not re.search(
            r"^State:\s+Z", text, re.MULTILINE
        ):
            found.append(int(status.parent.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return re.search(r"^State:\s+Z", state, re.MULTILINE) is None


def handled_checks(metrics_port: int) -> dict[str, float]:
    """Health Check calls answered OK, by worker, as the parent's metrics port says."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            worker = labels.pop("worker", "none")
            if sample.name == "cargotrack_grpc_server_handled_total" and labels == {
                "service": "grpc.health.v1.Health",
                "method": "Check",
                "code": "OK",
            }:
                found[worker] = sample.value
    return found


async def check_health_on_new_connection(port: int) -> None:
    # Its own subchannel pool: a new TCP connection, never one shared with another channel.
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


@dataclass
class Served:
    process: asyncio.subprocess.Process
    port: int
    metrics_port: int
    workers: list[int]
    log_path: Path

    async def exit_status(self) -> tuple[int, str]:
        """Wait for the parent's exit: its status, and the log of it and its workers."""
        async with asyncio.timeout(30):
            code = await self.process.wait()
        return code, self.log_path.read_text()


@asynccontextmanager
async def two_workers(database_url: str, pg_schema: str, log_path: Path) -> AsyncIterator[Served]:
    metrics_port = free_port_run(3)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # tracking-query reads no topic
        "DATABASE_URL": database_url,
        "CARGOTRACK_DB_SCHEMA": pg_schema,
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_GRPC_HOST": "127.0.0.1",
        "CARGOTRACK_GRPC_PORT": "0",
        "CARGOTRACK_SHUTDOWN_GRACE_S": "2",
        "CARGOTRACK_LOG_FORMAT": "console",
        "CARGOTRACK_METRICS_PORT": str(metrics_port),
        "CARGOTRACK_PROCESSES": "2",
    }
    with log_path.open("wb") as log:  # a file: a full pipe would block the workers
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "cargotrack"),
            "serve",
            "tracking-query",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    try:
        assert process.stdout is not None
        ports = set()
        async with asyncio.timeout(60):
            for _ in range(2):  # each worker says so once it listens
                line = (await process.stdout.readline()).decode()
                assert line.startswith("tracking-query listening on 127.0.0.1:"), line
                ports.add(int(line.rsplit(":", 1)[1]))
        assert len(ports) == 1, ports  # one port for both
        (port,) = ports
        workers = children(process.pid)
        assert len(workers) == 2, workers
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_health(channel, timeout_s=60)
        yield Served(process, port, metrics_port, workers, log_path)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.timeout(120)
async def test_two_workers_answer_on_one_port_and_sigterm_drains_both(
    database_url: str, pg_schema: str, tmp_path: Path
) -> None:
    async with two_workers(database_url, pg_schema, tmp_path / "serve.log") as served:
        before = handled_checks(served.metrics_port)
        for _ in range(CALLS):
            await check_health_on_new_connection(served.port)
        after = handled_checks(served.metrics_port)
        answered = {worker: after[worker] - before.get(worker, 0.0) for worker in after}
        # Both workers answered, and between them every call.
        assert sorted(answered) == ["0", "1"], answered
        assert sum(answered.values()) == CALLS, answered
        assert all(count > 0 for count in answered.values()), answered

        served.process.send_signal(signal.SIGTERM)
        code, log = await served.exit_status()
        assert code == 0, log
        assert not any(alive(pid) for pid in served.workers)


@pytest.mark.timeout(120)
async def test_a_dead_worker_is_reported_and_ends_the_service_with_status_1(
    database_url: str, pg_schema: str, tmp_path: Path
) -> None:
    async with two_workers(database_url, pg_schema, tmp_path / "serve.log") as served:
        killed, other = served.workers
        os.kill(killed, signal.SIGKILL)
        code, log = await served.exit_status()
        assert code == 1, log
        assert re.search(rf"worker \d \(pid {killed}\) ended by itself \(killed by SIGKILL\)", log)
        # The other worker was drained, not killed, and is gone.
        assert re.search(rf"worker \d \(pid {other}\) stopped: exit status 0", log), log
        assert not alive(other)


@pytest.mark.timeout(120)
async def test_the_workers_stop_when_the_parent_is_killed(
    database_url: str, pg_schema: str, tmp_path: Path
) -> None:
    """No orphan keeps the port: the parent's SIGKILL sends SIGTERM to the workers."""
    async with two_workers(database_url, pg_schema, tmp_path / "serve.log") as served:
        served.process.kill()
        await served.process.wait()
        async with asyncio.timeout(30):
            while any(alive(pid) for pid in served.workers):  # noqa: ASYNC110  # polling /proc
                await asyncio.sleep(0.1)
        with socket.socket() as probe:
            # SO_REUSEADDR: closed connections may linger in TIME_WAIT; a listener may not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", served.port))  # free again
