"""Query load client: GetShipment over gRPC, over the http-gateway's JSON, or the same
read straight from PostgreSQL.

Run as `python -m bench.query_client`; reads one JSON job (see `Job`) on stdin and
prints one JSON result line. `mode="grpc"` calls tracking-query's GetShipment with
`concurrency` calls in flight; `mode="pg"` runs the statement GetShipment runs
(shared/readmodel/shipments.py) with an asyncpg pool of the same concurrency,
which is the raw limit the service is compared with. `mode="http"` GETs
`{target}/v1/shipments/{id}` (the gateway's JSON, the same RPC behind it) with
`concurrency` requests in flight over one keep-alive connection pool. Ids are drawn
from `shipments` round-robin from a random start.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import asyncpg
import grpc

from bench.workload import TENANT
from shared.auth import Role, mint_token
from shared.config import DEV_JWT_SECRET
from shared.pb import tracking_pb2
from shared.readmodel import shipments


@dataclass
class Job:
    mode: str
    shipments: list[str]
    duration_s: float
    concurrency: int = 32
    target: str = ""
    dsn: str = ""
    schema: str = ""
    channels: int = 2
    warmup_s: float = 1.0


@dataclass
class Result:
    calls: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


async def _drive(job: Job, call: Any) -> Result:
    """Run `concurrency` loops of `call(shipment_id)`; measure after the warm-up."""
    result = Result()
    ids = job.shipments
    start = random.randrange(len(ids))
    t_begin = time.monotonic()
    measure_from = t_begin + job.warmup_s
    until = measure_from + job.duration_s

    async def loop(n: int) -> None:
        i = start + n
        while True:
            t0 = time.monotonic()
            if t0 >= until:
                return
            try:
                await call(ids[i % len(ids)])
                ok = True
            except Exception as error:
                ok = False
                if len(result.error_samples) < 5:
                    result.error_samples.append(repr(error)[:300])
            t1 = time.monotonic()
            i += job.concurrency
            if t0 >= measure_from:
                if ok:
                    result.calls += 1
                    result.latencies.append(t1 - t0)
                else:
                    result.errors += 1

    await asyncio.gather(*(loop(n) for n in range(job.concurrency)))
    result.seconds = job.duration_s
    return result


async def _grpc(job: Job) -> Result:
    token = mint_token(
        DEV_JWT_SECRET, role=Role.OPS, tenant_id=TENANT, subject="bench-ops", ttl_s=6 * 3600
    )
    metadata = (("authorization", f"Bearer {token}"),)
    channels = [
        grpc.aio.insecure_channel(job.target, options=[("grpc.channel_id", n)])
        for n in range(max(1, job.channels))
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 30)
        methods = [
            channel.unary_unary(
                "/cargotrack.v1.TrackingService/GetShipment",
                request_serializer=tracking_pb2.GetShipmentRequest.SerializeToString,
                response_deserializer=tracking_pb2.GetShipmentResponse.FromString,
            )
            for channel in channels
        ]
        counter = 0

        async def call(shipment_id: str) -> None:
            nonlocal counter
            counter += 1
            method = methods[counter % len(methods)]
            await method(
                tracking_pb2.GetShipmentRequest(shipment_id=shipment_id),
                metadata=metadata,
                timeout=10,
            )

        return await _drive(job, call)
    finally:
        for channel in channels:
            await channel.close()


async def _http(job: Job) -> Result:
    token = mint_token(
        DEV_JWT_SECRET, role=Role.OPS, tenant_id=TENANT, subject="bench-ops", ttl_s=6 * 3600
    )
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    connector = aiohttp.TCPConnector(limit=job.concurrency)
    async with aiohttp.ClientSession(job.target, connector=connector, headers=headers) as http:

        async def call(shipment_id: str) -> None:
            async with http.get(f"/v1/shipments/{shipment_id}", timeout=TIMEOUT) as response:
                body = await response.json()
                if response.status != 200 or "shipment" not in body:
                    raise RuntimeError(f"HTTP {response.status}: {body}")

        return await _drive(job, call)


TIMEOUT = aiohttp.ClientTimeout(total=10)


async def _pg(job: Job) -> Result:
    pool = await asyncpg.create_pool(
        job.dsn,
        min_size=job.concurrency,
        max_size=job.concurrency,
        server_settings={"search_path": job.schema},
    )
    assert pool is not None
    sql = shipments.SELECT_WITH_TRACKING + " WHERE s.tenant_id = $1 AND s.shipment_id = $2"
    try:

        async def call(shipment_id: str) -> None:
            row = await pool.fetchrow(sql, TENANT, shipment_id)
            if row is None:
                raise LookupError(shipment_id)

        return await _drive(job, call)
    finally:
        await pool.close()


async def _main() -> None:
    job = Job(**json.loads(sys.stdin.readline()))
    modes = {"grpc": _grpc, "http": _http, "pg": _pg}
    result = await modes[job.mode](job)
    out: dict[str, Any] = asdict(result)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(_main())
