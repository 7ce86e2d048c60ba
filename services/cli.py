"""The `cargotrack` command: run a service, the local suite, and operator tasks.

    cargotrack dev                 local Kafka + PostgreSQL + every service + simulator
    cargotrack simulate            a simulated fleet against running ingest services
    cargotrack serve NAME          one service (what a container runs)
    cargotrack migrate             apply database migrations
    cargotrack create-topics       create the Kafka topics
    cargotrack token --role ROLE   mint a development bearer token
    cargotrack rebuild             rebuild the projection from the log, switch atomically
    cargotrack eta-eval            score the ETA model on recorded trajectories
    cargotrack eta-report          live ETA accuracy on real arrivals, per tenant and horizon
    cargotrack env                 the running `cargotrack dev` stack's settings as exports

Operator commands (migrate, create-topics, token, rebuild, simulate, eta-report) beside a
running `cargotrack dev` find its stack by themselves: whatever their environment
does not set (Kafka, PostgreSQL, the signing key, ...) they take from the stack file
of its state directory (CARGOTRACK_STATE_DIR, default ./.cargotrack), and say on
stderr which stack they talk to.

Expected failures (bad configuration, a port taken, no Java) print one line and
exit with status 2; tracebacks are kept for bugs.
"""

from __future__ import annotations

import os

# Before anything imports grpc: `cargotrack dev` forks service processes while its own
# grpc threads run, and grpc's fork handlers can crash such a child; every child
# execs at once, so fork support buys nothing.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import DEV_JWT_SECRET, ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from services.fleet_simulator import SimulatorConfig


@dataclass(frozen=True)
class ServiceSpec:
    """A deployable: its module (with `async def run(settings)`) and default gRPC port."""

    name: str
    module: str
    default_port: int
    summary: str
    #: It runs without PostgreSQL when DATABASE_URL is unset (see load_settings).
    database_optional: bool = False


SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec(
            "gps-ingest", "services.gps_ingest.app", 50051, "GPS batches from drivers' apps"
        ),
        ServiceSpec(
            "shipment-events", "services.shipment_events.app", 50052, "shipment lifecycle events"
        ),
        ServiceSpec(
            "delivery-confirmations",
            "services.delivery_confirmations.app",
            50053,
            "proofs of delivery",
            database_optional=True,
        ),
        ServiceSpec("tracking-query", "services.tracking_query.app", 50054, "shipment queries"),
        ServiceSpec("dispatch", "services.dispatch.app", 50055, "delay alert subscriptions"),
        ServiceSpec("projector", "services.projector.app", 50056, "folds the streams into state"),
        ServiceSpec("learner", "services.learner.app", 50057, "learns speeds, publishes models"),
        ServiceSpec(
            "http-gateway",
            "services.http_gateway.app",
            50058,
            "HTTP/JSON, SSE, tracking page, dispatch board",
            database_optional=True,
        ),
    )
}


def available_services() -> list[ServiceSpec]:
    """The services whose code exists in this checkout, in start order."""
    found = []
    for spec in SERVICES.values():
        try:
            importlib.import_module(spec.module)
        except ModuleNotFoundError as error:
            if error.name and spec.module.startswith(error.name):
                continue
            raise
        found.append(spec)
    return found


class UsageError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def _settings(default_port: int = 0, *, database_optional: bool = False) -> Settings:
    try:
        return load_settings(default_grpc_port=default_port, database_optional=database_optional)
    except ConfigError as error:
        raise UsageError(str(error)) from None


def _state_dir() -> Path:
    from shared.devstack.running import state_dir_from_env

    return state_dir_from_env(os.environ)


def _operator_environ(*, talks_to_servers: bool = True) -> dict[str, str]:
    """This process's environment, completed from a running `cargotrack dev` stack.

    Prints to stderr which Kafka and PostgreSQL the command talks to and where those
    settings came from (with `talks_to_servers=False`, only when the stack's were used).
    """
    from shared.devstack.running import redact_url, stack_environment

    environ, stack, taken = stack_environment(os.environ, _state_dir())
    if not talks_to_servers and not taken:
        return environ
    if stack is not None and taken:
        mine = [name for name in stack.env if name not in taken]
        origin = stack.origin() + (f"; {', '.join(mine)} from the environment" if mine else "")
    elif stack is None and not environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        origin = f"no running cargotrack dev in {_state_dir()}, nothing in the environment"
    else:
        origin = "from the environment"
    if talks_to_servers:
        kafka = environ.get("KAFKA_BOOTSTRAP_SERVERS") or "?"
        database = redact_url(environ.get("DATABASE_URL") or "?")
        print(f"cargotrack: Kafka {kafka}, PostgreSQL {database} ({origin})", file=sys.stderr)
    else:
        print(f"cargotrack: settings of {origin}", file=sys.stderr)
    return environ


def _operator_settings() -> Settings:
    """Settings of an operator command: the environment, completed from a running stack."""
    try:
        return load_settings(_operator_environ(), default_grpc_port=0)
    except ConfigError as error:
        raise UsageError(
            f"{error} (or start `cargotrack dev` / `make up` in this directory: operator "
            "commands use its stack)"
        ) from None


def _configure_logging(settings: Settings | None = None) -> None:
    from shared.logs import configure_logging

    configure_logging(
        settings.log_format if settings else "console", settings.log_level if settings else "INFO"
    )


def cmd_serve(args: argparse.Namespace) -> None:
    spec = SERVICES.get(args.name)
    if spec is None:
        raise UsageError(f"unknown service {args.name!r}; one of: {', '.join(SERVICES)}")
    settings = _settings(spec.default_port, database_optional=spec.database_optional)
    _configure_logging(settings)
    module = importlib.import_module(spec.module)
    run: Callable[[Settings], Coroutine[Any, Any, None]] = module.run
    asyncio.run(run(settings))


def cmd_migrate(args: argparse.Namespace) -> None:
    from shared.db import DatabaseUnavailable, migrate

    if args.wait < 0:
        raise UsageError("--wait must be 0 or a positive number of seconds")
    settings = _operator_settings()
    _configure_logging(settings)
    try:
        applied = asyncio.run(migrate(settings.database, wait_s=args.wait))
    except DatabaseUnavailable as error:
        raise UsageError(str(error)) from None
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


def cmd_create_topics(_args: argparse.Namespace) -> None:
    from shared.kafka import ensure_topics, topic_specs

    settings = _operator_settings()
    created = asyncio.run(ensure_topics(settings.kafka, topic_specs(settings.topics)))
    print(f"created {len(created)} topic(s): {', '.join(created) or 'all existed'}")


def cmd_token(args: argparse.Namespace) -> None:
    from shared.auth import Role, mint_token

    environ = _operator_environ(talks_to_servers=False)
    secret = environ.get("CARGOTRACK_JWT_SECRET") or DEV_JWT_SECRET
    try:
        token = mint_token(
            secret,
            role=Role(args.role),
            tenant_id=args.tenant,
            subject=args.subject or f"{args.role}@{args.tenant}",
            vehicle_id=args.vehicle,
            customer_id=args.customer,
            ttl_s=args.ttl_hours * 3600,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(token)


def cmd_dev(args: argparse.Namespace) -> None:
    from services.launcher import run_dev

    if args.status_every <= 0:
        raise UsageError("--status-every must be a positive number of seconds")
    if args.give_up_after < 1 or args.give_up_window <= 0:
        raise UsageError("--give-up-after must be at least 1 and --give-up-window positive")
    if not args.no_simulator:
        _simulator_config(args)  # a bad option fails before anything starts
    _configure_logging()
    asyncio.run(run_dev(args))


def _simulator_config(args: argparse.Namespace, **overrides: Any) -> SimulatorConfig:
    """The SimulatorConfig of the command line (ValueError → one-line usage error)."""
    from services.fleet_simulator import SimulatorConfig

    try:
        return SimulatorConfig(
            seed=args.seed, vehicles=args.vehicles, speedup=args.speedup, **overrides
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def cmd_simulate(args: argparse.Namespace) -> None:
    from services.fleet_simulator import Targets
    from services.fleet_simulator import run as simulate
    from services.launcher import dev_service_ports

    if args.report_every <= 0:
        raise UsageError("--report-every must be a positive number of seconds")
    environ = _operator_environ(talks_to_servers=False)
    config = _simulator_config(
        args,
        rate_hz=args.rate,
        datasets=tuple(args.dataset or ("liverpool",)),
        tenant=args.tenant,
        run_id=args.run_id,
        jwt_secret=environ.get("CARGOTRACK_JWT_SECRET") or DEV_JWT_SECRET,
    )
    ports = dev_service_ports(environ)
    targets = Targets(
        gps=args.gps or f"127.0.0.1:{ports['gps-ingest']}",
        events=args.events or f"127.0.0.1:{ports['shipment-events']}",
        confirmations=args.confirmations or f"127.0.0.1:{ports['delivery-confirmations']}",
    )
    _configure_logging()

    async def main() -> None:
        import signal

        from services.fleet_simulator import SimulatorStats

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.exit_after:
            loop.call_later(args.exit_after, stop.set)
        stats = SimulatorStats()

        async def report() -> None:
            while True:
                await asyncio.sleep(args.report_every)
                print(f"[sim +{int(stats.elapsed_s())}s] {stats.summary()}", flush=True)

        reporter = asyncio.create_task(report())
        try:
            await simulate(config, targets, stats=stats, stop=stop)
        finally:
            reporter.cancel()
            await asyncio.wait({reporter})
        print(f"[sim +{int(stats.elapsed_s())}s] stopped: {stats.summary()}", flush=True)

    asyncio.run(main())


def cmd_rebuild(args: argparse.Namespace) -> None:
    from services.projector.rebuild import rebuild

    settings = _operator_settings()
    _configure_logging(settings)
    report = asyncio.run(rebuild(settings, keep_old=args.keep_old))
    print(
        f"rebuilt {report.schema} from {report.records} records in {report.seconds:.1f}s"
        f" ({report.records_per_s:,.0f} records/s)"
        + (f"; dropped {report.dropped_old}" if report.dropped_old else "")
    )


def cmd_env(_args: argparse.Namespace) -> None:
    from shared.devstack.running import read_running_stack

    stack = read_running_stack(_state_dir())
    if stack is None:
        raise UsageError(
            f"no cargotrack dev is running with state directory {_state_dir()} "
            "(start one with `make up`, or set CARGOTRACK_STATE_DIR to its directory)"
        )
    print(f"# {stack.origin()}")
    print("\n".join(stack.export_lines()))


def cmd_eta_eval(args: argparse.Namespace) -> None:
    from shared.eta_eval import main as evaluate

    code = evaluate(args.rest)
    if code:
        sys.exit(code)


def cmd_eta_report(args: argparse.Namespace) -> None:
    from shared.eta_report import main as report

    code = report(args.rest, environ=_operator_environ())
    if code:
        sys.exit(code)


def _simulator_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=1, help="same seed, same plan (default 1)")
    parser.add_argument(
        "--vehicles", type=int, default=8, metavar="N", help="fleet size (default 8)"
    )
    parser.add_argument(
        "--speedup",
        type=float,
        default=30.0,
        metavar="X",
        help="replay recorded trips X times faster (default 30; vehicles never appear "
        "faster than 25 m/s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cargotrack", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="run the whole suite locally")
    dev.add_argument("--headless", action="store_true", help="summary lines instead of a live view")
    dev.add_argument("--no-simulator", action="store_true", help="start no simulated fleet")
    dev.add_argument("--reset", action="store_true", help="delete local state before starting")
    dev.add_argument(
        "--exit-after", type=float, default=0, metavar="S", help="stop by itself after S seconds"
    )
    dev.add_argument(
        "--status-every",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between summary lines (--headless)",
    )
    dev.add_argument(
        "--give-up-after",
        type=int,
        default=5,
        metavar="N",
        help="stop when one process exited N times within --give-up-window (default 5)",
    )
    dev.add_argument(
        "--give-up-window",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds over which --give-up-after counts exits (default 60)",
    )
    _simulator_options(dev)
    dev.set_defaults(handler=cmd_dev)

    simulate = commands.add_parser(
        "simulate",
        help="drive a simulated fleet against running ingest services",
        description="Drivers' apps and a TMS as gRPC clients of the ingest services; "
        "vehicles replay recorded trips (data/trajectories). Runs until Ctrl-C.",
    )
    _simulator_options(simulate)
    simulate.add_argument(
        "--rate",
        type=float,
        default=1.0,
        metavar="HZ",
        help="GPS fixes per vehicle per second, interpolated between recorded ones "
        "(0: recorded fixes only; default 1)",
    )
    simulate.add_argument(
        "--dataset",
        action="append",
        choices=["liverpool", "austin"],
        help="recorded trips to drive (repeat for both; default liverpool)",
    )
    simulate.add_argument("--tenant", default="demo")
    simulate.add_argument(
        "--run-id", default="", help="tag of shipment and device ids (default: the start time)"
    )
    for name, service in (
        ("gps", "gps-ingest"),
        ("events", "shipment-events"),
        ("confirmations", "delivery-confirmations"),
    ):
        simulate.add_argument(
            f"--{name}",
            metavar="HOST:PORT",
            help=f"{service} (default: its cargotrack dev port)",
        )
    simulate.add_argument(
        "--exit-after", type=float, default=0, metavar="S", help="stop by itself after S seconds"
    )
    simulate.add_argument(
        "--report-every", type=float, default=10.0, metavar="S", help="seconds between reports"
    )
    simulate.set_defaults(handler=cmd_simulate)

    serve = commands.add_parser("serve", help="run one service")
    serve.add_argument("name", choices=sorted(SERVICES))
    serve.set_defaults(handler=cmd_serve)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="S",
        help="retry for up to S seconds while PostgreSQL does not answer (default 60; 0: once)",
    )
    migrate.set_defaults(handler=cmd_migrate)
    commands.add_parser("create-topics", help="create the Kafka topics").set_defaults(
        handler=cmd_create_topics
    )

    token = commands.add_parser("token", help="mint a bearer token (dev key unless configured)")
    token.add_argument(
        "--role", required=True, choices=["driver", "shipper", "ops", "customer", "dispatcher"]
    )
    token.add_argument("--tenant", default="demo")
    token.add_argument("--subject")
    token.add_argument("--vehicle", help="the driver's vehicle id")
    token.add_argument("--customer", help="the customer's id")
    token.add_argument("--ttl-hours", type=int, default=24)
    token.set_defaults(handler=cmd_token)

    rebuild = commands.add_parser(
        "rebuild", help="replay the log into fresh tables, then switch to them atomically"
    )
    rebuild.add_argument("--keep-old", action="store_true", help="keep the replaced schema")
    rebuild.set_defaults(handler=cmd_rebuild)

    commands.add_parser(
        "env",
        help="print the running cargotrack dev stack's settings as export lines",
        description='For other tools: eval "$(cargotrack env)" points them at the stack '
        "`cargotrack dev` runs in CARGOTRACK_STATE_DIR (default ./.cargotrack).",
    ).set_defaults(handler=cmd_env)

    evaluate = commands.add_parser(
        "eta-eval",
        help="score the ETA model on recorded trajectories (see docs/eta.md)",
        add_help=False,
    )
    evaluate.add_argument("rest", nargs=argparse.REMAINDER)
    evaluate.set_defaults(handler=cmd_eta_eval)

    accuracy = commands.add_parser(
        "eta-report",
        help="live ETA accuracy on real arrivals, per tenant and horizon (see docs/eta.md)",
        add_help=False,
    )
    accuracy.add_argument("rest", nargs=argparse.REMAINDER)
    accuracy.set_defaults(handler=cmd_eta_report)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eta-eval"]:
        # The evaluation parses its own options.
        cmd_eta_eval(argparse.Namespace(rest=argv[1:]))
        return
    if argv[:1] == ["eta-report"]:
        cmd_eta_report(argparse.Namespace(rest=argv[1:]))
        return
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except UsageError as error:
        print(f"cargotrack: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        # Expected environment failures carry a one-line message; anything else is a bug.
        from shared.devstack import DevStackError

        if isinstance(error, DevStackError):
            print(f"cargotrack: {error}", file=sys.stderr)
            sys.exit(2)
        logging.getLogger("cargotrack").exception("failed")
        sys.exit(1)
