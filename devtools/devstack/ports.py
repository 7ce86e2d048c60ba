"""TCP ports of the local stack: fixed defaults for ``cargotrack dev``, free ones for tests.

The environment variable names that move the dev ports are declared here, once, so the
error messages and the settings parser agree on them.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection, Mapping
from pathlib import Path

from devtools.devstack.errors import DevStackError

__all__ = [
    "DEFAULT_KAFKA_CONTROLLER_PORT",
    "DEFAULT_KAFKA_PORT",
    "DEFAULT_POSTGRES_PORT",
    "KAFKA_CONTROLLER_PORT_ENV",
    "KAFKA_PORT_ENV",
    "LOCALHOST",
    "POSTGRES_PORT_ENV",
    "ensure_port_free",
    "ephemeral_ports",
    "free_port_range",
    "free_ports",
    "port_from_env",
    "port_in_use",
]

LOCALHOST = "127.0.0.1"

KAFKA_PORT_ENV = "CARGOTRACK_KAFKA_PORT"
KAFKA_CONTROLLER_PORT_ENV = "CARGOTRACK_KAFKA_CONTROLLER_PORT"
POSTGRES_PORT_ENV = "CARGOTRACK_POSTGRES_PORT"

# Away from the well-known 9092/9093/5432 so a developer's own Kafka or PostgreSQL
# can keep running beside `cargotrack dev`.
DEFAULT_KAFKA_PORT = 19092
DEFAULT_KAFKA_CONTROLLER_PORT = 19093
DEFAULT_POSTGRES_PORT = 15432


def ephemeral_ports() -> range:
    """The kernel's range for the local ports of outgoing connections (Linux's default
    when it cannot be read)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32_768, 60_999
    return range(low, high + 1)


def free_port_range(
    count: int, avoid: Collection[int] = (), host: str = LOCALHOST, *, tries: int = 500
) -> range:
    """``count`` consecutive TCP ports free on ``host`` now, none in ``avoid``, all
    outside the ephemeral range.

    Outside it, because a server binds its port a while after the pick: the kernel may
    give any ephemeral port to an outgoing connection made meanwhile (this once took a
    service's port in a test run). Another process may still take one before the
    caller binds it (callers re-check with :func:`ensure_port_free`).
    Raises DevStackError when ``tries`` random candidates were all taken.
    """
    ephemeral = ephemeral_ports()
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(10_000, 65_536 - count)
        ports = range(base, base + count)
        if ports[-1] >= ephemeral.start and ports[0] < ephemeral.stop:
            continue
        if not set(avoid).intersection(ports) and not any(port_in_use(p, host) for p in ports):
            return ports
    raise DevStackError(f"no {count} consecutive free TCP ports found on {host}")


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago,
    outside the ephemeral range (see :func:`free_port_range`)."""
    ports: list[int] = []
    while len(ports) < count:
        ports.extend(free_port_range(1, ports, host))
    return ports


def port_in_use(port: int, host: str = LOCALHOST) -> bool:
    """True if a server could not bind ``host:port`` now.

    The probe sets SO_REUSEADDR like Kafka and PostgreSQL do, so connections of a
    just-stopped server lingering in TIME_WAIT do not count as "in use" (a restart on
    the same port must work), while a listening socket does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def ensure_port_free(port: int, *, what: str, env_var: str, host: str = LOCALHOST) -> None:
    """Raise :class:`DevStackError` naming the fix if ``host:port`` is taken."""
    if port_in_use(port, host):
        raise DevStackError(
            f"port {port} ({what}) is already in use — is another cargotrack dev running? "
            f"stop it, or set {env_var} to a free port"
        )


def port_from_env(environ: Mapping[str, str], name: str, default: int) -> int:
    """Parse the TCP port in ``environ[name]``; ``default`` when unset or empty.

    Raises :class:`DevStackError` naming the variable when the value is not a port.
    """
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise DevStackError(f"{name} must be a TCP port number (1-65535), got {raw!r}")
    return port
