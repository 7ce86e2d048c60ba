"""The fault suite's size switch and its summary table.

Every scenario runs in a reduced size by default (CI). The full size is the same
test with the `slow` marker; it runs only when asked for:

    CARGOTRACK_FAULTS_FULL=1 .venv/bin/pytest tests/faults   # everything, full size
    .venv/bin/pytest tests/faults -m slow        # only the full-size scenarios

With CARGOTRACK_FAULTS_FULL=1 the reduced scenarios are skipped (the full ones
cover them) and the fuzz tests run 300 examples per endpoint instead of 25.

At the end of the session the table of every scenario that ran is printed
(scenario, acked, reflected, lost, duplicated, ...), see tests/faults/checker.py,
and, after the Kafka cluster scenarios (test_cluster.py: the tiny leader kill by
default, all of them at full size with CARGOTRACK_FAULTS_CLUSTER=1), the table of
what users felt: ack, update and query gaps (tests/faults/gaps.py).
"""

from __future__ import annotations

import os

# Before anything here imports grpc: with gRPC's fork support on (its default), a
# process forked while gRPC threads are busy crashes (SIGSEGV) before it can exec
# about one time in five, and this suite forks servers and services while in-process
# gRPC services run. Only effective if grpc was not imported yet (run the suite on
# its own, or set the variable in the environment; see docs/guarantees.md).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import pytest

from tests.faults import gaps
from tests.faults.checker import REPORTS, table
from tests.faults.harness import Servers

FULL_ENV = "CARGOTRACK_FAULTS_FULL"
#: Every Kafka cluster scenario at full size (test_cluster.py), and the PostgreSQL
#: failover's full size (test_failover.py); unset: the reduced leader kill and failover.
CLUSTER_ENV = "CARGOTRACK_FAULTS_CLUSTER"


@pytest.fixture
def servers(kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str) -> Servers:
    """The session stack's Kafka and PostgreSQL, with this test's own topic prefix and
    schema (a scenario with a server of its own replaces that one)."""
    return Servers(kafka_bootstrap, database_url, topic_prefix, pg_schema)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    full = os.environ.get(FULL_ENV) == "1"
    asked = full or "slow" in (config.getoption("markexpr") or "")
    skip_full = pytest.mark.skip(
        reason=f"full-size fault scenario: run with `-m slow` or {FULL_ENV}=1"
    )
    skip_reduced = pytest.mark.skip(reason=f"{FULL_ENV}=1 runs the full size instead")
    for item in items:
        if "tests/faults/" not in item.nodeid:
            continue
        if item.get_closest_marker("slow") is not None and not asked:
            item.add_marker(skip_full)
        if full and item.nodeid.endswith("[reduced]"):
            item.add_marker(skip_reduced)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORTS:
        return
    terminalreporter.section("fault suite: acknowledged vs. PostgreSQL")
    for line in table(REPORTS).splitlines():
        terminalreporter.write_line(line)
    for report in REPORTS:
        if not report.ok:
            terminalreporter.write_line(f"{report.scenario} ({report.size}): {report.problems[:5]}")
    if gaps.ROWS:
        terminalreporter.section("fault suite: what users felt (Kafka cluster)")
        for line in gaps.table(gaps.ROWS).splitlines():
            terminalreporter.write_line(line)
