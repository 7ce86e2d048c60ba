"""The `cargotrack` command: run a service, the local suite, and operator tasks.

    cargotrack dev                 local Kafka + PostgreSQL + every service + simulator
    cargotrack simulate            a simulated fleet against running ingest services
    cargotrack serve NAME          one service (what a container runs; gps-ingest and
                                   tracking-query as CARGOTRACK_PROCESSES workers)
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

The development commands (dev, simulate, eta-eval) live in devtools/, which this
module never imports: they are entry points of group ``cargotrack.commands``
(pyproject.toml). Where that package is missing (the container image), each says in
one line that it needs the development install.

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
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from services.registry import SERVICES, ServiceSpec
from shared.config import DEV_JWT_SECRET, ConfigError, Settings, load_settings

#: Entry-point group of the subcommands other packages add: the development commands
#: of devtools/ (pyproject.toml). Each entry point adds its subparser to `commands`.
COMMAND_GROUP = "cargotrack.commands"
#: How to get the development commands (one line, named in their error message).
DEV_INSTALL = (
    "install the dev extra from a checkout: pip install -e '.[dev,local]' (make bootstrap)"
)


class UsageError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def _settings(default_port: int = 0, *, database_optional: bool = False) -> Settings:
    try:
        return load_settings(default_grpc_port=default_port, database_optional=database_optional)
    except ConfigError as error:
        raise UsageError(str(error)) from None


def _state_dir() -> Path:
    from shared.running_stack import state_dir_from_env

    return state_dir_from_env(os.environ)


def operator_environ(*, talks_to_servers: bool = True) -> dict[str, str]:
    """This process's environment, completed from a running `cargotrack dev` stack.

    Prints to stderr which Kafka and PostgreSQL the command talks to and where those
    settings came from (with `talks_to_servers=False`, only when the stack's were used).
    """
    from shared.running_stack import redact_url, stack_environment

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
        return load_settings(operator_environ(), default_grpc_port=0)
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
    from shared.early_signals import note_stop_signals
    from shared.runtime import run_service

    # The console script (services/__main__.py) did this before its first import;
    # `python -c "from services.cli import main; main()"` reaches this line first.
    note_stop_signals()  # a SIGTERM from here on drains and exits 0
    spec = SERVICES.get(args.name)
    if spec is None:
        raise UsageError(f"unknown service {args.name!r}; one of: {', '.join(SERVICES)}")
    settings = _settings(spec.default_port, database_optional=spec.database_optional)
    _configure_logging(settings)
    if args.worker is not None:
        try:
            settings = settings.for_worker(args.worker)
        except ValueError as error:
            raise UsageError(f"--worker: {error} (CARGOTRACK_PROCESSES)") from None
    elif settings.processes > 1:
        code = _serve_workers(spec, settings)
        if code:
            sys.exit(code)
        return
    run_service(spec.module, settings)


def _serve_workers(spec: ServiceSpec, settings: Settings) -> int:
    """CARGOTRACK_PROCESSES > 1: the workers of shared/workers.py; their exit status."""
    from shared import workers

    several = sorted(name for name, other in SERVICES.items() if other.several_processes)
    if not spec.several_processes:
        raise UsageError(
            f"CARGOTRACK_PROCESSES={settings.processes}: {spec.name} runs as one process"
            f" (only {' and '.join(several)} run several behind one port); scale it with"
            " replicas, and set CARGOTRACK_PROCESSES on those Deployments only"
        )
    if not workers.supported():
        raise UsageError(
            f"CARGOTRACK_PROCESSES={settings.processes}: several processes behind one port"
            " need Linux (SO_REUSEPORT); run 1 per container elsewhere"
        )
    try:
        return workers.run_workers(
            spec.name, settings, [sys.executable, "-m", "services", "serve", spec.name]
        )
    except OSError as error:
        raise UsageError(str(error)) from None


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

    environ = operator_environ(talks_to_servers=False)
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
    from shared.running_stack import read_running_stack

    stack = read_running_stack(_state_dir())
    if stack is None:
        raise UsageError(
            f"no cargotrack dev is running with state directory {_state_dir()} "
            "(start one with `make up`, or set CARGOTRACK_STATE_DIR to its directory)"
        )
    print(f"# {stack.origin()}")
    print("\n".join(stack.export_lines()))


def cmd_eta_report(args: argparse.Namespace) -> None:
    from shared.eta_report import main as report

    code = report(args.rest, environ=operator_environ())
    if code:
        sys.exit(code)


def _needs_dev_install(name: str) -> Callable[[argparse.Namespace], None]:
    def handler(_args: argparse.Namespace) -> None:
        raise UsageError(
            f"`cargotrack {name}` is a development command, and this install has no"
            f" development package (devtools/, which the image does not carry); {DEV_INSTALL}"
        )

    return handler


def _add_commands_of_other_packages(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """The subcommands of entry-point group COMMAND_GROUP; one that cannot load because
    its package is not installed stays listed and says which install it needs."""
    for entry in entry_points(group=COMMAND_GROUP):
        try:
            add: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] = (
                entry.load()
            )
        except ModuleNotFoundError as error:
            if error.name is None or error.name.split(".")[0] != entry.module.split(".")[0]:
                raise
            missing = commands.add_parser(
                entry.name, help="(needs the development install)", add_help=False
            )
            missing.add_argument("rest", nargs=argparse.REMAINDER)
            missing.set_defaults(handler=_needs_dev_install(entry.name), delegated=True)
        else:
            add(commands)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cargotrack", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    _add_commands_of_other_packages(commands)

    serve = commands.add_parser("serve", help="run one service")
    serve.add_argument("name", choices=sorted(SERVICES))
    # Internal: worker I of CARGOTRACK_PROCESSES, started by the parent (shared/workers.py).
    serve.add_argument("--worker", type=int, metavar="I", help=argparse.SUPPRESS)
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

    accuracy = commands.add_parser(
        "eta-report",
        help="live ETA accuracy on real arrivals, per tenant and horizon (see docs/eta.md)",
        add_help=False,
    )
    accuracy.add_argument("rest", nargs=argparse.REMAINDER)
    # The report parses its own options (shared/eta_report.py build_parser).
    accuracy.set_defaults(handler=cmd_eta_report, delegated=True)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = _subcommands(parser).get(argv[0]) if argv else None
    if command is not None and command.get_default("delegated"):
        # The command parses its own options (`--help` included).
        args = argparse.Namespace(handler=command.get_default("handler"), rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except UsageError as error:
        print(f"cargotrack: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        # Expected failures carry a one-line message (UsageError); anything else is a bug.
        logging.getLogger("cargotrack").exception("failed")
        sys.exit(1)
