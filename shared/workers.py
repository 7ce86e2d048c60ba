"""Several worker processes of one service behind one port (CARGOTRACK_PROCESSES).

One Python process runs Python on about one core at a time. With
CARGOTRACK_PROCESSES=N above 1, `cargotrack serve NAME` (for the services that allow
it: `several_processes` in services/registry.py) becomes a parent that runs N worker
processes, each a complete single-process service (`python -m services serve NAME
--worker I`), and supervises them (`run_workers`):

- **One port.** The parent binds the gRPC port (and the health port, if any) first,
  without listening. That resolves port 0 to one port for every worker, fails at once
  with a clear message when anything else holds the port, and keeps the port reserved
  while the workers run. It then allows SO_REUSEPORT on it; every worker binds the same
  port with SO_REUSEPORT (`GrpcSettings.reuse_port`) and listens, and the kernel
  spreads new connections over the listening workers (Linux: by a hash of the
  connection's addresses). A connection stays with one worker for its life, so load
  spreads per connection, not per call. A socket that does not listen never receives
  a connection, so the parent's reservation takes no traffic.
- **Metrics.** Worker I serves its metrics on 127.0.0.1:CARGOTRACK_METRICS_PORT + 1 + I
  (`Settings.for_worker`); the parent serves CARGOTRACK_METRICS_PORT itself and answers
  each scrape with every worker's series, labelled `worker="I"` (`WorkerMetrics`). One
  port shared by the workers would answer each scrape from one worker at random, and
  counters would jump between workers' values.
- **Stop.** SIGTERM or SIGINT to the parent is passed on (as SIGTERM) to every worker,
  which drains as a single-process service does; the parent exits with status 0 once
  every worker exited with 0. A worker still running `CARGOTRACK_SHUTDOWN_GRACE_S` +
  STOP_MARGIN_S after the SIGTERM is killed, and the parent exits with status 1.
- **A worker that ends by itself** (a crash, the kernel's OOM killer, a failed task) is
  reported with its pid and exit status and ends the whole service: the parent drains
  the other workers and exits with status 1, so Kubernetes restarts the container with
  its own back-off, exactly as it restarts a single-process service that fails. There
  is no restart inside the pod: a crash stays visible (restart count, events), and a
  pod never runs on fewer workers than it was given without anyone seeing it.
- **The parent's death**, even by SIGKILL, sends SIGTERM to every worker
  (PR_SET_PDEATHSIG), so no orphan keeps serving on the port.

Workers start with SIGTERM and SIGINT blocked, and unblock them once their handler
is in place (services/__main__.py): a stop while a worker's interpreter is still
starting waits instead of killing it with status 143.

Linux only: elsewhere SO_REUSEPORT does not spread connections (and there are no
pidfds); `cargotrack serve` refuses the setting there.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from shared.config import Settings
from shared.early_signals import STOP_SIGNALS, note_stop_signals, noted_signal

log = logging.getLogger(__name__)

#: Seconds past the drain's grace (CARGOTRACK_SHUTDOWN_GRACE_S) a worker gets to close
#: its resources after SIGTERM before it is killed.
STOP_MARGIN_S = 15.0

#: Seconds the parent waits for one worker's metrics during a scrape.
WORKER_SCRAPE_TIMEOUT_S = 5.0

_PR_SET_PDEATHSIG = 1


def supported() -> bool:
    """Whether this platform runs several workers behind one port (Linux)."""
    return hasattr(os, "pidfd_open") and hasattr(socket, "SO_REUSEPORT")


def reserve_port(host: str, port: int, setting: str) -> socket.socket:
    """A socket bound to host:port (port 0: a free one) that does not listen, and lets
    sockets with SO_REUSEPORT bind the same port from now on.

    It binds before it sets SO_REUSEPORT, so it fails (OSError naming `setting`) when
    anything at all holds the port, even another group of reuse-port sockets such as
    a second `cargotrack serve` with several processes on the same port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    reservation = socket.socket(family, kind, proto)
    try:
        reservation.bind(address)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as error:
        reservation.close()
        raise OSError(f"cannot listen on {host}:{port} ({setting}): {error.strerror}") from error
    return reservation


class WorkerMetrics:
    """A Prometheus collector: the metrics of the workers serving them on 127.0.0.1 at
    `ports` (worker I at ports[I]), each series with the label `worker="I"` added. A
    worker that does not answer (starting, stopping) is missing from that scrape."""

    def __init__(self, ports: Sequence[int]) -> None:
        self.ports = list(ports)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for index, port in enumerate(self.ports):
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=WORKER_SCRAPE_TIMEOUT_S
                ) as reply:
                    text = reply.read().decode()
            except OSError as error:
                log.debug("worker %d's metrics unavailable: %s", index, error)
                continue
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = Metric(family.name, family.documentation, family.type, family.unit)
                    merged[family.name] = into
                for sample in family.samples:
                    into.add_sample(
                        sample.name,
                        {**sample.labels, "worker": str(index)},
                        sample.value,
                        sample.timestamp,
                        sample.exemplar,
                    )
        yield from merged.values()


@dataclass
class Worker:
    """One running worker process and the pidfd that becomes readable when it exits."""

    index: int
    process: subprocess.Popen[bytes]
    pidfd: int

    @property
    def pid(self) -> int:
        return self.process.pid


def describe(returncode: int) -> str:
    """A process's end in words: "exit status 1", "killed by SIGKILL"."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def run_workers(label: str, settings: Settings, command: Sequence[str]) -> int:
    """Run `settings.processes` workers of service `label` until a stop signal or the
    first worker's own end, as the module docstring describes; return the exit status
    for the parent (0: every worker stopped cleanly on request).

    Worker I runs `command + ["--worker", "I"]` with the environment of this process,
    its gRPC (and health) port replaced by the reserved one; with metrics on, this
    process serves them all (`WorkerMetrics`) until the last worker ended. A stop
    signal noted before (`shared.early_signals`) starts no worker. OSError when a port
    cannot be reserved or bound.
    """
    note_stop_signals()
    if noted_signal() is not None:
        log.info("%s: stopped while starting", label)
        return 0
    reservations = [reserve_port(settings.grpc.host, settings.grpc.port, "CARGOTRACK_GRPC_PORT")]
    environ = dict(os.environ)
    environ["CARGOTRACK_GRPC_PORT"] = str(reservations[0].getsockname()[1])
    if settings.grpc.health_port is not None:
        reservations.append(
            reserve_port(
                settings.grpc.host, settings.grpc.health_port, "CARGOTRACK_GRPC_HEALTH_PORT"
            )
        )
        environ["CARGOTRACK_GRPC_HEALTH_PORT"] = str(reservations[1].getsockname()[1])
    metrics_server = None
    if settings.metrics_port:
        registry = CollectorRegistry(auto_describe=False)
        ports = [settings.for_worker(i).metrics_port for i in range(settings.processes)]
        registry.register(WorkerMetrics(ports))
        try:
            metrics_server, _ = start_http_server(
                settings.metrics_port, settings.grpc.host, registry
            )
        except OSError as error:
            for reservation in reservations:
                reservation.close()
            raise OSError(
                f"cannot serve metrics on {settings.grpc.host}:{settings.metrics_port}"
                f" (CARGOTRACK_METRICS_PORT): {error.strerror or error}"
            ) from error
    # A signal writes a byte here, which wakes the select() below.
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous_wakeup = signal.set_wakeup_fd(wake_write)
    workers: list[Worker] = []
    try:
        for index in range(settings.processes):
            if noted_signal() is not None:
                break
            workers.append(_spawn(index, command, environ))
        log.info(
            "%s: %d worker processes on %s:%s, pids %s",
            label,
            len(workers),
            settings.grpc.host,
            environ["CARGOTRACK_GRPC_PORT"],
            " ".join(str(worker.pid) for worker in workers),
        )
        return _supervise(label, settings, workers, wake_read)
    finally:
        for worker in workers:
            if worker.process.returncode is None:  # only after an error of our own
                worker.process.kill()
                worker.process.wait()
            os.close(worker.pidfd)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_read)
        os.close(wake_write)
        for reservation in reservations:
            reservation.close()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()


def _die_with_parent(parent: int) -> None:
    """In the worker, between fork and exec: SIGTERM when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _spawn(index: int, command: Sequence[str], environ: dict[str, str]) -> Worker:
    parent = os.getpid()
    # Blocked across the fork and exec: inherited by the worker, whose entry point
    # unblocks them once its handler is in place. Here, a signal waits for the
    # unblock below and then reaches note_stop_signals' handler.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        process = subprocess.Popen(
            [*command, "--worker", str(index)],
            env=environ,
            # The parent runs no threads, so preexec_fn is safe here.
            preexec_fn=lambda: _die_with_parent(parent),
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return Worker(index, process, os.pidfd_open(process.pid))


def _supervise(label: str, settings: Settings, workers: list[Worker], wake: int) -> int:
    running = {worker.pidfd: worker for worker in workers}
    failed = False
    stopping = False
    deadline: float | None = None

    def stop_all() -> None:
        nonlocal stopping, deadline
        stopping = True
        deadline = time.monotonic() + settings.grpc.shutdown_grace_s + STOP_MARGIN_S
        for worker in running.values():
            worker.process.send_signal(signal.SIGTERM)

    while running:
        noted = noted_signal()
        if not stopping and noted is not None:
            log.info("%s: %s: stopping %d workers", label, signal.Signals(noted).name, len(running))
            stop_all()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([wake, *running], [], [], timeout)
        if wake in ready:
            while True:
                try:
                    os.read(wake, 512)
                except BlockingIOError:
                    break
        for pidfd in ready:
            worker = running.pop(pidfd, None)
            if worker is None:
                continue
            code = worker.process.wait()
            if stopping:
                failed = failed or code != 0
                log.log(
                    logging.INFO if code == 0 else logging.ERROR,
                    "%s: worker %d (pid %d) stopped: %s",
                    label,
                    worker.index,
                    worker.pid,
                    describe(code),
                )
                continue
            failed = True
            log.error(
                "%s: worker %d (pid %d) ended by itself (%s): stopping the other workers;"
                " the service exits with status 1, to be restarted",
                label,
                worker.index,
                worker.pid,
                describe(code),
            )
            stop_all()
        if deadline is not None and running and time.monotonic() >= deadline:
            log.error(
                "%s: workers %s still running %.0f s after SIGTERM: killed",
                label,
                " ".join(str(worker.pid) for worker in running.values()),
                settings.grpc.shutdown_grace_s + STOP_MARGIN_S,
            )
            for worker in running.values():
                worker.process.kill()
            failed = True
            deadline = None  # killed: they end at once
    return 1 if failed else 0
