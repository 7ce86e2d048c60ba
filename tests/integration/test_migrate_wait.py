"""`cargotrack migrate` waits for a PostgreSQL that does not answer, then says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devtools.devstack.ports import free_ports

CARGOTRACK = Path(sys.executable).parent / "cargotrack"


def test_migrate_retries_a_closed_port_then_fails_in_one_line() -> None:
    (port,) = free_ports(1)  # nothing listens there: every connection is refused
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CARGOTRACK_")},
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "DATABASE_URL": f"postgresql://cargotrack@127.0.0.1:{port}/cargotrack",
        "CARGOTRACK_DEV_MODE": "1",
        "CARGOTRACK_LOG_FORMAT": "console",
    }
    result = subprocess.run(
        [str(CARGOTRACK), "migrate", "--wait", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cargotrack: PostgreSQL did not answer in 2 s"), result.stderr
    assert "attempt(s), allowed 2 s" in last
    # Each failed attempt was logged before it was retried.
    assert "not answering" in result.stderr
    assert "attempt 2 in 1 s" in result.stderr
