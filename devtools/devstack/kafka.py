"""Apache Kafka (KRaft) for dev and tests: one node, or a cluster of several.

:class:`KafkaBroker` is one node, broker and KRaft controller in one process.
:class:`KafkaCluster` is several such nodes whose controllers form one quorum (every
node a voter), with replicated internal topics: what a replicated production
cluster looks like, small enough for a laptop (``CARGOTRACK_KAFKA_BROKERS=3``).

The jars come from Maven Central through ``mvn`` (see ``kafka-pom.xml``) into a
cache outside the repository, and run on the machine's Java 17+. No Docker, no tarball.

Layout of a broker's state directory::

    server.properties   generated at every start
    log4j2.properties   copied from this package at every start
    broker.log          the broker's stdout/stderr (truncated by the first start of a
                        KafkaBroker object, appended to by its restarts)
    format.log          output of the last ``StorageTool format``
    data/               log.dirs (topic data and the KRaft metadata log)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import importlib.resources
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.metadata import MetadataRequest

from devtools.devstack.errors import DevStackError
from devtools.devstack.ports import (
    KAFKA_CONTROLLER_PORT_ENV,
    KAFKA_PORT_ENV,
    LOCALHOST,
    ensure_port_free,
    free_ports,
)
from devtools.devstack.process import (
    ChildProcess,
    ServerProcess,
    ensure_writable_dir,
    log_tail,
    run_command,
    start_all,
    stop_all,
)
from shared.lifecycle import Lifecycle

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_KAFKA_VERSION",
    "DEFAULT_LOG4J_VERSION",
    "KafkaBroker",
    "KafkaCluster",
    "PartitionState",
    "default_cache_dir",
    "ensure_kafka_jars",
    "find_java",
]

_log = logging.getLogger(__name__)

DEFAULT_KAFKA_VERSION = "4.1.1"
# Kafka 4.0/4.1 log through slf4j 1.7, bound by log4j-slf4j-impl 2.24.x (4.2 uses 2.25.x).
DEFAULT_LOG4J_VERSION = "2.24.3"
CACHE_DIR_ENV = "CARGOTRACK_CACHE_DIR"

_MIN_JAVA = 17
_INSTALL_JAVA = "install a Java 17+ runtime: apt-get install openjdk-17-jre-headless"
_COMPLETE_MARKER = "COMPLETE"
_MAVEN_TIMEOUT = 900.0
_FORMAT_TIMEOUT = 120.0
_NODE_ID = 1

_java_majors: dict[str, int] = {}


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$CARGOTRACK_CACHE_DIR``, else ``~/.cache/cargotrack`` (never inside the repository)."""
    configured = environ.get(CACHE_DIR_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "cargotrack"


def _java_major(version_output: str) -> int | None:
    """The major version in ``java -version`` output (``"1.8.0_x"`` is 8), else None."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:
        return int(match.group(2))
    return major


async def find_java() -> str:
    """Path of a Java 17+ ``java``: ``$JAVA_HOME/bin/java`` if set, else ``java`` on PATH.

    Raises :class:`DevStackError` naming the package to install when there is none or
    it is too old. The version check runs once per executable per process.
    """
    java_home = os.environ.get("JAVA_HOME", "").strip()
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate is not None and candidate.is_file() else shutil.which("java")
    if java is None:
        raise DevStackError(f"no `java` on PATH — {_INSTALL_JAVA}")
    if java not in _java_majors:
        try:
            result = await asyncio.to_thread(
                subprocess.run,
                [java, "-version"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DevStackError(
                f"could not run {java} -version ({err}) — {_INSTALL_JAVA}"
            ) from None
        major = _java_major(result.stdout)
        if major is None:
            raise DevStackError(
                f"could not read the version of {java} ({_text_tail(result.stdout)}) "
                f"— {_INSTALL_JAVA}"
            )
        _java_majors[java] = major
    if _java_majors[java] < _MIN_JAVA:
        raise DevStackError(
            f"{java} is Java {_java_majors[java]}, Kafka 4 needs {_MIN_JAVA}+ — {_INSTALL_JAVA} "
            "(or point JAVA_HOME at one)"
        )
    return java


def _text_tail(text: str, lines: int = 3) -> str:
    """The last non-empty ``lines`` lines of ``text`` joined by ``" | "``."""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


async def _lock_file(path: Path, time_limit: float) -> int:
    """Take an exclusive ``flock`` on ``path`` without blocking the event loop; return the fd.

    Serialises jar fetches between processes (pytest-xdist workers, two terminals).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + time_limit
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise DevStackError(
                    f"timed out waiting for another process fetching Kafka jars (lock {path})"
                ) from None
            await asyncio.sleep(0.2)
        except BaseException:
            os.close(fd)
            raise


async def ensure_kafka_jars(
    version: str = DEFAULT_KAFKA_VERSION,
    *,
    log4j_version: str = DEFAULT_LOG4J_VERSION,
    cache_dir: Path | None = None,
) -> Path:
    """Return ``<cache>/kafka/<version>/libs`` holding every jar the broker needs.

    Runs ``mvn dependency:copy-dependencies`` only when the directory lacks its
    ``COMPLETE`` marker. The jars are copied to a temporary directory, moved into place,
    and only then is the marker written, so an interrupted fetch is redone next time and
    a reader never sees a partial ``libs``. Concurrent callers (even in other processes)
    fetch once. Raises :class:`DevStackError` when ``mvn`` is missing or fails.
    """
    base = (cache_dir or default_cache_dir()) / "kafka" / version
    libs = base / "libs"

    def complete() -> bool:
        # The marker alone is not trusted: someone may have emptied libs/ by hand.
        return (base / _COMPLETE_MARKER).is_file() and (libs / _core_jar(version)).is_file()

    if complete():
        return libs
    ensure_writable_dir(base, "jar cache")
    fd = await _lock_file(base / ".lock", time_limit=_MAVEN_TIMEOUT)
    try:
        if complete():  # another process fetched while we waited for the lock
            return libs
        await _fetch_jars(base, version, log4j_version)
        return libs
    finally:
        os.close(fd)  # releases the flock


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAVEN_BOILERPLATE = ("-e switch", "-X switch", "For more information", "[Help 1] http")


def _maven_problem(output: str) -> str:
    """The informative ``[ERROR]`` lines of Maven's output (not its generic advice)."""
    errors = []
    for raw in _ANSI.sub("", output).splitlines():
        line = raw.strip()
        if not line.startswith("[ERROR]") or any(b in line for b in _MAVEN_BOILERPLATE):
            continue
        line = line.removeprefix("[ERROR]").replace("-> [Help 1]", "").strip()
        if line:
            errors.append(line)
    return " | ".join(errors[:2]) or _text_tail(output) or "no output"


def _core_jar(version: str) -> str:
    return f"kafka_2.13-{version}.jar"


async def _fetch_jars(base: Path, version: str, log4j_version: str) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevStackError(
            f"no `mvn` on PATH (needed once to fetch the Kafka {version} jars) "
            "— apt-get install maven"
        )
    libs = base / "libs"
    (base / _COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(libs, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="fetch.", dir=base))
    try:
        pom_template = (
            importlib.resources.files("devtools.devstack").joinpath("kafka-pom.xml").read_text()
        )
        pom = work / "pom.xml"
        pom.write_text(
            pom_template.replace("@KAFKA_VERSION@", version).replace(
                "@LOG4J_VERSION@", log4j_version
            )
        )
        out = work / "libs"
        log_path = base / "mvn.log"
        _log.info("fetching Kafka %s jars with Maven into %s", version, libs)
        started = time.monotonic()
        code = await run_command(
            [
                mvn,
                "-B",
                "-q",
                # Retry resolutions that failed before (a past network outage is cached
                # in ~/.m2 and would otherwise fail every fetch for a day).
                "-U",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={out}",
            ],
            name="mvn dependency:copy-dependencies",
            log_path=log_path,
            time_limit=_MAVEN_TIMEOUT,
            cwd=work,
        )
        if code != 0:
            text = log_path.read_text(errors="replace") if log_path.is_file() else ""
            raise DevStackError(
                f"Maven could not fetch the Kafka {version} jars (exit {code}): "
                f"{_maven_problem(text)}; check network access and Maven settings "
                f"(~/.m2/settings.xml); full output: {log_path}"
            )
        if not (out / _core_jar(version)).is_file():
            raise DevStackError(
                f"Maven finished but did not copy {_core_jar(version)}; see {log_path}"
            )
        out.rename(libs)
        jars = sorted(p.name for p in libs.glob("*.jar"))
        (base / _COMPLETE_MARKER).write_text("\n".join(jars) + "\n")
        _log.info("fetched %d Kafka jars in %.1f s", len(jars), time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (22 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")


def _read_cluster_id(meta: Path) -> str | None:
    """``cluster.id`` from a formatted log directory's ``meta.properties``, else None."""
    try:
        for line in meta.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "cluster.id":
                return value.strip()
    except OSError:
        return None
    return None


class KafkaBroker(ServerProcess):
    """One Apache Kafka broker + KRaft controller process on 127.0.0.1.

    Lifecycle guarantees:

    * :meth:`start` returns only once a client completed a metadata round trip with
      this broker (same cluster id, broker registered), so topics can be created and
      produced to at once. It is a no-op while the broker runs. If it fails or is
      cancelled, whatever it launched is killed before the exception propagates.
    * The ports are chosen at the first start (free ones unless given) and kept by
      every later start, so clients can reconnect after :meth:`stop`/:meth:`start`.
    * :meth:`stop` (SIGTERM, then SIGKILL after ``stop_timeout``) and :meth:`kill`
      (SIGKILL, a crash) are idempotent and return once the JVM is gone.
    * Each start formats a fresh, empty log directory unless ``keep_data=True``, which
      reuses the existing one (and its cluster id) — for restart and crash tests.
    * :meth:`pause` (SIGSTOP) freezes the JVM as a long GC pause or a hung host would:
      its sockets stay open, nothing answers. :meth:`resume` (SIGCONT) thaws it;
      :meth:`stop` resumes a paused broker first, so its SIGTERM is acted on.

    Alone (the defaults) it is node 1 and the only voter of its quorum. As a member
    of a :class:`KafkaCluster` it gets its ``node_id``, the quorum's ``quorum_voters``
    and the ``cluster_id`` every member is formatted with.
    """

    def __init__(
        self,
        state_dir: Path,
        version: str = DEFAULT_KAFKA_VERSION,
        port: int | None = None,
        *,
        controller_port: int | None = None,
        log4j_version: str = DEFAULT_LOG4J_VERSION,
        cache_dir: Path | None = None,
        heap: str = "512m",
        extra_properties: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        node_id: int = _NODE_ID,
        quorum_voters: str | None = None,
        cluster_id: str | None = None,
    ) -> None:
        """``quorum_voters`` is ``controller.quorum.voters`` (``id@host:port,...``); None
        makes this node the only voter. ``cluster_id``, when given, is the id a fresh
        log directory is formatted with (a cluster's members share it); kept data
        with another id is refused."""
        super().__init__(state_dir, stop_timeout)
        self._version = version
        self._port = port
        self._controller_port = controller_port
        self._log4j_version = log4j_version
        self._cache_dir = cache_dir
        self._heap = heap
        self._extra_properties = dict(extra_properties or {})
        self._start_timeout = start_timeout
        self._node_id = node_id
        self._quorum_voters = quorum_voters
        self._fixed_cluster_id = cluster_id
        self._cluster_id: str | None = None
        self._starts = 0
        self._paused = False

    # -- properties ---------------------------------------------------------------

    @property
    def version(self) -> str:
        """The Apache Kafka version run."""
        return self._version

    @property
    def state_dir(self) -> Path:
        """Directory holding the configuration, the log and the data of this broker."""
        return self._state_dir

    @property
    def log_path(self) -> Path:
        """The broker's stdout/stderr log."""
        return self._state_dir / "broker.log"

    @property
    def port(self) -> int | None:
        """The client (PLAINTEXT) port; None until chosen by the first start."""
        return self._port

    @property
    def controller_port(self) -> int | None:
        """The KRaft controller port; None until chosen by the first start."""
        return self._controller_port

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:<port>``. Raises RuntimeError before the port is known."""
        if self._port is None:
            raise RuntimeError("KafkaBroker: port not chosen yet, call start() first")
        return f"{LOCALHOST}:{self._port}"

    @property
    def cluster_id(self) -> str | None:
        """The KRaft cluster id of the current data directory; None before a start."""
        return self._cluster_id

    @property
    def node_id(self) -> int:
        """This node's ``node.id`` (broker and controller id alike)."""
        return self._node_id

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume` (or the process's end)."""
        return self._paused and self.running

    # -- faults: freeze and thaw ------------------------------------------------------

    def pause(self) -> None:
        """SIGSTOP the broker: it keeps its sockets and answers nothing until resumed.

        Raises RuntimeError when it is not running.
        """
        if self._proc is None or not self._proc.running:
            raise RuntimeError(f"Kafka node {self._node_id} is not running: nothing to pause")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused broker; a no-op when it is not paused."""
        if self._paused and self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    async def stop(self) -> None:
        """Stop gracefully (resuming a paused broker first); see :class:`ServerProcess`."""
        self.resume()
        await super().stop()

    async def kill(self) -> None:
        """SIGKILL (a crash), paused or not; returns once the JVM is gone. Idempotent."""
        await super().kill()
        self._paused = False

    # -- lifecycle: start/stop/kill/restart/async with come from ServerProcess ------

    _stop_signal = signal.SIGTERM
    _default_keep_data = False  # a fresh log directory per start unless asked

    async def _start(self, keep_data: bool) -> None:
        java = await find_java()
        ensure_writable_dir(self._state_dir, "Kafka state")
        if self._port is None or self._controller_port is None:
            taken = {p for p in (self._port, self._controller_port) if p is not None}
            candidates = [p for p in free_ports(3) if p not in taken]
            if self._port is None:
                self._port = candidates.pop(0)
            if self._controller_port is None:
                self._controller_port = candidates.pop(0)
        self._check_ports()

        libs = await ensure_kafka_jars(
            self._version, log4j_version=self._log4j_version, cache_dir=self._cache_dir
        )
        classpath = f"{libs}{os.sep}*"
        properties = self._state_dir / "server.properties"
        log4j = self._state_dir / "log4j2.properties"
        data = self._state_dir / "data"
        log4j.write_text(
            importlib.resources.files("devtools.devstack").joinpath("log4j2.properties").read_text()
        )
        properties.write_text(self._server_properties(data))
        jvm = [
            java,
            f"-Dlog4j2.configurationFile={log4j}",
            f"-Dkafka.logs.dir={self._state_dir}",
            "-Djava.awt.headless=true",
        ]

        cluster_id = _read_cluster_id(data / "meta.properties") if keep_data else None
        if cluster_id is not None and self._fixed_cluster_id not in (None, cluster_id):
            raise DevStackError(
                f"the Kafka log in {data} belongs to cluster {cluster_id}, not to "
                f"{self._fixed_cluster_id}: start the cluster without keeping data"
            )
        if cluster_id is None:
            shutil.rmtree(data, ignore_errors=True)
            cluster_id = self._fixed_cluster_id or _new_cluster_id()
            await self._format(jvm, classpath, properties, cluster_id)
        self._cluster_id = cluster_id
        self._paused = False

        self._check_ports()  # again: the jar fetch may have taken a while
        self._proc = ChildProcess.spawn(
            [
                *jvm,
                f"-Xmx{self._heap}",
                # A broker that ran out of heap is useless; exit so start()/tests see it.
                "-XX:+ExitOnOutOfMemoryError",
                "-cp",
                classpath,
                "kafka.Kafka",
                str(properties),
            ],
            name=f"Kafka {self._version} node {self._node_id}",
            log_path=self.log_path,
            append_log=self._starts > 0,
            cwd=self._state_dir,
        )
        self._starts += 1
        started = time.monotonic()
        await self._wait_ready(self._proc)
        _log.info(
            "Kafka %s node %d ready on %s in %.1f s (pid %d, log %s)",
            self._version,
            self._node_id,
            self.bootstrap_servers,
            time.monotonic() - started,
            self._proc.pid,
            self.log_path,
        )

    def _check_ports(self) -> None:
        assert self._port is not None
        assert self._controller_port is not None
        ensure_port_free(self._port, what="Kafka", env_var=KAFKA_PORT_ENV)
        ensure_port_free(
            self._controller_port, what="Kafka controller", env_var=KAFKA_CONTROLLER_PORT_ENV
        )

    def _server_properties(self, data: Path) -> str:
        voters = self._quorum_voters or f"{self._node_id}@{LOCALHOST}:{self._controller_port}"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self._node_id),
            "controller.quorum.voters": voters,
            "listeners": (
                f"PLAINTEXT://{LOCALHOST}:{self._port},CONTROLLER://{LOCALHOST}:"
                f"{self._controller_port}"
            ),
            # Advertise the loopback address itself: clients connect to exactly this.
            "advertised.listeners": f"PLAINTEXT://{LOCALHOST}:{self._port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            # One node: every internal topic has a single replica (a KafkaCluster
            # overrides these through extra_properties).
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Small and fast to start: few internal partitions, no rebalance delay,
            # a 2 MiB cleaner buffer instead of the default 128 MiB of heap.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.cleaner.dedupe.buffer.size": "2097152",
            "num.network.threads": "2",
            "num.io.threads": "2",
            # After a crash (kill()) the controller refuses the restarted broker's
            # registration until the dead incarnation's session expires: 9 s by default.
            # Six missed 500 ms heartbeats is still far from a false fencing on one host.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
        }
        props.update(self._extra_properties)
        header = "# Generated by devtools/devstack/kafka.py at every start; edits are lost.\n"
        return header + "".join(f"{key}={value}\n" for key, value in props.items())

    async def _format(self, jvm: list[str], classpath: str, properties: Path, cid: str) -> None:
        log_path = self._state_dir / "format.log"
        code = await run_command(
            [
                *jvm,
                "-Xmx256m",
                # A short-lived tool: the C1 compiler alone starts it faster.
                "-XX:TieredStopAtLevel=1",
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "-c",
                str(properties),
                # With "=": a generated id may start with "-" and read as an option.
                f"--cluster-id={cid}",
            ],
            name="Kafka StorageTool format",
            log_path=log_path,
            time_limit=_FORMAT_TIMEOUT,
            cwd=self._state_dir,
        )
        if code != 0:
            raise DevStackError(
                f"formatting the Kafka log directory failed (exit {code}): "
                f"{log_tail(log_path, lines=2)}; full output: {log_path}"
            )

    async def _wait_ready(self, proc: ChildProcess) -> None:
        """Poll until metadata lists this node; fail early if the JVM exits.

        "Port open" is not enough: the listener binds before the broker has caught up
        with the metadata log and been unfenced, and until then metadata does not list
        it (metadata lists unfenced brokers only). In a cluster the other members may
        be listed long before this one is.
        """
        deadline = time.monotonic() + self._start_timeout
        last_problem = "no answer yet"
        while True:
            if not proc.running:
                raise DevStackError(
                    f"Kafka broker exited during start (exit code {proc.returncode}): "
                    f"{log_tail(self.log_path, lines=2)}; full log: {self.log_path}"
                )
            if time.monotonic() >= deadline:
                raise DevStackError(
                    f"Kafka broker not ready within {self._start_timeout:.0f} s "
                    f"({last_problem}); full log: {self.log_path}"
                )
            if await self._port_accepts():
                try:
                    async with asyncio.timeout(10):
                        info = await self._describe_cluster()
                except Exception as err:  # any client error means "not yet"
                    last_problem = f"{type(err).__name__}: {err}"
                else:
                    answered_id = info.get("cluster_id")
                    if answered_id is not None and answered_id != self._cluster_id:
                        raise DevStackError(
                            f"another Kafka (cluster {answered_id}) answers on port "
                            f"{self._port} — stop it or set {KAFKA_PORT_ENV} to a free port"
                        )
                    listed = {broker.get("node_id") for broker in info.get("brokers") or ()}
                    if self._node_id in listed:
                        return
                    last_problem = f"node {self._node_id} not registered yet (listed: {listed})"
            await asyncio.sleep(0.1)

    async def _port_accepts(self) -> bool:
        try:
            async with asyncio.timeout(1):
                _, writer = await asyncio.open_connection(LOCALHOST, self._port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _describe_cluster(self) -> dict[str, Any]:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000
        )
        try:
            await admin.start()
            info: dict[str, Any] = await admin.describe_cluster()
            return info
        finally:
            await admin.close()


@dataclass(frozen=True)
class PartitionState:
    """One partition as the cluster's metadata describes it (node ids; leader -1: none)."""

    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]

    @property
    def fully_replicated(self) -> bool:
        """A leader, and every replica in sync."""
        return self.leader >= 0 and set(self.isr) == set(self.replicas)


class KafkaCluster(Lifecycle):
    """``brokers`` Kafka nodes on 127.0.0.1, each broker + KRaft controller, one quorum.

    The simplest shape that survives losing any one node: every node is a combined
    broker and controller, and all of them are voters of the metadata quorum (3 nodes:
    a majority of 2 keeps the quorum). Topics created without an explicit replication
    factor, and the internal topics (consumer offsets, transaction state), get
    replication factor ``min(3, brokers)`` and ``min.insync.replicas`` one less, so
    with three nodes an ``acks=all`` write is on at least two of them.

    Memory: each node runs with ``-Xmx{heap}`` (512 MiB by default) and about 200 MiB
    more outside the heap (metaspace, threads, buffers); three nodes take 2-2.5 GB.

    Guarantees:

    * The ports (client and controller, for each node) are chosen when the object is
      made, free ones unless ``port``/``controller_port`` are given (then node ``i``
      uses ``port + 2*i`` and ``controller_port + 2*i``), and kept by every start.
    * :meth:`start` starts every node concurrently (a lone node cannot elect a
      controller) and returns once each is registered and unfenced; if any fails or
      the start is cancelled, every node is killed before the error propagates. A
      no-op while all nodes run. ``keep_data=True`` keeps each node's log (and the
      cluster id); ``False`` formats every node afresh with a new shared id.
    * :meth:`stop` stops every node gracefully and concurrently (paused ones are
      resumed first); :meth:`kill` SIGKILLs all. Both are idempotent.
    * Single nodes are reached with :meth:`node` (``stop``, ``kill``, ``pause``,
      ``resume``, ``restart``, ``start(keep_data=True)``): the faults of the cluster
      fault suite. :meth:`leader_of` and :meth:`wait_fully_replicated` read the
      metadata from a running, unpaused node.
    """

    def __init__(
        self,
        state_dir: Path,
        brokers: int = 3,
        version: str = DEFAULT_KAFKA_VERSION,
        port: int | None = None,
        *,
        controller_port: int | None = None,
        heap: str = "512m",
        cache_dir: Path | None = None,
        start_timeout: float = 180.0,
        stop_timeout: float = 30.0,
    ) -> None:
        """``start_timeout`` is per node: three JVMs starting at once on two busy cores
        took up to 76 s each (measured)."""
        if brokers < 2:
            raise ValueError(
                f"a KafkaCluster has at least 2 nodes (got {brokers}); use KafkaBroker"
            )
        self._state_dir = Path(state_dir).absolute()
        self._version = version
        if port is None or controller_port is None:
            chosen = free_ports(2 * brokers)
            clients = [port + 2 * i for i in range(brokers)] if port else chosen[:brokers]
            controllers = (
                [controller_port + 2 * i for i in range(brokers)]
                if controller_port
                else chosen[brokers:]
            )
        else:
            clients = [port + 2 * i for i in range(brokers)]
            controllers = [controller_port + 2 * i for i in range(brokers)]
        self.replication_factor = min(3, brokers)
        """Replication factor of the internal topics, and the default of new topics."""
        self.min_insync_replicas = self.replication_factor - 1
        """``min.insync.replicas`` of the internal topics, and the brokers' default."""
        voters = ",".join(
            f"{node}@{LOCALHOST}:{controllers[node - 1]}" for node in range(1, brokers + 1)
        )
        self._cluster_id = _new_cluster_id()
        replication = {
            "default.replication.factor": str(self.replication_factor),
            "min.insync.replicas": str(self.min_insync_replicas),
            "offsets.topic.replication.factor": str(self.replication_factor),
            "transaction.state.log.replication.factor": str(self.replication_factor),
            "transaction.state.log.min.isr": str(self.min_insync_replicas),
            "share.coordinator.state.topic.replication.factor": str(self.replication_factor),
            "share.coordinator.state.topic.min.isr": str(self.min_insync_replicas),
            # Never elect an out-of-sync replica: that would drop acknowledged writes.
            "unclean.leader.election.enable": "false",
        }
        self.brokers: list[KafkaBroker] = [
            KafkaBroker(
                self._state_dir / f"node-{node}",
                version,
                clients[node - 1],
                controller_port=controllers[node - 1],
                cache_dir=cache_dir,
                heap=heap,
                extra_properties=replication,
                start_timeout=start_timeout,
                stop_timeout=stop_timeout,
                node_id=node,
                quorum_voters=voters,
                cluster_id=self._cluster_id,
            )
            for node in range(1, brokers + 1)
        ]
        """The nodes, node id ``i`` at index ``i - 1``."""

    @property
    def version(self) -> str:
        """The Apache Kafka version run."""
        return self._version

    @property
    def bootstrap_servers(self) -> str:
        """Every node's client address, comma-separated (clients need one that is up)."""
        return ",".join(broker.bootstrap_servers for broker in self.brokers)

    @property
    def running(self) -> bool:
        """True while every node's process is up (paused ones count as up)."""
        return all(broker.running for broker in self.brokers)

    def node(self, node_id: int) -> KafkaBroker:
        """The node with that ``node.id`` (1-based). KeyError for an unknown id."""
        if not 1 <= node_id <= len(self.brokers):
            raise KeyError(f"no Kafka node {node_id} (nodes 1..{len(self.brokers)})")
        return self.brokers[node_id - 1]

    def topic_env(self) -> dict[str, str]:
        """The settings that give cargotrack's topics this cluster's replication."""
        return {
            "CARGOTRACK_TOPIC_REPLICATION_FACTOR": str(self.replication_factor),
            "CARGOTRACK_TOPIC_MIN_INSYNC_REPLICAS": str(self.min_insync_replicas),
        }

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, *, keep_data: bool = False) -> None:
        """Start every node that is not running, concurrently; see the class guarantees."""
        if not keep_data:
            # Fresh logs: a new id, so that a node can never rejoin an old cluster's log.
            self._cluster_id = _new_cluster_id()
            for broker in self.brokers:
                broker._fixed_cluster_id = self._cluster_id
        else:
            kept = {
                _read_cluster_id(broker.state_dir / "data" / "meta.properties")
                for broker in self.brokers
            } - {None}
            if len(kept) > 1:
                raise DevStackError(
                    f"the Kafka nodes in {self._state_dir} hold logs of different clusters "
                    f"({', '.join(sorted(str(k) for k in kept))}): start without keeping data"
                )
            if kept:
                self._cluster_id = str(kept.pop())
                for broker in self.brokers:
                    broker._fixed_cluster_id = self._cluster_id
        await start_all(
            {
                f"kafka-{broker.node_id}": broker.start(keep_data=keep_data)
                for broker in self.brokers
                if not broker.running
            },
            undo=self.kill,
        )
        _log.info("Kafka cluster of %d nodes ready: %s", len(self.brokers), self.bootstrap_servers)

    async def stop(self) -> None:
        """Stop every node gracefully, all at once (paused ones resumed first). Idempotent.

        All at once, because a node's controlled shutdown needs an active controller:
        stopped one after another, the last one finds no quorum and waits out its stop
        timeout (30 s) before it is killed. Together, each asks while the quorum is up.
        """
        await stop_all([broker.stop() for broker in self.brokers])

    async def kill(self) -> None:
        """SIGKILL every node. Idempotent."""
        await asyncio.gather(*(broker.kill() for broker in self.brokers))

    # -- metadata -----------------------------------------------------------------

    def _reachable(self) -> list[KafkaBroker]:
        return [b for b in self.brokers if b.running and not b.paused]

    async def partitions(
        self, topics: list[str] | None = None
    ) -> dict[tuple[str, int], PartitionState]:
        """(topic, partition) -> state, for ``topics`` (None: every topic, internal
        ones included), as a running, unpaused node's metadata says.

        Raises DevStackError when no node answers.
        """
        problems = []
        for broker in self._reachable():
            admin = AIOKafkaAdminClient(
                bootstrap_servers=broker.bootstrap_servers, request_timeout_ms=5000
            )
            try:
                async with asyncio.timeout(10):
                    await admin.start()
                    # Ask this very node: the admin client would pick a random one,
                    # which may be the paused or the dead one.
                    response = await admin._client.send(broker.node_id, MetadataRequest(topics))
            except Exception as err:  # this node does not answer: try the next
                problems.append(f"node {broker.node_id}: {type(err).__name__}: {err}")
                continue
            finally:
                await admin.close()
            found: dict[tuple[str, int], PartitionState] = {}
            for topic in response.to_object()["topics"]:
                for partition in topic["partitions"]:
                    found[(topic["topic"], partition["partition"])] = PartitionState(
                        partition["leader"], tuple(partition["replicas"]), tuple(partition["isr"])
                    )
            return found
        raise DevStackError(f"no Kafka node answered a metadata request: {problems}")

    async def leader_of(self, topic: str, partition: int, timeout_s: float = 30.0) -> KafkaBroker:
        """The node leading that partition, waiting until its leader is a node that is
        up and not paused (after a kill or a pause: until the controller moved it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = (await self.partitions([topic])).get((topic, partition))
            leader = self.node(state.leader) if state is not None and state.leader > 0 else None
            if leader is not None and leader.running and not leader.paused:
                return leader
            if time.monotonic() >= deadline:
                raise DevStackError(f"{topic}[{partition}] has no live leader: {state}")
            await asyncio.sleep(0.2)

    async def wait_fully_replicated(self, timeout_s: float = 120.0) -> None:
        """Until every partition of every topic has a leader and all replicas in sync.

        What a rolling restart waits for between two nodes: restarting the next one
        before its partners caught up would leave partitions below min.insync.replicas
        (writes refused) or with no in-sync replica at all (offline).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            behind: dict[tuple[str, int], PartitionState] = {}
            with contextlib.suppress(DevStackError):
                states = await self.partitions()
                behind = {tp: s for tp, s in states.items() if not s.fully_replicated}
                if not behind:  # no topic at all counts: nothing to catch up
                    return
            if time.monotonic() >= deadline:
                raise DevStackError(
                    f"Kafka partitions not fully replicated within {timeout_s:.0f} s: "
                    f"{dict(list(behind.items())[:5])}"
                )
            await asyncio.sleep(0.25)
