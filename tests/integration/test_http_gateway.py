"""The http-gateway in front of real tracking-query and dispatch services (in-process,
real Kafka and PostgreSQL): JSON mapping, status mapping and error bodies, bearer
forwarding, the public view, SSE / NDJSON streams with heartbeats and resume."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from services.http_gateway.app import GatewayServer
from shared.auth import Role
from shared.domain import polyline
from shared.pb import alerts_pb2, tracking_pb2
from tests.ingest_helpers import Metadata, bearer, service_settings
from tests.integration.test_dispatch import alert_envelope, publish, running_dispatch
from tests.integration.test_tracking_query import (
    OPS,
    TENANT,
    Query,
    moving,
    project,
    query,  # noqa: F401  (the fixture)
    shipment_log,
)
from tests.projection_helpers import T0, producer_for

pytestmark = pytest.mark.timeout(180)


def header(metadata: Metadata) -> dict[str, str]:
    return {"Authorization": dict(metadata)["authorization"]}


@dataclass
class Web:
    http: aiohttp.ClientSession
    query: Query
    dispatch_settings: Any
    base: str
    server: GatewayServer


@pytest.fixture
async def web(query: Query, kafka_bootstrap: str, topic_prefix: str) -> AsyncIterator[Web]:  # noqa: F811
    async with running_web(query, kafka_bootstrap, topic_prefix) as running:
        yield running


@contextlib.asynccontextmanager
async def running_web(
    query: Query,  # noqa: F811
    kafka_bootstrap: str,
    topic_prefix: str,
    **environ: str | float | int,
) -> AsyncIterator[Web]:
    """A ready gateway in front of `query` and a dispatch service of its own;
    `environ`: more gateway settings (environment variables)."""
    dispatch_settings = service_settings(kafka_bootstrap, topic_prefix)
    async with running_dispatch(dispatch_settings) as dispatch:
        settings = service_settings(
            kafka_bootstrap,
            topic_prefix,
            CARGOTRACK_HTTP_PORT=0,
            CARGOTRACK_GATEWAY_TRACKING_TARGET=f"127.0.0.1:{query.service.port}",
            CARGOTRACK_GATEWAY_DISPATCH_TARGET=dispatch.target,
            CARGOTRACK_GATEWAY_HEARTBEAT_S=0.3,
            **environ,
        )
        async with GatewayServer(settings) as gateway:
            base = f"http://127.0.0.1:{gateway.http_port}"
            async with aiohttp.ClientSession(base) as http:
                async with asyncio.timeout(30):
                    while True:
                        async with http.get("/readyz") as ready:
                            if ready.status == 200:
                                break
                        await asyncio.sleep(0.1)
                yield Web(http, query, dispatch_settings, base, gateway)


async def travelling(service: Query) -> str:
    """Project an in-transit shipment s1 with a live position; its tracking token."""
    log = shipment_log(
        TENANT, "s1", customer="cust-secret-3", vehicle="veh-secret-7", driver="drv-secret-9"
    )
    # A multi-drop round: the route goes on past this shipment's stop (53.43, -2.90).
    log[0].shipment_event.created.planned_route = polyline.encode(ROUND)
    log.append(moving(TENANT, "veh-secret-7", 1, T0 + timedelta(minutes=10)))
    await project(service.settings, log)
    async with asyncio.timeout(10):
        reply = await service.stub.GetShipment(
            tracking_pb2.GetShipmentRequest(shipment_id="s1"),
            metadata=OPS,
        )
    return str(reply.shipment.tracking_token)


#: The planned round: origin, the vehicle's way, this stop, another customer's stop.
ROUND = [(53.40, -2.99), (53.404, -2.978), (53.412, -2.954), (53.43, -2.90), (53.45, -2.85)]


class Events:
    """Reads Server-Sent Events (or NDJSON lines) from a streaming response."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments = 0

    async def next(self, timeout_s: float = 30.0) -> dict[str, str]:
        event: dict[str, str] = {}
        async with asyncio.timeout(timeout_s):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("the stream ended")
                line = raw.decode().rstrip("\n")
                if not line:
                    if "data" in event:
                        return event
                    continue
                if line.startswith(":"):
                    self.comments += 1
                    continue
                name, _, value = line.partition(":")
                event[name] = value.removeprefix(" ")

    async def line(self, timeout_s: float = 30.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("the stream ended")
                if raw.strip():
                    parsed: dict[str, Any] = json.loads(raw)
                    return parsed
                self.comments += 1


async def test_get_shipment_is_canonical_json_with_the_callers_bearer(web: Web) -> None:
    await travelling(web.query)
    async with web.http.get("/v1/shipments/s1", headers=header(OPS)) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()
    shipment = body["shipment"]
    assert shipment["shipmentId"] == "s1"
    assert shipment["status"] == "SHIPMENT_STATUS_IN_TRANSIT"
    assert shipment["vehicleId"] == "veh-secret-7"  # staff see it
    assert shipment["createdAt"].endswith("Z")

    async with web.http.get("/v1/shipments/s1") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        status = await response.json()
    assert status["code"] == 16

    driver = bearer(Role.DRIVER, tenant=TENANT, vehicle_id="veh-secret-7")
    async with web.http.get("/v1/shipments/s1", headers=header(driver)) as response:
        assert response.status == 403  # decided by tracking-query, not by the gateway
    other = bearer(Role.OPS, tenant="another-tenant")
    async with web.http.get("/v1/shipments/s1", headers=header(other)) as response:
        assert response.status == 404


async def test_errors_are_google_rpc_status_json_with_field_violations(web: Web) -> None:
    async with web.http.get(
        "/v1/shipments", params={"pageSize": "1000"}, headers=header(OPS)
    ) as response:
        assert response.status == 400
        status = await response.json()
    assert status["code"] == 3
    [details] = status["details"]
    assert details["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert [v["field"] for v in details["fieldViolations"]] == ["page_size"]

    async with web.http.get(
        "/v1/shipments", params={"statuses": "NO_SUCH_STATUS"}, headers=header(OPS)
    ) as response:
        assert response.status == 400
        status = await response.json()
    assert status["details"][0]["fieldViolations"][0]["field"] == "statuses"

    async with web.http.get("/v1/shipments", params={"nope": "1"}, headers=header(OPS)) as response:
        assert response.status == 400
        assert (await response.json())["details"][0]["fieldViolations"][0]["field"] == "nope"
    async with web.http.get("/v1/nowhere") as response:
        assert response.status == 404
    async with web.http.delete("/v1/shipments/s1") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"


async def test_list_takes_repeated_query_parameters(web: Web) -> None:
    await travelling(web.query)
    params = [("statuses", "SHIPMENT_STATUS_IN_TRANSIT"), ("statuses", "SHIPMENT_STATUS_CREATED")]
    async with web.http.get("/v1/shipments", params=params, headers=header(OPS)) as response:
        assert response.status == 200
        body = await response.json()
    assert [s["shipmentId"] for s in body["shipments"]] == ["s1"]
    params = [("statuses", "SHIPMENT_STATUS_DELIVERED")]
    async with web.http.get("/v1/shipments", params=params, headers=header(OPS)) as response:
        assert (await response.json()).get("shipments", []) == []


async def test_the_public_routes_show_only_the_public_view(web: Web) -> None:
    token = await travelling(web.query)
    async with web.http.get(f"/v1/track/{token}") as response:
        assert response.status == 200
        text = await response.text()
    public = json.loads(text)["shipment"]
    assert public["status"] == "SHIPMENT_STATUS_IN_TRANSIT"
    assert {"lastPosition", "destination", "eta", "progress"} <= set(public)
    # The route ends at this shipment's stop: the rest of the round is not shown.
    assert polyline.decode(public["plannedRoute"]) == ROUND[:4]
    progress = public["progress"]
    assert progress["remainingM"] == public["eta"]["remainingM"]
    assert progress["routeLengthM"] == pytest.approx(
        progress.get("travelledM", 0) + progress["remainingM"]
    )
    for secret in ("veh-secret-7", "cust-secret-3", "drv-secret-9", "shipmentId", "trackingToken"):
        assert secret not in text, secret
    async with web.http.get("/v1/track/" + "A" * 22) as response:
        assert response.status == 404
    async with web.http.get("/v1/track/bad$token") as response:
        assert response.status == 400


async def test_watch_by_token_streams_sse_and_ndjson_and_resumes_without_repeating(
    web: Web,
) -> None:
    token = await travelling(web.query)
    async with web.http.get(f"/v1/track/{token}:watch") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["X-Accel-Buffering"] == "no"
        events = Events(response)
        first = await events.next()
        assert json.loads(first["data"])["shipment"]["status"] == "SHIPMENT_STATUS_IN_TRANSIT"
        assert first["id"]
        while events.comments == 0:  # an idle stream gets heartbeats
            await asyncio.wait_for(response.content.readline(), 10)
            events.comments += 1

    # Reconnecting with the id of the state already seen: nothing new, nothing repeated.
    async with web.http.get(
        f"/v1/track/{token}:watch", headers={"Last-Event-ID": first["id"]}
    ) as response:
        resumed = Events(response)
        with pytest.raises(TimeoutError):
            await resumed.next(timeout_s=1.5)
        assert resumed.comments >= 1

    async with web.http.get(
        f"/v1/track/{token}:watch", headers={"Accept": "application/x-ndjson"}
    ) as response:
        assert response.headers["Content-Type"] == "application/x-ndjson"
        line = await Events(response).line()
    assert line["id"] == first["id"]
    assert line["result"]["shipment"]["status"] == "SHIPMENT_STATUS_IN_TRANSIT"

    async with web.http.get("/v1/track/" + "A" * 22 + ":watch") as response:
        assert response.status == 404  # refused at once: an HTTP error, not a stream
        assert (await response.json())["code"] == 5


async def test_sse_resume_after_a_dropped_stream_has_no_gap_and_no_duplicate(web: Web) -> None:
    """SubscribeDelays over SSE: read two of three alerts, drop the connection, more
    alerts arrive meanwhile; resuming with Last-Event-ID yields exactly the rest."""
    dispatcher = header(bearer(Role.DISPATCHER, tenant="tenant-a"))
    settings = web.dispatch_settings
    async with producer_for(settings) as producer:
        async with web.http.get(
            "/v1/alerts:subscribe", params={"fromBeginning": "true"}, headers=dispatcher
        ) as response:
            assert response.status == 200
            events = Events(response)
            sent = await publish(producer, settings, [alert_envelope(f"s{i}") for i in range(3)])
            seen = [await events.next(), await events.next()]
        # Dropped mid-way (the third alert was sent, maybe received, never read).
        sent += await publish(producer, settings, [alert_envelope(f"s{i}") for i in range(3, 5)])
        received = [json.loads(e["data"])["alert"]["alertId"] for e in seen]
        async with web.http.get(
            "/v1/alerts:subscribe", headers={**dispatcher, "Last-Event-ID": seen[-1]["id"]}
        ) as response:
            events = Events(response)
            for _ in range(3):
                received.append(json.loads((await events.next())["data"])["alert"]["alertId"])
    # Order is per shipment (partition), so compare as sets: nothing missing, nothing twice.
    assert len(set(received)) == len(received) == len(sent)
    assert set(received) == set(sent)


async def test_subscribe_filters_from_the_query_and_ndjson(web: Web) -> None:
    dispatcher = header(bearer(Role.DISPATCHER, tenant="tenant-a"))
    settings = web.dispatch_settings
    params = [("filter.kinds", "ALERT_KIND_LATE"), ("fromBeginning", "true")]
    async with (
        producer_for(settings) as producer,
        web.http.get(
            "/v1/alerts:subscribe",
            params=params,
            headers={**dispatcher, "Accept": "application/x-ndjson"},
        ) as response,
    ):
        assert response.status == 200
        lines = Events(response)
        await publish(
            producer,
            settings,
            [
                alert_envelope("s-risk", alerts_pb2.ALERT_KIND_AT_RISK),
                alert_envelope("s-late", alerts_pb2.ALERT_KIND_LATE),
            ],
        )
        line = await lines.line()
    assert line["result"]["alert"]["shipmentId"] == "s-late"
    assert line["id"] == line["result"]["resumeToken"]
    async with web.http.get(
        "/v1/alerts:subscribe", params={"filter.kinds": "NOPE"}, headers=dispatcher
    ) as response:
        assert response.status == 400
    async with web.http.get("/v1/alerts:subscribe") as response:
        assert response.status == 401


async def test_openapi_describes_every_route(web: Web) -> None:
    async with web.http.get("/openapi.json") as response:
        document = await response.json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert set(paths) >= {
        "/v1/shipments/{shipment_id}",
        "/v1/shipments",
        "/v1/shipments/{shipment_id}/timeline",
        "/v1/shipments/{shipment_id}:watch",
        "/v1/track/{tracking_token}",
        "/v1/track/{tracking_token}:watch",
        "/v1/alerts:subscribe",
    }
    assert set(paths["/v1/alerts:subscribe"]) == {"get", "post"}
    watch = paths["/v1/track/{tracking_token}:watch"]["get"]
    assert "text/event-stream" in watch["responses"]["200"]["content"]
    assert "security" not in watch
    shipment = document["components"]["schemas"]["cargotrack.v1.Shipment"]["properties"]
    assert shipment["createdAt"] == {"type": "string", "format": "date-time"}


async def test_a_stream_that_fails_midway_ends_with_an_error_event(web: Web) -> None:
    """WatchShipment over SSE with a token that expires during the stream: the service
    ends it with UNAUTHENTICATED, which arrives as `event: error` with the status."""
    await travelling(web.query)
    short = header(bearer(Role.OPS, tenant=TENANT, ttl_s=2))
    async with web.http.get("/v1/shipments/s1:watch", headers=short) as response:
        assert response.status == 200
        events = Events(response)
        first = await events.next()
        assert json.loads(first["data"])["shipment"]["shipmentId"] == "s1"
        failure = await events.next(timeout_s=30)
    assert failure["event"] == "error"
    status = json.loads(failure["data"])
    assert status["code"] == 16  # UNAUTHENTICATED: renew the token and watch again
    assert "expired" in status["message"]
