"""The development subcommands of `cargotrack`: `dev`, `simulate`, `eta-eval`.

services/cli.py adds them through the entry points of group ``cargotrack.commands``
(pyproject.toml), so the deployable command never imports this package; where the
package is missing (the container image) each of them says in one line which install
it needs. Each entry point is a function that adds its subparser to the `commands`
of `cargotrack`; the handlers import the tooling only when they run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from services.cli import DEV_INSTALL, UsageError, operator_environ
from shared.config import DEV_JWT_SECRET
from shared.logs import configure_logging

if TYPE_CHECKING:
    from devtools.fleet_simulator import SimulatorConfig

__all__ = ["add_dev", "add_eta_eval", "add_simulate"]

Handler = Callable[[argparse.Namespace], None]


def _one_line_errors(handler: Handler) -> Handler:
    """Expected failures of the local stack, and a dev install without its extra, as
    one-line usage errors (exit status 2) instead of tracebacks."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> None:
        from devtools.devstack import DevStackError

        try:
            handler(args)
        except DevStackError as error:
            raise UsageError(str(error)) from None
        except ModuleNotFoundError as error:
            if error.name is None or error.name.split(".")[0] in ("devtools", "services", "shared"):
                raise
            raise UsageError(f"{error.name} is not installed; {DEV_INSTALL}") from None

    return run


def cmd_dev(args: argparse.Namespace) -> None:
    from devtools.launcher import run_dev

    if args.status_every <= 0:
        raise UsageError("--status-every must be a positive number of seconds")
    if args.give_up_after < 1 or args.give_up_window <= 0:
        raise UsageError("--give-up-after must be at least 1 and --give-up-window positive")
    if not args.no_simulator:
        _simulator_config(args)  # a bad option fails before anything starts
    configure_logging("console", "INFO")
    asyncio.run(run_dev(args))


def _simulator_config(args: argparse.Namespace, **overrides: Any) -> SimulatorConfig:
    """The SimulatorConfig of the command line (ValueError → one-line usage error)."""
    from devtools.fleet_simulator import SimulatorConfig

    try:
        return SimulatorConfig(
            seed=args.seed, vehicles=args.vehicles, speedup=args.speedup, **overrides
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def cmd_simulate(args: argparse.Namespace) -> None:
    from devtools.fleet_simulator import Targets
    from devtools.fleet_simulator import run as simulate
    from devtools.launcher import dev_service_ports

    if args.report_every <= 0:
        raise UsageError("--report-every must be a positive number of seconds")
    environ = operator_environ(talks_to_servers=False)
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
    configure_logging("console", "INFO")

    async def main() -> None:
        import signal

        from devtools.fleet_simulator import SimulatorStats

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


def cmd_eta_eval(args: argparse.Namespace) -> None:
    from devtools.eta_eval import main as evaluate

    code = evaluate(args.rest)
    if code:
        raise SystemExit(code)


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


def add_dev(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    dev.set_defaults(handler=_one_line_errors(cmd_dev))


def add_simulate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    simulate.set_defaults(handler=_one_line_errors(cmd_simulate))


def add_eta_eval(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evaluate = commands.add_parser(
        "eta-eval",
        help="score the ETA model on recorded trajectories (see docs/eta.md)",
        add_help=False,
    )
    evaluate.add_argument("rest", nargs=argparse.REMAINDER)
    # The evaluation parses its own options (devtools/eta_eval.py build_parser).
    evaluate.set_defaults(handler=_one_line_errors(cmd_eta_eval), delegated=True)
