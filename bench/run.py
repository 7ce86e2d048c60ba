"""`python -m bench.run`: bring up a dedicated stack, measure, print the table.

    python -m bench.run                 # full run (about 10 minutes)
    python -m bench.run --smoke         # seconds per phase (what CI runs)
    python -m bench.run --profile out/  # also py-spy the services (slower figures)
    python -m bench.run --e2e-seconds 600   # 10-minute soak for the memory verdict

Kafka and PostgreSQL are started in a temporary directory on free ports (or reused
with --kafka / --database-url: then the run uses its own topic prefix and schemas
and drops the schemas afterwards). Every service runs as its own process, started
as `cargotrack serve NAME`. See docs/performance.md for what each row measures.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.phases import Bench, BenchOptions
from bench.profiling import py_spy
from bench.report import Report
from bench.stack import BenchStack, StackOptions


def machine_info() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = int(line.split()[1]) / 1e6
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor(),
        "memory_gb": round(memory_gb, 1),
        "python": platform.python_version(),
        "load_at_start": round(os.getloadavg()[0], 2),
    }


def targets(report: Report) -> list[dict[str, object]]:
    """The issue's targets, judged on this run's figures."""
    e2e = max(
        (r.value for r in report.rows if r.key.startswith("3.e2e.") and r.key.count(".") == 2),
        default=math.nan,
    )
    p99 = report.value("3.latency.p99")
    latency_row = report.get("3.latency.p50")
    at_target = latency_row is not None and "20,000 points/s target" in latency_row.what
    rps = report.value("4.query.rps")
    q99 = report.value("4.query.p99")
    flat = all(not str(m["verdict"]).startswith("yes") for m in report.memory)
    return [
        {
            "target": ">= 100,000 GPS points/s end to end",
            "measured": f"{e2e:,.0f} points/s",
            "met": e2e >= 100_000,
        },
        {
            "target": "p99 receipt-to-state < 100 ms at 20,000 points/s",
            "measured": f"p99 {p99:.0f} ms"
            + ("" if at_target else " (at a lower offered rate: see the row)"),
            "met": at_target and p99 < 100,
        },
        {
            "target": "query >= 3,000 RPS with p99 < 10 ms",
            "measured": f"{rps:,.0f} RPS, p99 {q99:.1f} ms",
            "met": rps >= 3000 and q99 < 10,
        },
        {
            "target": "flat memory under sustained load",
            "measured": "; ".join(
                f"{m['service']} {m['slope_mb_per_min']:+.1f} MB/min" for m in report.memory
            ),
            "met": flat,
        },
    ]


async def run_bench(
    options: BenchOptions,
    *,
    run_dir: Path | None = None,
    bootstrap_servers: str | None = None,
    database_url: str | None = None,
    fsync: bool = True,
    service_environ: dict[str, str] | None = None,
    projectors: int = 1,
) -> Report:
    """Start a stack, run every phase, stop everything; return the finished report."""
    report = Report(machine=machine_info())
    owned_dir = run_dir is None
    directory = Path(tempfile.mkdtemp(prefix="cargotrack-bench-")) if run_dir is None else run_dir
    report.machine["run_dir"] = str(directory)
    stack = BenchStack(
        StackOptions(
            directory,
            bootstrap_servers=bootstrap_servers,
            database_url=database_url,
            fsync=fsync,
            environ=dict(service_environ or {}),
            projectors=projectors,
        )
    )
    started = time.time()
    try:
        async with stack:
            bench = Bench(stack, options, report)
            await bench.run()
            loads = [load for _, load in bench.load_samples]
            report.machine["load_1min_mean_during_run"] = round(sum(loads) / len(loads), 2)
            report.machine["load_1min_max_during_run"] = round(max(loads), 2)
            report.machine["postgres_fsync"] = "on" if fsync else "off"
            report.machine["services"] = ", ".join(stack.services)
            if "dispatch" not in stack.services:
                report.notes.append(
                    "dispatch service not available: alert latency measured to the alerts topic"
                )
    finally:
        if owned_dir and sys.exc_info()[0] is None:
            shutil.rmtree(directory, ignore_errors=True)
    report.machine["wall_s"] = round(time.time() - started)
    report.finish()
    report.targets = targets(report)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--smoke", action="store_true", help="seconds per phase (CI)")
    parser.add_argument("--e2e-seconds", type=float, help="sustained end-to-end phase (60)")
    parser.add_argument("--ingest-seconds", type=float, help="each ingest-only run (15)")
    parser.add_argument("--latency-seconds", type=float, help="fixed-rate latency phase (30)")
    parser.add_argument("--query-seconds", type=float, help="query load (15)")
    parser.add_argument("--rate", type=float, help="latency phase's offered points/s (20000)")
    parser.add_argument("--vehicles", type=int, help="fleet size (2000)")
    parser.add_argument("--streams", type=int, help="concurrent GPS streams (8)")
    parser.add_argument(
        "--e2e-batches", help="batch sizes of the end-to-end runs, comma-separated (500,50)"
    )
    parser.add_argument("--query-concurrency", type=int, help="GetShipment calls in flight (32)")
    parser.add_argument(
        "--query-connections",
        type=at_least_one,
        help="gRPC connections of the GetShipment load (2); the kernel spreads connections,"
        " not calls, over tracking-query's CARGOTRACK_PROCESSES workers",
    )
    parser.add_argument(
        "--query-client", choices=["auto", "ghz", "python"], help="load client for queries"
    )
    parser.add_argument("--no-rebuild", action="store_true", help="skip the rebuild phase")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the services into DIR")
    parser.add_argument("--kafka", help="use this Kafka (bootstrap servers), start none")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of starting one")
    parser.add_argument("--no-fsync", action="store_true", help="PostgreSQL fsync=off")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        type=service_setting,
        help="a CARGOTRACK_ setting for every service (repeatable), e.g. to compare a"
        " setting's two values in two runs; CARGOTRACK_PROCESSES reaches only the services"
        " that run several processes (gps-ingest, tracking-query)",
    )
    parser.add_argument(
        "--projectors",
        type=at_least_one,
        default=1,
        help="projector processes in one consumer group (1); partitions are split among them",
    )
    parser.add_argument("--run-dir", type=Path, help="keep logs and state here")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return parser


def at_least_one(text: str) -> int:
    """A whole number of at least 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def service_setting(text: str) -> tuple[str, str]:
    """NAME=VALUE with a CARGOTRACK_ name (argparse type)."""
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("CARGOTRACK_"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected CARGOTRACK_NAME=VALUE")
    return name, value


def options_from(args: argparse.Namespace) -> BenchOptions:
    options = BenchOptions.smoke_options() if args.smoke else BenchOptions()
    changes: dict[str, object] = {}
    for arg, name in (
        ("e2e_seconds", "e2e_s"),
        ("ingest_seconds", "ingest_s"),
        ("latency_seconds", "latency_s"),
        ("query_seconds", "query_s"),
        ("rate", "rate"),
        ("vehicles", "vehicles"),
        ("streams", "streams"),
        ("query_concurrency", "query_concurrency"),
        ("query_connections", "query_connections"),
        ("query_client", "query_client"),
    ):
        value = getattr(args, arg)
        if value is not None:
            changes[name] = value
    if args.e2e_batches:
        changes["e2e_batches"] = tuple(int(b) for b in args.e2e_batches.split(","))
    if args.no_rebuild:
        changes["rebuild"] = False
    if args.profile is not None:
        changes["profile_dir"] = args.profile.absolute()
    return replace(options, **changes)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.profile is not None and py_spy() is None:
        # Refused before anything starts: a run without the profiles asked for would
        # take minutes and then lack them.
        parser.error(
            "--profile needs py-spy, which is not installed"
            " (`make bootstrap` installs it with the dev extra; or pip install py-spy)"
        )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = asyncio.run(
        run_bench(
            options_from(args),
            run_dir=args.run_dir.absolute() if args.run_dir else None,
            bootstrap_servers=args.kafka,
            database_url=args.database_url,
            fsync=not args.no_fsync,
            service_environ=dict(args.service_env),
            projectors=args.projectors,
        )
    )
    if args.service_env:
        report.machine["service_env"] = " ".join(f"{k}={v}" for k, v in args.service_env)
    print(report.table(markdown=args.markdown))
    if args.json is not None:
        args.json.write_text(report.to_json())
    bad = [r.key for r in report.rows if not math.isfinite(r.value) or r.value <= 0]
    if bad:
        print(f"bench: rows without a positive figure: {', '.join(bad)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
