"""`cargotrack dev`: the whole suite on one machine.

Starts (or reuses, via KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL) Kafka and
PostgreSQL, applies migrations, creates topics, starts every service as its own
process (`cargotrack serve NAME`, exactly what a container runs), waits until
each reports SERVING on grpc.health.v1, prints where each listens, and runs
until Ctrl-C / SIGTERM (or --exit-after). Stopping is ordered: services get
SIGTERM and drain, then Kafka and PostgreSQL stop. No child process survives.

State (Kafka log, PostgreSQL data, service logs) lives in CARGOTRACK_STATE_DIR
(default ./.cargotrack) and is reused by the next run; `--reset` starts afresh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import ServiceSpec, available_services
from shared.devstack import DevStackError, LocalStack
from shared.devstack.ports import ensure_port_free
from shared.devstack.process import ChildProcess

SERVICE_STOP_GRACE_S = 15.0


@dataclass
class RunningService:
    spec: ServiceSpec
    port: int
    process: ChildProcess


def state_dir_from_env(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("CARGOTRACK_STATE_DIR") or ".cargotrack").resolve()


def service_env(stack: LocalStack, base: Mapping[str, str], port: int) -> dict[str, str]:
    """The environment of one service process of the local suite."""
    return {
        **base,
        "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
        "DATABASE_URL": stack.database_url,
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_GRPC_HOST": "127.0.0.1",
        "CARGOTRACK_GRPC_PORT": str(port),
        "CARGOTRACK_TOPIC_PARTITIONS": base.get("CARGOTRACK_TOPIC_PARTITIONS", "3"),
        "CARGOTRACK_LOG_FORMAT": "json",
        "CARGOTRACK_SHUTDOWN_GRACE_S": "5",
    }


async def wait_serving(port: int, process: ChildProcess, timeout_s: float = 60.0) -> None:
    """Wait until a service answers SERVING on grpc.health.v1, or fail naming its log."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not process.running:
                raise DevStackError(
                    f"{process.name} exited with status {process.returncode} during start; "
                    f"see {process.log_path}"
                )
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise DevStackError(
                    f"{process.name} not SERVING after {timeout_s:.0f}s; see {process.log_path}"
                )
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def running_services(
    stack: LocalStack, log_dir: Path, environ: Mapping[str, str] = os.environ
) -> AsyncIterator[list[RunningService]]:
    """Start every available service, wait for SERVING, stop them all on exit."""
    specs = available_services()
    for spec in specs:
        ensure_port_free(
            spec.default_port, what=f"{spec.name} gRPC", env_var="(stop the other cargotrack dev)"
        )
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before any service runs
    running: list[RunningService] = []
    try:
        for spec in specs:
            process = ChildProcess.spawn(
                [sys.executable, "-c", "from services.cli import main; main()", "serve", spec.name],
                name=spec.name,
                log_path=log_dir / f"{spec.name}.log",
                append_log=True,
                env=service_env(stack, environ, spec.default_port),
            )
            running.append(RunningService(spec, spec.default_port, process))
        await asyncio.gather(*(wait_serving(s.port, s.process) for s in running))
        yield running
    finally:
        # Ask all to drain at once; each gets SIGKILL if it outlives the grace.
        await asyncio.gather(
            *(s.process.terminate(signal.SIGTERM, SERVICE_STOP_GRACE_S) for s in running)
        )


async def _bootstrap(stack: LocalStack, environ: Mapping[str, str]) -> None:
    from shared.config import load_settings
    from shared.db import migrate
    from shared.kafka import ensure_topics, topic_specs

    settings = load_settings({**environ, **service_env(stack, environ, 0)}, default_grpc_port=0)
    await migrate(settings.database)
    await ensure_topics(settings.kafka, topic_specs(settings.topics))


async def run_dev(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> None:
    """Run the local suite until interrupted (see the module docstring)."""
    state_dir = state_dir_from_env(environ)
    if args.reset and state_dir.exists():
        shutil.rmtree(state_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with LocalStack.for_dev(state_dir, environ) as stack:
        print(f"kafka       {stack.bootstrap_servers}")
        print(f"postgresql  {stack.database_url}")
        await _bootstrap(stack, environ)
        async with running_services(stack, state_dir / "logs", environ) as services:
            for service in services:
                print(f"{service.spec.name:<24} 127.0.0.1:{service.port}  ({service.spec.summary})")
            print(f"logs        {state_dir / 'logs'}")
            print("ready; Ctrl-C stops everything", flush=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.exit_after or None):
                    await stop.wait()
            print("stopping…", flush=True)
    print("stopped", flush=True)
