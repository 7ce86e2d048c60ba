"""grpcurl against a running gps-ingest: reflection lists the services, a batch gets acked.

grpcurl is a CI tool (the Makefile's `tools` target builds it from the Go module
proxy). Its absence fails these tests with the command that installs it; it never
skips them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from devtools.devstack.kafka import default_cache_dir
from shared.auth import Role
from shared.envelopes import utc_now
from tests.ingest_helpers import (
    RunningService,
    bearer,
    consume_envelopes,
    running_service,
    service_settings,
)

pytestmark = pytest.mark.timeout(90)

GRPCURL_VERSION = "v1.9.3"
DEMO_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "grpcurl-demo"


def grpcurl_path() -> str:
    """grpcurl from the tools cache (where CI installs it), else from PATH; fails if absent."""
    tools = default_cache_dir() / "tools" / "bin"
    cached = tools / "grpcurl"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    on_path = shutil.which("grpcurl")
    if on_path:
        return on_path
    pytest.fail(
        "grpcurl is not installed; install it with: "
        f"GOBIN={tools} go install github.com/fullstorydev/grpcurl/cmd/grpcurl@{GRPCURL_VERSION}",
        pytrace=False,
    )


async def run(
    *argv: str, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run a command without blocking the event loop (the server runs in it)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await process.communicate(stdin.encode())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture(scope="session")
def grpcurl() -> str:
    return grpcurl_path()


@pytest.fixture
async def gps(
    grpcurl: str, kafka_bootstrap: str, topic_prefix: str
) -> AsyncIterator[RunningService]:
    """gps-ingest, started only once grpcurl was found (so its absence fails fast)."""
    async with running_service(
        "gps-ingest", service_settings(kafka_bootstrap, topic_prefix)
    ) as service:
        yield service


async def test_reflection_lists_and_describes_the_services(
    grpcurl: str, gps: RunningService
) -> None:
    code, out, err = await run(grpcurl, "-plaintext", gps.target, "list")
    assert code == 0, err
    assert {
        "cargotrack.v1.GpsIngestService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(out.split())

    code, out, err = await run(
        grpcurl, "-plaintext", gps.target, "describe", "cargotrack.v1.GpsIngestService"
    )
    assert code == 0, err
    assert "rpc StreamPoints ( stream .cargotrack.v1.StreamPointsRequest )" in out

    code, out, err = await run(grpcurl, "-plaintext", gps.target, "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


def _reflection_calls(version: str) -> float:
    """Reflection streams this process answered (and completed) under `version`."""
    value = REGISTRY.get_sample_value(
        "cargotrack_grpc_server_handled_total",
        {
            "service": f"grpc.reflection.{version}.ServerReflection",
            "method": "ServerReflectionInfo",
            "code": "OK",
        },
    )
    return value or 0.0


async def test_grpcurl_lists_the_services_through_v1_reflection(
    grpcurl: str, gps: RunningService
) -> None:
    """grpcurl asks grpc.reflection.v1 first and falls back to v1alpha only when the
    server answers UNIMPLEMENTED: the server counts which one it answered."""
    v1_before, v1alpha_before = _reflection_calls("v1"), _reflection_calls("v1alpha")
    code, out, err = await run(grpcurl, "-plaintext", gps.target, "list")
    assert code == 0, err
    assert "cargotrack.v1.GpsIngestService" in out.split()
    assert _reflection_calls("v1") == v1_before + 1
    assert _reflection_calls("v1alpha") == v1alpha_before

    # The v1 service describes itself: its file is in the descriptor pool.
    code, out, err = await run(
        grpcurl, "-plaintext", gps.target, "describe", "grpc.reflection.v1.ServerReflection"
    )
    assert code == 0, err
    assert "grpc.reflection.v1.ServerReflectionRequest" in out


async def test_a_batch_sent_with_grpcurl_is_acknowledged_and_stored(
    grpcurl: str, gps: RunningService, kafka_bootstrap: str
) -> None:
    [(_, authorization)] = bearer(Role.DRIVER, vehicle_id="veh-curl")
    now = utc_now().strftime("%Y-%m-%dT%H:%M:%SZ")
    batch = {
        "batch": {
            "vehicleId": "veh-curl",
            "deviceId": "dev-curl",
            "sequence": "1",
            "points": [
                {"recordedAt": now, "latitude": 52.52, "longitude": 13.405, "accuracyM": 4},
                {"recordedAt": now, "latitude": 95.0, "longitude": 13.405},
            ],
        }
    }
    code, out, err = await run(
        grpcurl,
        "-plaintext",
        "-H",
        f"authorization: {authorization}",
        "-d",
        json.dumps(batch),
        gps.target,
        "cargotrack.v1.GpsIngestService/StreamPoints",
    )
    assert code == 0, err
    assert json.loads(out) == {
        "sequence": "1",
        "outcome": "BATCH_OUTCOME_PARTIALLY_ACCEPTED",
        "accepted_points": 1,  # grpcurl prints the proto field names
        "violations": [
            {"field": "batch.points[1].latitude", "description": "must be within [-90, 90] degrees"}
        ],
    }
    [record] = await consume_envelopes(kafka_bootstrap, gps.settings.topics.gps_points, 1)
    assert record.envelope.gps_batch.device_id == "dev-curl"
    assert len(record.envelope.gps_batch.points) == 1


async def test_grpcurl_without_a_token_is_unauthenticated(
    grpcurl: str, gps: RunningService
) -> None:
    code, _out, err = await run(
        grpcurl,
        "-plaintext",
        "-d",
        '{"batch": {"vehicleId": "v"}}',
        gps.target,
        "cargotrack.v1.GpsIngestService/StreamPoints",
    )
    assert code != 0
    assert "Unauthenticated" in err


async def test_the_grpcurl_demo_script_streams_a_batch(grpcurl: str, gps: RunningService) -> None:
    env = {
        **os.environ,
        "GRPCURL": grpcurl,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SEQUENCE": "7",
    }
    env.pop("CARGOTRACK_JWT_SECRET", None)  # the service uses the development key
    code, out, err = await run(str(DEMO_SCRIPT), gps.target, env=env)
    assert code == 0, err
    assert "cargotrack.v1.GpsIngestService" in out
    assert '"status": "SERVING"' in out
    assert '"outcome": "BATCH_OUTCOME_ACCEPTED"' in out
    assert '"sequence": "7"' in out
