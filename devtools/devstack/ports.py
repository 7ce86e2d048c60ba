"""TCP ports of the local stack: fixed defaults for ``cargotrack dev``, free ones for tests.

The environment variable names that move the dev ports are declared here, once, so the
error messages and the settings parser agree on them.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping

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


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago.

    All sockets are held open until every port is chosen, so the ports are distinct.
    Another process may still take one before the caller binds it (callers re-check
    with :func:`ensure_port_free` right before starting a server).
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
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
