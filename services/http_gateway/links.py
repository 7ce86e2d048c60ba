"""The gateway in `cargotrack dev`: its settings there, and the links it prints.

The dev launcher (devtools/launcher.py) calls `dev_env` for the gateway's process
and `print_tracking_link` once the simulator runs, so a newcomer can open the tracking
page of a simulated shipment and the dispatch board.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import grpc

from shared.auth import Role, mint_token
from shared.pb import shipment_pb2, tracking_pb2, tracking_pb2_grpc

#: The gateway's HTTP port in `cargotrack dev`: its gRPC (health) port + 21, so
#: 50080 with the default port base.
DEV_HTTP_OFFSET = 21
#: Statuses of a shipment worth watching on its tracking page.
_UNDERWAY = [
    shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT,
    shipment_pb2.SHIPMENT_STATUS_OUT_FOR_DELIVERY,
    shipment_pb2.SHIPMENT_STATUS_PICKED_UP,
    shipment_pb2.SHIPMENT_STATUS_ASSIGNED,
    shipment_pb2.SHIPMENT_STATUS_CREATED,
]


def dev_http_port(ports: Mapping[str, int]) -> int:
    return ports["http-gateway"] + DEV_HTTP_OFFSET


def dev_env(ports: Mapping[str, int]) -> dict[str, str]:
    """The gateway's extra environment in `cargotrack dev` (`ports`: service -> port)."""
    return {
        "CARGOTRACK_HTTP_PORT": str(dev_http_port(ports)),
        "CARGOTRACK_GATEWAY_TRACKING_TARGET": f"127.0.0.1:{ports['tracking-query']}",
        "CARGOTRACK_GATEWAY_DISPATCH_TARGET": f"127.0.0.1:{ports['dispatch']}",
    }


async def tracking_link(
    base_url: str, tracking_target: str, secret: str, tenant: str, timeout_s: float = 20.0
) -> str | None:
    """`base_url/t/<token>` of a shipment under way (the one changed last), once the
    projection has one; None after `timeout_s`."""
    token = mint_token(secret, role=Role.OPS, tenant_id=tenant, subject="dev-links")
    metadata = (("authorization", f"Bearer {token}"),)
    request = tracking_pb2.ListShipmentsRequest(statuses=_UNDERWAY, page_size=1)
    with contextlib.suppress(TimeoutError):
        async with (
            asyncio.timeout(timeout_s),
            grpc.aio.insecure_channel(tracking_target) as channel,
        ):
            stub = tracking_pb2_grpc.TrackingServiceStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.ListShipments(request, metadata=metadata, timeout=2.0)
                    if reply.shipments and reply.shipments[0].tracking_token:
                        return f"{base_url}/t/{reply.shipments[0].tracking_token}"
                await asyncio.sleep(1.0)
    return None


async def print_tracking_link(
    base_url: str, tracking_target: str, secret: str, tenant: str
) -> None:
    """Print `tracking page  <link>` once a simulated shipment is under way."""
    link = await tracking_link(base_url, tracking_target, secret, tenant)
    print(f"tracking page  {link or '(no shipment under way yet)'}", flush=True)
