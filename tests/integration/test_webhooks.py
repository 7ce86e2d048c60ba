"""Webhooks end to end: real Kafka and PostgreSQL, the service in-process, and a real
aiohttp receiver on loopback (CARGOTRACK_WEBHOOK_ALLOW_PRIVATE=1, as `cargotrack dev`).

The receiver verifies each request's signature as docs/webhooks.md tells receivers to,
answers 500 where the test says so, and logs what it got; the test then compares that
log and ListDeliveries with what at-least-once, per-shipment order, deduplication by
alert id and dead-lettering after N attempts promise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from services.webhooks.app import server
from services.webhooks.guard import TargetRefused, check_target
from services.webhooks.sender import Sender
from shared.auth import Role
from shared.config import DatabaseSettings, Settings, WebhookSettings
from shared.db import migrate
from shared.domain import webhooks as rules
from shared.envelopes import encode, timestamp, utc_now
from shared.pb import alerts_pb2, envelope_pb2, webhooks_pb2, webhooks_pb2_grpc
from shared.readmodel import webhooks as store
from shared.readmodel.webhooks import Claimed
from tests.ingest_helpers import Metadata, bearer, wait_health
from tests.projection_helpers import in_process_server_settings, producer_for

pytestmark = pytest.mark.timeout(120)

DISPATCHER = bearer(Role.DISPATCHER, tenant="tenant-a")
MAX_ATTEMPTS = 3


@dataclass
class Received:
    path: str
    alert_id: str
    shipment_id: str
    status: int
    body: dict[str, object]


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1 that checks signatures and logs every request."""

    secrets: dict[str, str] = field(default_factory=dict)  # path -> signing secret
    #: path -> the status to answer, given the alert id and how often it came before
    #: (200 for a path without a script)
    scripts: dict[str, Callable[[str, int], int]] = field(default_factory=dict)
    log: list[Received] = field(default_factory=list)
    bad_signatures: list[str] = field(default_factory=list)
    #: Requests to /slow arrive here, and are answered once `go` is set.
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path
        if path == "/slow":
            self.arrived.set()
            await self.go.wait()
        try:
            rules.verify_signature(
                self.secrets[path], request.headers[rules.SIGNATURE_HEADER], body, time.time()
            )
        except (KeyError, rules.SignatureError) as error:
            self.bad_signatures.append(f"{path}: {error!r}")
            return web.Response(status=400)
        document = json.loads(body)
        alert = document["alert"]
        alert_id = request.headers[rules.ALERT_ID_HEADER]
        assert alert_id == alert["alertId"]
        seen = sum(1 for r in self.log if r.path == path and r.alert_id == alert_id)
        script = self.scripts.get(path)
        status = script(alert_id, seen) if script is not None else 200
        self.log.append(Received(path, alert_id, alert.get("shipmentId", ""), status, document))
        if path == "/redirect":
            raise web.HTTPTemporaryRedirect(self.url("/hook"))
        return web.Response(status=status, text="nope" if status >= 400 else "")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def got(self, path: str) -> list[Received]:
        return [r for r in self.log if r.path == path]


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def webhook_service(
    settings: Settings,
) -> AsyncIterator[webhooks_pb2_grpc.WebhookServiceStub]:
    """The service started in-process (as `cargotrack serve webhooks` runs it), SERVING."""
    async with (
        server(settings) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        await wait_health(channel)
        yield webhooks_pb2_grpc.WebhookServiceStub(channel)


def webhook_settings(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str, **extra: str
) -> Settings:
    return in_process_server_settings(
        kafka_bootstrap,
        database_url,
        topic_prefix,
        pg_schema,
        CARGOTRACK_SHUTDOWN_GRACE_S="1",
        CARGOTRACK_WEBHOOK_ALLOW_PRIVATE="1",
        CARGOTRACK_WEBHOOK_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        CARGOTRACK_WEBHOOK_BACKOFF_S="0.3",
        CARGOTRACK_WEBHOOK_BACKOFF_MAX_S="1",
        CARGOTRACK_WEBHOOK_POLL_S="0.05",
        CARGOTRACK_WEBHOOK_TIMEOUT_S="5",
        **extra,
    )


def alert(
    shipment_id: str,
    kind: alerts_pb2.AlertKind.ValueType,
    severity: alerts_pb2.Severity.ValueType,
    *,
    tenant: str = "tenant-a",
) -> envelope_pb2.Envelope:
    """An alert record as the projector's outbox relay writes it (published now)."""
    message = alerts_pb2.Alert(
        alert_id=str(uuid.uuid4()),
        shipment_id=shipment_id,
        vehicle_id="veh-1",
        kind=kind,
        severity=severity,
        message=f"{alerts_pb2.AlertKind.Name(kind)} for {shipment_id}",
    )
    now = utc_now()
    message.detected_at.CopyFrom(timestamp(now))
    envelope = envelope_pb2.Envelope(
        event_id=message.alert_id, tenant_id=tenant, principal="projector", alert=message
    )
    envelope.occurred_at.CopyFrom(timestamp(now))
    envelope.recorded_at.CopyFrom(timestamp(now))
    return envelope


async def publish(settings: Settings, envelopes: list[envelope_pb2.Envelope]) -> None:
    async with producer_for(settings) as producer:
        for envelope in envelopes:
            record = encode(envelope, envelope.alert.shipment_id)
            await (
                await producer.send(
                    settings.topics.shipment_alerts,
                    record.value,
                    key=record.key,
                    headers=record.headers,
                )
            )


def attempts_counted(outcome: str) -> float:
    """cargotrack_webhook_deliveries_total{outcome} in this process's registry."""
    value = REGISTRY.get_sample_value("cargotrack_webhook_deliveries_total", {"outcome": outcome})
    return value or 0.0


async def deliveries(
    stub: webhooks_pb2_grpc.WebhookServiceStub,
    webhook_id: str,
    metadata: Metadata = DISPATCHER,
    page_size: int = 0,
) -> list[webhooks_pb2.Delivery]:
    """Every delivery of the webhook, following page tokens."""
    found: list[webhooks_pb2.Delivery] = []
    token = ""
    while True:
        page = await stub.ListDeliveries(
            webhooks_pb2.ListDeliveriesRequest(
                webhook_id=webhook_id, page_size=page_size, page_token=token
            ),
            metadata=metadata,
        )
        found.extend(page.deliveries)
        token = page.next_page_token
        if not token:
            return found


async def until_finished(
    stub: webhooks_pb2_grpc.WebhookServiceStub, webhook_id: str, count: int
) -> list[webhooks_pb2.Delivery]:
    """The webhook's deliveries once `count` of them are no longer pending."""
    async with asyncio.timeout(60):
        while True:
            found = await deliveries(stub, webhook_id)
            done = [d for d in found if d.status != webhooks_pb2.DELIVERY_STATUS_PENDING]
            if len(done) >= count:
                return found
            await asyncio.sleep(0.1)


async def test_deliveries_are_signed_retried_ordered_deduplicated_and_dead_lettered(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = webhook_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    before = {outcome: attempts_counted(outcome) for outcome in ("delivered", "retry", "dead")}
    async with receiving() as receiver, webhook_service(settings) as stub:
        given_secret = "s" * 40
        flaky = await stub.CreateWebhook(
            webhooks_pb2.CreateWebhookRequest(
                url=receiver.url("/flaky"), secret=given_secret, description="TMS"
            ),
            metadata=DISPATCHER,
        )
        down = await stub.CreateWebhook(
            webhooks_pb2.CreateWebhookRequest(
                url=receiver.url("/down"),
                filter=webhooks_pb2.WebhookFilter(min_severity=alerts_pb2.SEVERITY_WARNING),
            ),
            metadata=DISPATCHER,
        )
        assert flaky.secret == given_secret
        assert down.secret.startswith("whsec_")  # generated, shown this once
        receiver.secrets = {"/flaky": flaky.secret, "/down": down.secret}

        first = alert("S1", alerts_pb2.ALERT_KIND_LATE, alerts_pb2.SEVERITY_CRITICAL)
        second = alert("S1", alerts_pb2.ALERT_KIND_RECOVERED, alerts_pb2.SEVERITY_INFO)
        other = alert("S2", alerts_pb2.ALERT_KIND_AT_RISK, alerts_pb2.SEVERITY_WARNING)
        foreign = alert(
            "S9", alerts_pb2.ALERT_KIND_LATE, alerts_pb2.SEVERITY_CRITICAL, tenant="tenant-b"
        )
        first_id = first.alert.alert_id
        # /flaky fails the first attempt of S1's first alert; /down fails everything.
        receiver.scripts = {
            "/flaky": lambda alert_id, seen: 500 if alert_id == first_id and seen == 0 else 200,
            "/down": lambda _alert_id, _seen: 500,
        }
        # The first alert twice: the relay publishes at least once.
        await publish(settings, [first, first, second, other, foreign])

        flaky_log = await until_finished(stub, flaky.webhook.webhook_id, 3)
        down_log = await until_finished(stub, down.webhook.webhook_id, 2)

        assert receiver.bad_signatures == []
        # /flaky: retried after the 500; S1's second alert only after its first
        # succeeded; each alert delivered once although the first was read twice.
        got = receiver.got("/flaky")
        s1 = [(r.alert_id, r.status) for r in got if r.shipment_id == "S1"]
        assert s1 == [(first_id, 500), (first_id, 200), (second.alert.alert_id, 200)]
        assert sorted(r.alert_id for r in got if r.status == 200) == sorted(
            [first_id, second.alert.alert_id, other.alert.alert_id]
        )
        assert all(r.body["tenantId"] == "tenant-a" for r in got)
        assert {d.alert_id: (d.status, d.attempts) for d in flaky_log} == {
            first_id: (webhooks_pb2.DELIVERY_STATUS_DELIVERED, 2),
            second.alert.alert_id: (webhooks_pb2.DELIVERY_STATUS_DELIVERED, 1),
            other.alert.alert_id: (webhooks_pb2.DELIVERY_STATUS_DELIVERED, 1),
        }
        # /down: only WARNING and above; MAX_ATTEMPTS attempts each, then dead.
        attempts = [r.alert_id for r in receiver.got("/down")]
        assert sorted(attempts) == sorted([first_id] * MAX_ATTEMPTS + [other.alert.alert_id] * 3)
        assert {d.alert_id: (d.status, d.attempts, d.last_status_code) for d in down_log} == {
            first_id: (webhooks_pb2.DELIVERY_STATUS_DEAD, MAX_ATTEMPTS, 500),
            other.alert.alert_id: (webhooks_pb2.DELIVERY_STATUS_DEAD, MAX_ATTEMPTS, 500),
        }
        assert all(d.last_error == "HTTP 500: nope" for d in down_log)

        # The log pages, newest first, and filters by status.
        paged = await deliveries(stub, flaky.webhook.webhook_id, page_size=1)
        assert [d.delivery_id for d in paged] == sorted(
            (d.delivery_id for d in flaky_log), reverse=True
        )
        dead = await stub.ListDeliveries(
            webhooks_pb2.ListDeliveriesRequest(
                webhook_id=flaky.webhook.webhook_id,
                statuses=[webhooks_pb2.DELIVERY_STATUS_DEAD],
            ),
            metadata=DISPATCHER,
        )
        assert list(dead.deliveries) == []
    # The metrics count the attempts by outcome (the service ran in this process).
    counted = {outcome: attempts_counted(outcome) - n for outcome, n in before.items()}
    assert counted == {"delivered": 3, "retry": 1 + 2 * (MAX_ATTEMPTS - 1), "dead": 2}


async def test_two_workers_share_the_deliveries_without_attempting_one_twice(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """Two replicas: the consumer group splits the partitions, the leases split the
    deliveries; each alert reaches the endpoint once, each shipment's in order."""
    settings = webhook_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    async with (
        receiving() as receiver,
        webhook_service(settings) as first,
        webhook_service(settings) as second,
    ):
        created = await first.CreateWebhook(
            webhooks_pb2.CreateWebhookRequest(url=receiver.url("/both")), metadata=DISPATCHER
        )
        receiver.secrets = {"/both": created.secret}
        kinds = [alerts_pb2.ALERT_KIND_AT_RISK, alerts_pb2.ALERT_KIND_LATE] * 2
        published = [
            alert(f"S{n}", kind, alerts_pb2.SEVERITY_WARNING) for n in range(4) for kind in kinds
        ]
        await publish(settings, published)
        log = await until_finished(second, created.webhook.webhook_id, len(published))
    assert {d.status for d in log} == {webhooks_pb2.DELIVERY_STATUS_DELIVERED}
    got = receiver.got("/both")
    assert sorted(r.alert_id for r in got) == sorted(e.alert.alert_id for e in published)
    for n in range(4):
        sent = [e.alert.alert_id for e in published if e.alert.shipment_id == f"S{n}"]
        assert [r.alert_id for r in got if r.shipment_id == f"S{n}"] == sent


async def test_a_stopping_worker_releases_the_attempts_it_abandons(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    """Stopped mid-attempt, the worker records no outcome (the endpoint may or may not
    have got it: at least once) and releases its lease: the delivery is due again for
    any worker at once instead of after the lease."""
    settings = webhook_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    async with receiving() as receiver:
        async with webhook_service(settings) as stub:
            created = await stub.CreateWebhook(
                webhooks_pb2.CreateWebhookRequest(url=receiver.url("/slow")), metadata=DISPATCHER
            )
            receiver.secrets = {"/slow": created.secret}
            await publish(
                settings,
                [alert("S1", alerts_pb2.ALERT_KIND_LATE, alerts_pb2.SEVERITY_CRITICAL)],
            )
            async with asyncio.timeout(60):
                await receiver.arrived.wait()
        receiver.go.set()  # the worker is gone; let the handler finish
    connection = await asyncpg.connect(database_url, server_settings={"search_path": pg_schema})
    try:
        row = await connection.fetchrow(
            "SELECT status, attempts, leased_until, lease_token FROM webhook_deliveries"
        )
    finally:
        await connection.close()
    assert row is not None
    assert dict(row) == {
        "status": "pending",
        "attempts": 0,
        "leased_until": None,
        "lease_token": None,
    }


async def test_the_api_is_the_tenants_and_validates(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, pg_schema: str
) -> None:
    settings = webhook_settings(kafka_bootstrap, database_url, topic_prefix, pg_schema)
    async with webhook_service(settings) as stub:
        created = [
            await stub.CreateWebhook(
                webhooks_pb2.CreateWebhookRequest(url=f"https://127.0.0.1:9/{n}"),
                metadata=DISPATCHER,
            )
            for n in range(3)
        ]
        ops = bearer(Role.OPS, tenant="tenant-a")
        listed: list[webhooks_pb2.Webhook] = []
        token = ""
        while True:
            page = await stub.ListWebhooks(
                webhooks_pb2.ListWebhooksRequest(page_size=2, page_token=token), metadata=ops
            )
            listed.extend(page.webhooks)
            token = page.next_page_token
            if not token:
                break
        assert [w.webhook_id for w in listed] == [c.webhook.webhook_id for c in created]
        assert all(c.secret and c.secret not in str(listed) for c in created)

        other_tenant = bearer(Role.DISPATCHER, tenant="tenant-b")
        empty = await stub.ListWebhooks(webhooks_pb2.ListWebhooksRequest(), metadata=other_tenant)
        assert list(empty.webhooks) == []
        target = created[0].webhook.webhook_id
        for call in (
            stub.DeleteWebhook(
                webhooks_pb2.DeleteWebhookRequest(webhook_id=target), metadata=other_tenant
            ),
            stub.ListDeliveries(
                webhooks_pb2.ListDeliveriesRequest(webhook_id=target), metadata=other_tenant
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        customer = bearer(Role.CUSTOMER, tenant="tenant-a", customer_id="c1")
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ListWebhooks(webhooks_pb2.ListWebhooksRequest(), metadata=customer)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        await stub.DeleteWebhook(
            webhooks_pb2.DeleteWebhookRequest(webhook_id=target), metadata=DISPATCHER
        )
        after = await stub.ListWebhooks(webhooks_pb2.ListWebhooksRequest(), metadata=DISPATCHER)
        assert target not in [w.webhook_id for w in after.webhooks]
        # Its log stays readable.
        await stub.ListDeliveries(
            webhooks_pb2.ListDeliveriesRequest(webhook_id=target), metadata=DISPATCHER
        )

        def forged(document: object) -> str:
            raw = json.dumps(document).encode()
            return base64.urlsafe_b64encode(raw).decode().rstrip("=")

        absurd = [
            "!!!",
            forged([1]),
            forged({"c": "0001-01-01T00:00:00+14:00", "w": "wh_x"}),
            forged({"c": "2026-01-01T00:00:00", "w": "wh_x"}),
            forged({"c": "2026-01-01T00:00:00+00:00", "w": "wh\u0000x"}),
            forged({"c": 5, "w": "wh_x"}),
        ]
        for page_token in absurd:
            with pytest.raises(grpc.aio.AioRpcError) as refused_token:
                await stub.ListWebhooks(
                    webhooks_pb2.ListWebhooksRequest(page_token=page_token), metadata=DISPATCHER
                )
            assert refused_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT, page_token
        for page_token in ("!!!", forged(2**63), forged(True), forged("1"), forged(0)):
            with pytest.raises(grpc.aio.AioRpcError) as refused_token:
                await stub.ListDeliveries(
                    webhooks_pb2.ListDeliveriesRequest(webhook_id=target, page_token=page_token),
                    metadata=DISPATCHER,
                )
            assert refused_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT, page_token
        for webhook_id in ("", "a b", "x" * 129, "a\x00b"):
            with pytest.raises(grpc.aio.AioRpcError) as refused_id:
                await stub.DeleteWebhook(
                    webhooks_pb2.DeleteWebhookRequest(webhook_id=webhook_id), metadata=DISPATCHER
                )
            assert refused_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT, webhook_id

        for request, field_name in (
            (webhooks_pb2.CreateWebhookRequest(url="ftp://example.com/"), "url"),
            (
                webhooks_pb2.CreateWebhookRequest(url="https://x.invalid/", secret="short"),
                "secret",
            ),
            (
                webhooks_pb2.CreateWebhookRequest(
                    url="https://127.0.0.1/",
                    filter=webhooks_pb2.WebhookFilter(kinds=[alerts_pb2.ALERT_KIND_UNSPECIFIED]),
                ),
                "filter.kinds[0]",
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await stub.CreateWebhook(request, metadata=DISPATCHER)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field_name in (invalid.value.details() or "")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/",
        "http://2130706433/",  # 127.0.0.1 as one number: resolves to loopback
    ],
)
async def test_the_guard_refuses_private_targets_at_registration(url: str) -> None:
    target, violations = rules.check_url(url, allow_http=True)
    assert violations == []
    assert target is not None
    with pytest.raises(TargetRefused):
        await check_target(target, allow_private=False)
    await check_target(target, allow_private=True)  # the development setting


async def test_the_guard_refuses_private_targets_at_delivery() -> None:
    """A host that resolved to a public address at registration may resolve to a
    private one later (DNS rebinding): the sender's resolver refuses it then, and a
    redirect is not followed."""
    async with receiving() as receiver:
        receiver.secrets = {"/hook": "k" * 32, "/redirect": "k" * 32}
        claimed = Claimed(
            delivery_id=1,
            lease_token=uuid.uuid4(),
            webhook_id="wh_x",
            alert_id="a1",
            shipment_id="S1",
            attempts=0,
            body=b'{"alert": {"alertId": "a1"}}',
            url=f"http://localhost:{receiver.port}/hook",
            secret="k" * 32,
        )
        guarded = Sender(WebhookSettings(allow_private=False), pool=None)  # type: ignore[arg-type]
        async with guarded.session() as session:
            status, error = await guarded.post(session, claimed)
            assert status == 0
            assert "is a loopback address" in error
            literal = dataclasses.replace(claimed, url=receiver.url("/hook"))
            status, error = await guarded.post(session, literal)
            assert (status, error.startswith("target refused")) == (0, True)
        assert receiver.log == []

        allowed = Sender(WebhookSettings(allow_private=True), pool=None)  # type: ignore[arg-type]
        async with allowed.session() as session:
            redirected = dataclasses.replace(claimed, url=receiver.url("/redirect"))
            status, error = await allowed.post(session, redirected)
            assert status == 307
            assert error.startswith("HTTP 307")
        assert [r.path for r in receiver.log] == ["/redirect"]  # /hook never reached


async def test_rebuild_carries_endpoints_and_deliveries_over(
    database_url: str, pg_schema: str
) -> None:
    """`cargotrack rebuild` swaps schemas: webhooks are not rebuilt from the log, so
    `copy_to_schema` moves them, and new delivery ids continue after the copied ones."""
    rebuilt = f"{pg_schema}_rebuilt"
    for schema in (pg_schema, rebuilt):
        await migrate(DatabaseSettings(url=database_url, schema=schema))
    live = await asyncpg.connect(database_url, server_settings={"search_path": pg_schema})
    try:
        await store.create_endpoint(
            live,
            webhook_id="wh_1",
            tenant_id="tenant-a",
            url="https://hooks.example.com/",
            secret="k" * 32,
            min_severity=0,
            kinds=[],
            description="",
            created_by="dispatcher@tenant-a",
        )
        delivery = store.NewDelivery("wh_1", "tenant-a", "a1", "S1", 1, b"{}")
        assert await store.insert_deliveries(live, [delivery]) == 1
        async with live.transaction():
            await store.copy_to_schema(live, pg_schema, rebuilt)
        await live.execute(f'SET search_path TO "{rebuilt}"')
        assert [e.webhook_id for e in await store.live_endpoints(live, ["tenant-a"])] == ["wh_1"]
        second = dataclasses.replace(delivery, alert_id="a2")
        assert await store.insert_deliveries(live, [second]) == 1
        # Already recorded in the copy: the same alert is not recorded twice.
        assert await store.insert_deliveries(live, [delivery]) == 0
        rows = await live.fetch(
            "SELECT delivery_id, alert_id FROM webhook_deliveries ORDER BY delivery_id"
        )
        assert [r["alert_id"] for r in rows] == ["a1", "a2"]
        assert rows[0]["delivery_id"] == 1  # copied as it was
        assert rows[1]["delivery_id"] > 1  # the sequence continues after the copy
    finally:
        await live.execute(f'DROP SCHEMA IF EXISTS "{rebuilt}" CASCADE')
        await live.close()


async def test_deleting_blanks_the_secret_and_old_deliveries_are_pruned(
    database_url: str, pg_schema: str
) -> None:
    await migrate(DatabaseSettings(url=database_url, schema=pg_schema))
    connection = await asyncpg.connect(database_url, server_settings={"search_path": pg_schema})
    try:
        await store.create_endpoint(
            connection,
            webhook_id="wh_1",
            tenant_id="tenant-a",
            url="https://hooks.example.com/",
            secret="k" * 32,
            min_severity=0,
            kinds=[],
            description="",
            created_by="dispatcher@tenant-a",
        )
        old, recent = (store.NewDelivery("wh_1", "tenant-a", a, "S1", 1, b"{}") for a in "ab")
        await store.insert_deliveries(connection, [old, recent])
        await connection.execute(
            "UPDATE webhook_deliveries SET status = 'delivered',"
            " finished_at = now() - interval '31 days' WHERE alert_id = 'a'"
        )
        async with connection.transaction():
            assert await store.delete_endpoint(connection, "tenant-a", "wh_1")
        row = await connection.fetchrow("SELECT secret FROM webhook_endpoints")
        assert row is not None
        assert row["secret"] == ""
        # The old delivery goes; the one just cancelled stays, and so does its webhook.
        assert await store.prune(connection, 30) == (1, 0)
        statuses = await connection.fetch("SELECT alert_id, status FROM webhook_deliveries")
        assert [tuple(r) for r in statuses] == [("b", "cancelled")]
        await connection.execute(
            "UPDATE webhook_deliveries SET finished_at = now() - interval '31 days'"
        )
        await connection.execute(
            "UPDATE webhook_endpoints SET deleted_at = now() - interval '31 days'"
        )
        assert await store.prune(connection, 30) == (1, 1)
        assert await connection.fetchval("SELECT count(*) FROM webhook_endpoints") == 0
    finally:
        await connection.close()


async def test_a_lease_left_by_a_crashed_worker_runs_out_and_fences_its_outcome(
    database_url: str, pg_schema: str
) -> None:
    """A worker that died mid-attempt holds its lease until it runs out; then another
    worker attempts the delivery (at least once), and a late outcome of the first (a
    zombie) is not recorded over the second's."""
    await migrate(DatabaseSettings(url=database_url, schema=pg_schema))
    connection = await asyncpg.connect(database_url, server_settings={"search_path": pg_schema})
    try:
        await store.create_endpoint(
            connection,
            webhook_id="wh_1",
            tenant_id="tenant-a",
            url="https://hooks.example.com/",
            secret="k" * 32,
            min_severity=0,
            kinds=[],
            description="",
            created_by="dispatcher@tenant-a",
        )
        await store.insert_deliveries(
            connection, [store.NewDelivery("wh_1", "tenant-a", "a1", "S1", 1, b"{}")]
        )
        _, heads = await store.pending_heads(connection, 10)
        (crashed,) = await store.claim(connection, [h.delivery_id for h in heads], 60.0)
        # Leased: no other worker sees it, nor claims it.
        assert (await store.pending_heads(connection, 10))[1] == []
        assert await store.claim(connection, [crashed.delivery_id], 60.0) == []
        # The lease runs out (as 60 s later).
        await connection.execute("UPDATE webhook_deliveries SET leased_until = now()")
        _, heads = await store.pending_heads(connection, 10)
        (retried,) = await store.claim(connection, [h.delivery_id for h in heads], 60.0)
        assert retried.lease_token != crashed.lease_token
        for lease, recorded in ((crashed, False), (retried, True)):
            done = await store.record_attempt(
                connection,
                lease,
                status=store.DELIVERED,
                status_code=200,
                error="",
                retry_in_s=0.0,
            )
            assert done is recorded
        row = await connection.fetchrow("SELECT status, attempts FROM webhook_deliveries")
        assert row is not None
        assert tuple(row) == ("delivered", 1)
    finally:
        await connection.close()
