"""The http-gateway's pure parts: routes read from the protos, requests built from
paths and queries, status mapping, stream framing and the OpenAPI document."""

from __future__ import annotations

import json

import grpc
import pytest

from services.http_gateway import openapi, streams
from services.http_gateway.errors import HTTP_STATUS, http_status, invalid, status_json
from services.http_gateway.routes import RequestError, build_request, find, routes
from shared.pb import alerts_pb2, dispatch_pb2, shipment_pb2, tracking_pb2

TABLE = routes()


def test_every_rpc_of_both_services_has_a_route_from_its_annotation() -> None:
    rpcs = {route.rpc_path for route in TABLE}
    for service in (
        tracking_pb2.DESCRIPTOR.services_by_name["TrackingService"],
        dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"],
    ):
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in rpcs


def test_the_most_specific_route_wins() -> None:
    found = find(TABLE, "GET", "/v1/shipments/S-1:watch")
    assert found is not None
    route, variables = found
    assert route.method.name == "WatchShipment"
    assert variables == {"shipment_id": "S-1"}
    found = find(TABLE, "GET", "/v1/shipments/S%2F1")
    assert found is not None
    assert found[0].method.name == "GetShipment"
    assert found[1] == {"shipment_id": "S/1"}
    assert find(TABLE, "PUT", "/v1/shipments/S-1") is None
    subscribe = find(TABLE, "POST", "/v1/alerts:subscribe")
    assert subscribe is not None
    assert subscribe[0].body == "*"


def test_query_parameters_are_field_paths_by_either_name() -> None:
    route, variables = find(TABLE, "GET", "/v1/alerts:subscribe") or pytest.fail("no route")
    query = [
        ("filter.kinds", "ALERT_KIND_LATE"),
        ("filter.kinds", "2"),
        ("filter.minSeverity", "SEVERITY_WARNING"),
        ("fromBeginning", "true"),
        ("resume_token", "abc"),
    ]
    message = build_request(route, variables, query, b"")
    assert isinstance(message, dispatch_pb2.SubscribeDelaysRequest)
    assert list(message.filter.kinds) == [alerts_pb2.ALERT_KIND_LATE, alerts_pb2.ALERT_KIND_AT_RISK]
    assert message.filter.min_severity == alerts_pb2.SEVERITY_WARNING
    assert message.from_beginning is True
    assert message.resume_token == "abc"


def test_list_takes_repeated_enums_numbers_and_timestamps() -> None:
    route, variables = find(TABLE, "GET", "/v1/shipments") or pytest.fail("no route")
    message = build_request(
        route,
        variables,
        [
            ("statuses", "SHIPMENT_STATUS_IN_TRANSIT"),
            ("page_size", "20"),
            ("updatedSince", "2026-12-03T08:00:00Z"),
        ],
        b"",
    )
    assert isinstance(message, tracking_pb2.ListShipmentsRequest)
    assert list(message.statuses) == [shipment_pb2.SHIPMENT_STATUS_IN_TRANSIT]
    assert message.page_size == 20
    assert message.updated_since.seconds > 0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ([("nope", "1")], "nope"),
        ([("page_size", "many")], "page_size"),
        ([("page_size", "1"), ("page_size", "2")], "page_size"),
        ([("customer_id.x", "1")], "customer_id.x"),
    ],
)
def test_a_request_that_does_not_map_names_the_field(
    query: list[tuple[str, str]], field: str
) -> None:
    route, variables = find(TABLE, "GET", "/v1/shipments") or pytest.fail("no route")
    with pytest.raises(RequestError) as error:
        build_request(route, variables, query, b"")
    assert error.value.field == field


def test_a_post_body_is_the_request_and_path_variables_win() -> None:
    route, variables = find(TABLE, "POST", "/v1/alerts:subscribe") or pytest.fail("no route")
    body = json.dumps({"filter": {"shipmentIds": ["a", "b"]}, "from_beginning": True}).encode()
    message = build_request(route, variables, [], body)
    assert isinstance(message, dispatch_pb2.SubscribeDelaysRequest)
    assert list(message.filter.shipment_ids) == ["a", "b"]
    assert message.from_beginning
    for bad in (b"[1]", b"{not json"):
        with pytest.raises(RequestError):
            build_request(route, variables, [], bad)


def test_every_grpc_status_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert http_status(3) == 400
    assert http_status(16) == 401
    assert http_status(5) == 404
    assert http_status(14) == 503
    assert http_status(99) == 500


def test_an_error_body_keeps_its_field_violations() -> None:
    body = status_json(invalid("page_size", "must be between 1 and 500"))
    assert body["code"] == 3
    (details,) = body["details"]
    assert details["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert details["fieldViolations"] == [
        {"field": "page_size", "description": "must be between 1 and 500"}
    ]


def test_stream_framing_and_positions() -> None:
    assert streams.wants_ndjson("application/x-ndjson")
    assert not streams.wants_ndjson("text/event-stream, application/x-ndjson")
    assert not streams.wants_ndjson("*/*")
    response = dispatch_pb2.SubscribeDelaysResponse(resume_token="tok-1")
    request = dispatch_pb2.SubscribeDelaysRequest()
    assert streams.position(request, response) == "tok-1"
    watch = tracking_pb2.WatchByTokenRequest(tracking_token="t")
    state = tracking_pb2.WatchByTokenResponse(shipment=tracking_pb2.PublicShipment(reference="r"))
    same = tracking_pb2.WatchByTokenResponse(shipment=tracking_pb2.PublicShipment(reference="r"))
    other = tracking_pb2.WatchByTokenResponse(shipment=tracking_pb2.PublicShipment(reference="x"))
    assert streams.position(watch, state) == streams.position(watch, same)
    assert streams.position(watch, state) != streams.position(watch, other)
    sse = streams.Framing(ndjson=False)
    assert sse.message("tok-1", response) == b'id: tok-1\ndata: {"resumeToken":"tok-1"}\n\n'
    assert sse.heartbeat().startswith(b":")
    assert sse.error(invalid("x", "y")).startswith(b"event: error\ndata: {")
    ndjson = streams.Framing(ndjson=True)
    line = json.loads(ndjson.message("tok-1", response))
    assert line == {"id": "tok-1", "result": {"resumeToken": "tok-1"}}
    assert json.loads(ndjson.error(invalid("x", "y")))["error"]["code"] == 3


def test_the_openapi_document_covers_every_route_and_marks_public_ones() -> None:
    document = openapi.document(TABLE)
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert len(operations) == len(TABLE)
    track = document["paths"]["/v1/track/{tracking_token}"]["get"]
    assert "security" not in track
    assert document["paths"]["/v1/shipments"]["get"]["security"] == [{"bearer": []}]
    names = {p["name"] for p in document["paths"]["/v1/alerts:subscribe"]["get"]["parameters"]}
    assert {"filter.kinds", "filter.minSeverity", "fromBeginning", "Last-Event-ID"} <= names
    json.dumps(document)  # serialisable
