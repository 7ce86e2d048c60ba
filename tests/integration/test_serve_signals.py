"""`cargotrack serve NAME` and SIGTERM: every service drains and exits with status 0,
whenever the signal comes (shared/runtime.py: serve, run_service).

While starting, no Kafka or PostgreSQL is needed: the services are pointed at a
PostgreSQL address that accepts connections and never answers, so their start is
held at a known point. Once serving, they run against the session's stack.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.registry import SERVICES
from tests.ingest_helpers import wait_health

#: Services whose start connects to PostgreSQL first (migrations).
STARTS_WITH_POSTGRES = ["projector", "learner", "tracking-query"]


@pytest.fixture
def silent_postgres() -> Iterator[socket.socket]:
    """A listening socket that takes connections and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        yield listener


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "sig"),
    [(name, signal.SIGTERM) for name in STARTS_WITH_POSTGRES] + [("projector", signal.SIGINT)],
)
async def test_sigterm_while_starting_stops_what_started_and_exits_0(
    name: str, sig: signal.Signals, silent_postgres: socket.socket
) -> None:
    """SIGTERM (or SIGINT) while the service waits for PostgreSQL at start: the start is
    abandoned, what it had started stops, exit status 0 (before: 143, or a wait for
    the connection to time out)."""
    host, port = silent_postgres.getsockname()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "DATABASE_URL": f"postgresql://cargotrack@{host}:{port}/cargotrack",
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_GRPC_PORT": "0",
        "CARGOTRACK_LOG_FORMAT": "console",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from services.cli import main; main()",
        "serve",
        name,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    try:
        async with asyncio.timeout(30):
            connection, _ = await loop.sock_accept(silent_postgres)  # it is starting
        held.append(connection)  # open and silent: its start waits
        process.send_signal(sig)
        async with asyncio.timeout(20):
            assert process.stdout is not None
            output = (await process.stdout.read()).decode()
            code = await process.wait()
        assert code == 0, output
        assert f"{name}: stopped while starting" in output, output
        assert "listening on" not in output, output
    finally:
        for connection in held:
            connection.close()
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_sigterm_once_serving_drains_and_exits_0(
    name: str, kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """Every service, as a process: it prints its port, turns SERVING, and on SIGTERM
    drains and exits with status 0."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "DATABASE_URL": database_url,
        "CARGOTRACK_DB_SCHEMA": pg_schema,
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_TOPIC_PREFIX": topic_prefix,
        "CARGOTRACK_GRPC_HOST": "127.0.0.1",
        "CARGOTRACK_GRPC_PORT": "0",
        "CARGOTRACK_SHUTDOWN_GRACE_S": "2",
        "CARGOTRACK_LOG_FORMAT": "console",
        "CARGOTRACK_HTTP_PORT": "0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from services.cli import main; main()",
        "serve",
        name,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    # The http-gateway is ready only with tracking-query and dispatch behind it (none
    # here): wait for it to be alive instead.
    health = "liveness" if name == "http-gateway" else ""
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = (await process.stdout.readline()).decode()
        assert line.startswith(f"{name} listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_health(channel, timeout_s=60, service=health)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


#: Put on PYTHONPATH, this holds the process at the import of services.cli: it says so on
#: stderr and waits for a byte on stdin. The console script's own module has run by then
#: and services.cli is the first heavy import (argparse, the settings, the entry points
#: of the development commands, then the service's modules), so a signal sent while the
#: process is held arrives exactly in the window this test is about.
HOLD_AT_IMPORT = """
import os, sys

class _Hold:
    def find_spec(self, name, path=None, target=None):
        if name == "services.cli":
            sys.meta_path.remove(self)
            os.write(2, b"held at import of services.cli\\n")
            os.read(0, 1)
        return None

sys.meta_path.insert(0, _Hold())
"""


@pytest.mark.timeout(60)
async def test_sigterm_while_importing_exits_0(tmp_path: Path) -> None:
    """SIGTERM while `cargotrack serve` (the console script, as the image runs it) is
    still importing its modules: noted, and the service stops before it starts, exit 0
    (before: the default action, status 143). Deterministic: the process is held at
    the import (HOLD_AT_IMPORT) until the signal has been sent."""
    hook = tmp_path / "sitecustomize.py"
    hook.write_text(HOLD_AT_IMPORT)
    console_script = Path(sys.executable).parent / "cargotrack"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(hook.parent), os.environ.get("PYTHONPATH")])
        ),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "DATABASE_URL": "postgresql://cargotrack@127.0.0.1:1/cargotrack",
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_GRPC_PORT": "0",
        "CARGOTRACK_LOG_FORMAT": "console",
    }
    process = await asyncio.create_subprocess_exec(
        str(console_script),
        "serve",
        "tracking-query",
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            held = await process.stderr.readline()
        assert held == b"held at import of services.cli\n", held
        process.send_signal(signal.SIGTERM)
        process.stdin.write(b"go")
        await process.stdin.drain()
        async with asyncio.timeout(30):
            stdout, stderr = await process.communicate()
        output = (stdout + stderr).decode()
        assert process.returncode == 0, output
        assert "stop requested (SIGTERM) while starting" in output, output
        assert "listening on" not in output, output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
