"""Expand/contract migrations: the previous release keeps working on the new schema.

A rollout runs the new release's migrations while the previous release still serves
(docs/operations.md, "Upgrades"), and a rollback runs the previous release on the
migrated schema. So, against the session's real PostgreSQL:

1. the previous release's own code (its `shared/` and `services/`, exported from git)
   creates the schema with its migrations and writes state, history and an outbox row;
2. today's `migrate` upgrades that database;
3. the previous release's code still reads everything it wrote (its store and its
   query service's SQL), and today's code reads the same data.

"The previous release" is the commit scripts/check-breaking compares the contracts
with: CARGOTRACK_BUF_AGAINST if set, else the newest `v*` tag, else the merge base with
main, else HEAD's first parent.
Without one (a shallow clone, a first commit) the test fails, never skips.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from shared import db
from shared.config import DatabaseSettings
from shared.pb import shipment_pb2

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("release_probe.py")

pytestmark = pytest.mark.timeout(180)


def _check_breaking() -> ModuleType:
    loader = SourceFileLoader("check_breaking", str(ROOT / "scripts" / "check-breaking"))
    module = ModuleType(loader.name)
    module.__file__ = loader.path
    loader.exec_module(module)
    return module


def previous_release(into: Path) -> tuple[str, str, Path]:
    """(commit, why, directory holding that commit's shared/ and services/)."""
    script = _check_breaking()
    try:
        commit, why = script.choose_reference(os.environ.get("CARGOTRACK_BUF_AGAINST"))
    except script.Impossible as error:
        pytest.fail(f"no previous release to test migrations against: {error}", pytrace=False)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "shared", "services"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return commit, why, into


async def probe(code: Path, mode: str, url: str, schema: str) -> dict[str, Any]:
    """Run release_probe.py with the code under `code` first on the import path."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROBE),
        mode,
        url,
        schema,
        cwd=code,
        env={**os.environ, "PYTHONPATH": str(code)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, f"{mode} with the code of {code} failed:\n{err.decode()}"
    result: dict[str, Any] = json.loads(out)
    return result


async def test_the_previous_release_works_on_the_migrated_schema(
    database_url: str, pg_schema: str, tmp_path: Path
) -> None:
    commit, why, old = previous_release(tmp_path / "previous")
    written = await probe(old, "write", database_url, pg_schema)
    assert written["migrations"], f"{commit[:12]} ({why}) applied no migration"

    applied = await db.migrate(DatabaseSettings(url=database_url, schema=pg_schema))
    today = [name for _, name, _ in db.migrations()]
    assert applied == [name for name in today if name not in written["migrations"]]

    read_by_old = await probe(old, "read", database_url, pg_schema)
    assert read_by_old["shipment"] == written["shipment"]
    assert read_by_old["vehicle"] == written["vehicle"]
    assert read_by_old["query_status"] == shipment_pb2.SHIPMENT_STATUS_ASSIGNED
    assert read_by_old["history_points"] == written["history_points"] == 3
    assert read_by_old["unpublished_alerts"] == 1

    read_by_new = await probe(ROOT, "read", database_url, pg_schema)
    # Today's states may have gained fields; what the old release wrote is intact,
    # read with one documented change: a fix's speed, heading or accuracy stored as
    # 0.0 (the old "unknown") reads as None (shared/statecodec.py, `zero_is_none`).
    for kind in ("shipment", "vehicle"):
        for field, value in written[kind].items():
            assert read_by_new[kind][field] == _unknown_as_none(field, value), (kind, field)
    assert read_by_new["query_status"] == shipment_pb2.SHIPMENT_STATUS_ASSIGNED
    assert read_by_new["history_points"] == 3
    assert read_by_new["unpublished_alerts"] == 1


#: The vehicle state's fixes, and their fields whose 0.0 meant "unknown" in older releases.
_FIX_FIELDS = ("last_position", "jump_candidate")
_ZERO_IS_UNKNOWN = ("speed_mps", "heading_deg", "accuracy_m")


def _unknown_as_none(field: str, value: object) -> object:
    """`value` of a stored vehicle-state field as today's code reads it."""
    if field not in _FIX_FIELDS or not isinstance(value, dict):
        return value
    return {k: None if k in _ZERO_IS_UNKNOWN and v == 0.0 else v for k, v in value.items()}


async def test_migrating_twice_changes_nothing(database_url: str, pg_schema: str) -> None:
    settings = DatabaseSettings(url=database_url, schema=pg_schema)
    first = await db.migrate(settings)
    assert first == [name for _, name, _ in db.migrations()]
    assert await db.migrate(settings) == []
