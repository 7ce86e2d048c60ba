"""`cargotrack dev`: the whole suite on one machine, with a simulated fleet.

Starts (or reuses, via KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL) Kafka and
PostgreSQL, applies migrations, creates topics, starts every service as its own
process (`cargotrack serve NAME`, exactly what a container runs), waits until
each reports SERVING on grpc.health.v1, prints where each listens, then
subscribes to dispatch's alerts, starts the fleet simulator
(devtools/fleet_simulator; `--no-simulator` leaves it out) and shows the live
view (devtools/view.py; `--headless` prints summary lines instead, as does a
run whose stdout is not a terminal). Runs until Ctrl-C / SIGTERM (or
--exit-after). Stopping is ordered: the simulator (it cancels the shipments it
did not finish), the view, then the services get SIGTERM and drain, then Kafka
and PostgreSQL stop. No child process survives.

Everything it started is supervised (devtools/supervisor.py): a service (or
Kafka, or PostgreSQL) that exits is reported at once in the view and the headless
output (name, exit code or signal, the last lines of its log), and started again
after a backoff; one that exits --give-up-after times (5) within --give-up-window
seconds (60) stops the run, which then exits with status 2 naming it.

Once the services are ready, the stack's connection settings are written to
`<state dir>/running-stack.json` (shared/running_stack.py; removed on stop), so
operator commands started beside the run (`cargotrack rebuild`, `migrate`, ...)
find it without exported variables, and `cargotrack env` prints them.

Before anything is started or deleted, every port the run needs is checked, and
the state directory is locked: a second copy fails at once with one line naming
the taken port (or the locked directory), and never touches the first one's state.

Ports: Kafka, its controller and PostgreSQL move with CARGOTRACK_KAFKA_PORT,
CARGOTRACK_KAFKA_CONTROLLER_PORT and CARGOTRACK_POSTGRES_PORT
(devtools/devstack/ports.py); the services listen on CARGOTRACK_DEV_PORT_BASE (default
50051) and the ports after it, one per service, in the order of services.registry.SERVICES.

State (Kafka log, PostgreSQL data, service logs) lives in CARGOTRACK_STATE_DIR
(default ./.cargotrack) and is reused by the next run; `--reset` starts afresh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.live import Live

from devtools.devstack import DevStackError, KafkaBroker, LocalStack, PostgresServer
from devtools.devstack.ports import (
    DEFAULT_KAFKA_CONTROLLER_PORT,
    DEFAULT_KAFKA_PORT,
    DEFAULT_POSTGRES_PORT,
    KAFKA_CONTROLLER_PORT_ENV,
    KAFKA_PORT_ENV,
    POSTGRES_PORT_ENV,
    ensure_port_free,
    port_from_env,
)
from devtools.devstack.process import ChildProcess
from devtools.devstack.stack import DATABASE_URL_ENV, KAFKA_BOOTSTRAP_SERVERS_ENV
from devtools.fleet_simulator import SimulatorConfig, SimulatorStats, Targets
from devtools.fleet_simulator import run as simulate
from devtools.supervisor import Event, GaveUp, RestartPolicy, Supervised, Supervisor
from devtools.view import (
    AlertFeed,
    AlertSeen,
    DevMonitor,
    render,
    summary_line,
    wait_subscribed,
)
from services.http_gateway import links as gateway_links
from services.http_gateway.links import dev_http_port
from services.registry import SERVICES, ServiceSpec, available_services
from shared.auth import Role, mint_token
from shared.config import load_settings
from shared.running_stack import (
    remove_running_stack,
    state_dir_from_env,
    write_running_stack,
)

log = logging.getLogger(__name__)

SERVICE_STOP_GRACE_S = 15.0
#: The first service port of `cargotrack dev`; the others follow in SERVICES order.
DEV_PORT_BASE_ENV = "CARGOTRACK_DEV_PORT_BASE"
DEFAULT_DEV_PORT_BASE = min(spec.default_port for spec in SERVICES.values())
#: The tenant the simulator writes and the view reads.
DEV_TENANT = "demo"
#: The lock file inside the state directory (kept by --reset).
LOCK_FILE = "dev.lock"
#: How long the view waits for dispatch to confirm its subscription before the
#: simulator starts anyway (alerts decided before would not reach the view).
SUBSCRIBE_WAIT_S = 10.0
#: Bound of the simulator's clean stop (flush + cancellations) within the launcher's.
SIMULATOR_STOP_S = 10.0


#: How long a restarted service may take to report SERVING again.
RESTART_READY_S = 60.0
#: Settings of the dev's own environment an operator command needs as well (the
#: running-stack file carries them; shared/config.py documents each).
PASSED_TO_OPERATORS = (
    "CARGOTRACK_JWT_SECRET",
    "CARGOTRACK_JWT_PUBLIC_KEY",
    "CARGOTRACK_JWT_ISSUER",
    "CARGOTRACK_JWT_AUDIENCE",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
)


@dataclass
class RunningService:
    """One service process of the suite; `restart()` replaces a process that exited."""

    spec: ServiceSpec
    port: int
    process: ChildProcess
    env: dict[str, str]
    log_path: Path
    infrastructure: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process.running else None

    async def wait_exit(self) -> int | None:
        return await self.process.wait()

    async def restart(self) -> None:
        """Start the service again on its port and wait for SERVING (DevStackError if not)."""
        self.process = _spawn_service(self.spec, self.env, self.log_path)
        try:
            await wait_serving(self.port, self.process, RESTART_READY_S)
        except BaseException:
            await self.process.kill()
            raise


@dataclass
class StackServer:
    """Kafka or PostgreSQL of the local stack, as the supervisor sees it."""

    name: str
    server: KafkaBroker | PostgresServer
    infrastructure: bool = True

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    @property
    def pid(self) -> int | None:
        return self.server.pid

    async def wait_exit(self) -> int | None:
        process = self.server.process
        return None if process is None else await process.wait()

    async def restart(self) -> None:
        """Start the server again on its port with its data (crash recovery included)."""
        await self.server.start(keep_data=True)


def stack_servers(stack: LocalStack) -> list[StackServer]:
    """The servers this run started (external ones are not ours to watch)."""
    servers = []
    brokers = stack.kafka_brokers
    for broker in brokers:  # a cluster's nodes are watched (and restarted) one by one
        name = "kafka" if len(brokers) == 1 else f"kafka-{broker.node_id}"
        servers.append(StackServer(name, broker))
    if stack.postgres is not None:
        servers.append(StackServer("postgresql", stack.postgres))
    if stack.postgres_standby is not None:
        servers.append(StackServer("postgresql-standby", stack.postgres_standby))
    return servers


def operator_env(stack: LocalStack, environ: Mapping[str, str]) -> dict[str, str]:
    """The settings an operator command needs to work on this run's stack.

    Written to the running-stack file (shared/running_stack.py) and printed by
    `cargotrack env`: where Kafka and PostgreSQL are, the signing key the services
    accept, the topic prefix, schema and partitions they use, and the service ports.
    """
    settings = load_settings({**environ, **service_env(stack, environ, 0)}, default_grpc_port=0)
    env = {
        KAFKA_BOOTSTRAP_SERVERS_ENV: stack.bootstrap_servers,
        DATABASE_URL_ENV: stack.database_url,
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_TOPIC_PREFIX": settings.topics.prefix,
        "CARGOTRACK_TOPIC_PARTITIONS": str(settings.topics.partitions),
        "CARGOTRACK_TOPIC_REPLICATION_FACTOR": str(settings.topics.replication_factor),
        "CARGOTRACK_TOPIC_MIN_INSYNC_REPLICAS": str(settings.topics.min_insync_replicas),
        "CARGOTRACK_DB_SCHEMA": settings.database.schema,
        DEV_PORT_BASE_ENV: str(min(dev_service_ports(environ).values())),
    }
    if settings.auth.jwt_secret and not settings.auth.jwt_public_key:
        env["CARGOTRACK_JWT_SECRET"] = settings.auth.jwt_secret
    env.update({name: environ[name] for name in PASSED_TO_OPERATORS if environ.get(name)})
    return env


def dev_service_ports(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """The port of every service of `cargotrack dev`, by name.

    Service `spec` listens on base + (spec.default_port - 50051), where base is
    CARGOTRACK_DEV_PORT_BASE (default 50051): the defaults are 50051..50059. Raises
    DevStackError naming the variable when the base is not a port or the last
    service's port would not be one.
    """
    base = port_from_env(environ, DEV_PORT_BASE_ENV, DEFAULT_DEV_PORT_BASE)
    ports = {
        name: base + spec.default_port - DEFAULT_DEV_PORT_BASE for name, spec in SERVICES.items()
    }
    if max(ports.values()) > 65535:
        raise DevStackError(
            f"{DEV_PORT_BASE_ENV}={base}: the services need {len(ports)} ports from it, up to 65535"
        )
    return ports


def check_ports(environ: Mapping[str, str], service_ports: Mapping[str, int]) -> None:
    """Raise DevStackError naming the first port of this run that is already taken.

    Checks Kafka, its controller and PostgreSQL (unless external servers are
    configured) and every service port, before anything starts or is deleted.
    """
    if not environ.get(KAFKA_BOOTSTRAP_SERVERS_ENV):
        ensure_port_free(
            port_from_env(environ, KAFKA_PORT_ENV, DEFAULT_KAFKA_PORT),
            what="Kafka",
            env_var=KAFKA_PORT_ENV,
        )
        ensure_port_free(
            port_from_env(environ, KAFKA_CONTROLLER_PORT_ENV, DEFAULT_KAFKA_CONTROLLER_PORT),
            what="Kafka controller",
            env_var=KAFKA_CONTROLLER_PORT_ENV,
        )
    if not environ.get(DATABASE_URL_ENV):
        ensure_port_free(
            port_from_env(environ, POSTGRES_PORT_ENV, DEFAULT_POSTGRES_PORT),
            what="PostgreSQL",
            env_var=POSTGRES_PORT_ENV,
        )
    for spec in available_services():
        ensure_port_free(
            service_ports[spec.name], what=f"{spec.name} gRPC", env_var=DEV_PORT_BASE_ENV
        )
    if "http-gateway" in service_ports:
        ensure_port_free(
            dev_http_port(service_ports), what="http-gateway HTTP", env_var=DEV_PORT_BASE_ENV
        )


@contextlib.contextmanager
def locked_state_dir(state_dir: Path) -> Iterator[Path]:
    """Hold an exclusive lock on the state directory for the block.

    Raises DevStackError at once (no waiting) when another run holds it: two runs
    on one state directory would start two brokers on one Kafka log.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise DevStackError(
            f"state directory {state_dir} is not usable ({error.strerror or error}); "
            "set CARGOTRACK_STATE_DIR to a writable directory"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise DevStackError(
                f"state directory {state_dir} is in use by another cargotrack dev "
                f"(pid {holder}); stop it, or set CARGOTRACK_STATE_DIR to another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield state_dir
    finally:
        os.close(fd)  # releases the lock


def reset_state(state_dir: Path) -> None:
    """Delete everything in the state directory but its lock file."""
    for entry in state_dir.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def service_env(stack: LocalStack, base: Mapping[str, str], port: int) -> dict[str, str]:
    """The environment of one service process of the local suite."""
    return {
        # A Kafka cluster's topic replication, unless the environment says otherwise.
        **stack.topic_env(),
        **base,
        "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
        "DATABASE_URL": stack.database_url,
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_GRPC_HOST": "127.0.0.1",
        "CARGOTRACK_GRPC_PORT": str(port),
        "CARGOTRACK_TOPIC_PARTITIONS": base.get("CARGOTRACK_TOPIC_PARTITIONS", "3"),
        "CARGOTRACK_LOG_FORMAT": "json",
        "CARGOTRACK_SHUTDOWN_GRACE_S": "5",
        # A first model version within a minute, then one every 30 s, so the view
        # shows the learner catch up and the version advance (README).
        "CARGOTRACK_LEARNER_SNAPSHOT_EVERY_S": base.get(
            "CARGOTRACK_LEARNER_SNAPSHOT_EVERY_S", "30"
        ),
        "CARGOTRACK_LEARNER_SETTLE_S": base.get("CARGOTRACK_LEARNER_SETTLE_S", "10"),
        "CARGOTRACK_MODEL_POLL_S": base.get("CARGOTRACK_MODEL_POLL_S", "2"),
        # Webhooks to a receiver on this machine (development only; refused in production).
        "CARGOTRACK_WEBHOOK_ALLOW_PRIVATE": base.get("CARGOTRACK_WEBHOOK_ALLOW_PRIVATE", "1"),
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
    stack: LocalStack,
    log_dir: Path,
    environ: Mapping[str, str] = os.environ,
    ports: Mapping[str, int] | None = None,
) -> AsyncIterator[list[RunningService]]:
    """Start every available service, wait for SERVING, stop them all on exit.

    `ports` maps service names to ports (default: `dev_service_ports(environ)`).
    """
    specs = available_services()
    ports = dict(ports or dev_service_ports(environ))
    for spec in specs:
        ensure_port_free(ports[spec.name], what=f"{spec.name} gRPC", env_var=DEV_PORT_BASE_ENV)
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before any service runs
    running: list[RunningService] = []
    try:
        for spec in specs:
            port = ports[spec.name]
            env = service_env(stack, environ, port)
            if spec.name == "http-gateway":
                env.update(gateway_links.dev_env(ports))
            log_path = log_dir / f"{spec.name}.log"
            process = _spawn_service(spec, env, log_path)
            running.append(RunningService(spec, port, process, env, log_path))
        await asyncio.gather(*(wait_serving(s.port, s.process) for s in running))
        yield running
    finally:
        # Ask all to drain at once; each gets SIGKILL if it outlives the grace.
        await asyncio.gather(
            *(s.process.terminate(signal.SIGTERM, SERVICE_STOP_GRACE_S) for s in running)
        )


def _spawn_service(spec: ServiceSpec, env: Mapping[str, str], log_path: Path) -> ChildProcess:
    """`cargotrack serve NAME` as a child process, appending to its log."""
    return ChildProcess.spawn(
        [sys.executable, "-c", "from services.cli import main; main()", "serve", spec.name],
        name=spec.name,
        log_path=log_path,
        append_log=True,
        env=env,
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
    ports = dev_service_ports(environ)
    stack = LocalStack.for_dev(state_dir, environ)  # validates the port variables
    check_ports(environ, ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    failure: GaveUp | None = None
    with locked_state_dir(state_dir):
        if args.reset:
            reset_state(state_dir)
        async with stack:
            print(f"kafka       {stack.bootstrap_servers}")
            print(f"postgresql  {stack.database_url}")
            await _bootstrap(stack, environ)
            async with running_services(stack, state_dir / "logs", environ, ports) as services:
                for service in services:
                    print(
                        f"{service.spec.name:<24} 127.0.0.1:{service.port}"
                        f"  ({service.spec.summary})"
                    )
                if "http-gateway" in ports:
                    print(f"dispatch board  http://127.0.0.1:{dev_http_port(ports)}/dispatch")
                print(f"logs        {state_dir / 'logs'}")
                write_running_stack(state_dir, operator_env(stack, environ))
                print("ready; Ctrl-C stops everything", flush=True)
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(args.exit_after or None):
                            failure = await _live(
                                args, stack, services, state_dir / "logs", environ, stop
                            )
                finally:
                    remove_running_stack(state_dir)
                print("stopping…", flush=True)
    print("stopped", flush=True)
    if failure is not None:
        raise DevStackError(f"stopped because {failure.line()}")


async def _live(
    args: argparse.Namespace,
    stack: LocalStack,
    services: list[RunningService],
    log_dir: Path,
    environ: Mapping[str, str],
    stop: asyncio.Event,
) -> GaveUp | None:
    """Supervision, alert subscription, simulator and view, until `stop` (or cancellation).

    Every service (and Kafka and PostgreSQL, when this run started them) is
    supervised (devtools/supervisor.py): an exit is reported at once, the process
    restarted with backoff; one that keeps failing (args.give_up_after exits within
    args.give_up_window seconds) stops the run, and is returned. The simulator starts
    only once dispatch confirmed the view's subscription (or after
    SUBSCRIBE_WAIT_S), so the view sees every alert the simulation causes. A failing
    simulator is shown, not fatal: the services keep running.
    """
    settings = load_settings({**environ, **service_env(stack, environ, 0)}, default_grpc_port=0)
    secret = settings.auth.verification_key
    where = {s.spec.name: f"127.0.0.1:{s.port}" for s in services}
    headless = getattr(args, "headless", False) or not sys.stdout.isatty()
    started = asyncio.get_running_loop().time()

    def print_alert(seen: AlertSeen) -> None:
        if headless:
            elapsed = asyncio.get_running_loop().time() - started
            print(f"[dev +{int(elapsed)}s] {seen.line()}", flush=True)

    def supervision_event(event: Event) -> None:
        if headless:
            elapsed = asyncio.get_running_loop().time() - started
            print(f"[dev +{int(elapsed)}s] {event.line()}", flush=True)

    policy = RestartPolicy(
        max_failures=getattr(args, "give_up_after", 5),
        window_s=getattr(args, "give_up_window", 60.0),
    )
    units: list[Supervised] = [*stack_servers(stack), *services]
    supervisor = Supervisor(units, policy, supervision_event, failed=stop)

    feed = None
    if "dispatch" in where:
        token = mint_token(secret, role=Role.DISPATCHER, tenant_id=DEV_TENANT, subject="dev-view")
        feed = AlertFeed(
            where["dispatch"], (("authorization", f"Bearer {token}"),), on_alert=print_alert
        )
    stats = None if getattr(args, "no_simulator", False) else SimulatorStats()
    monitor = DevMonitor(
        settings,
        tenant=DEV_TENANT,
        tracking_target=where.get("tracking-query"),
        feed=feed,
        simulator=stats,
        supervisor=supervisor,
    )
    simulator: asyncio.Task[SimulatorStats] | None = None
    simulator_stop = asyncio.Event()
    with _dev_logging(log_dir, console=headless):
        async with contextlib.AsyncExitStack() as exits:
            await exits.enter_async_context(supervisor)
            await exits.enter_async_context(monitor)
            if feed is not None:
                await exits.enter_async_context(feed)
                if not stop.is_set() and not await wait_subscribed(feed, SUBSCRIBE_WAIT_S):
                    log.warning("dispatch did not confirm the alert subscription in time")
            if stats is not None and not stop.is_set():
                config = SimulatorConfig(
                    seed=getattr(args, "seed", 1),
                    vehicles=getattr(args, "vehicles", 8),
                    speedup=getattr(args, "speedup", 30.0),
                    tenant=DEV_TENANT,
                    jwt_secret=secret,
                )
                targets = Targets(
                    gps=where["gps-ingest"],
                    events=where["shipment-events"],
                    confirmations=where["delivery-confirmations"],
                )
                simulator = asyncio.create_task(
                    simulate(config, targets, stats=stats, stop=simulator_stop), name="simulator"
                )
                simulator.add_done_callback(lambda task: _simulator_ended(task, stats))
                if "http-gateway" in where and "tracking-query" in where:
                    base = f"http://127.0.0.1:{dev_http_port(where_ports(services))}"
                    links = asyncio.create_task(
                        gateway_links.print_tracking_link(
                            base, where["tracking-query"], secret, DEV_TENANT
                        )
                    )
                    exits.callback(links.cancel)
            try:
                every_s = getattr(args, "status_every", 5.0)
                await _show(monitor, stop, headless=headless, every_s=every_s)
            finally:
                if simulator is not None:
                    simulator_stop.set()
                    done, _ = await asyncio.wait({simulator}, timeout=SIMULATOR_STOP_S)
                    if not done:
                        simulator.cancel()
                        await asyncio.wait({simulator})
    return supervisor.failure


def where_ports(services: Sequence[RunningService]) -> dict[str, int]:
    return {s.spec.name: s.port for s in services}


def _simulator_ended(task: asyncio.Task[SimulatorStats], stats: SimulatorStats) -> None:
    """Record a simulator failure where the view shows it (and in the log)."""
    if task.cancelled():
        return
    error = task.exception()
    if error is None:
        return
    log.error("the fleet simulator failed", exc_info=error)
    stats.failure = (f"{type(error).__name__}: {error}".splitlines() or ["?"])[0]


async def _show(
    monitor: DevMonitor, stop: asyncio.Event, *, headless: bool, every_s: float
) -> None:
    """Summary lines every `every_s` (headless), or the live view, until `stop`."""

    async def until_stop(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()

    if headless:
        while not stop.is_set():
            await until_stop(every_s)
            print(summary_line(await monitor.snapshot()), flush=True)
        return
    console = Console()
    first = render(await monitor.snapshot(), console.size.width)
    with Live(first, console=console, auto_refresh=False) as live:
        while not stop.is_set():
            await until_stop(1.0)
            live.update(render(await monitor.snapshot(), console.size.width), refresh=True)


@contextlib.contextmanager
def _dev_logging(log_dir: Path, *, console: bool) -> Iterator[None]:
    """Route logs to files while the view owns the terminal; restore them after.

    The simulator logs to `simulator.log` (its refusals and reconnects are part of
    the show, not news). Everything else goes to `dev.log`, and also to the console
    at WARNING and above in headless mode.
    """
    root = logging.getLogger()
    simulator = logging.getLogger("devtools.fleet_simulator")
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    sim_file: logging.Handler = logging.FileHandler(log_dir / "simulator.log")
    dev_file: logging.Handler = logging.FileHandler(log_dir / "dev.log")
    for handler in (sim_file, dev_file):
        handler.setFormatter(formatter)
    saved_handlers = list(root.handlers)
    saved_levels = [h.level for h in saved_handlers]
    simulator.addHandler(sim_file)
    simulator.propagate = False
    if console:
        for handler in saved_handlers:
            handler.setLevel(max(handler.level, logging.WARNING))
        root.addHandler(dev_file)
    else:
        root.handlers[:] = [dev_file]
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        for handler, level in zip(saved_handlers, saved_levels, strict=True):
            handler.setLevel(level)
        simulator.removeHandler(sim_file)
        simulator.propagate = True
        for handler in (sim_file, dev_file):
            handler.close()
