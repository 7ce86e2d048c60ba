"""WebhookService: a tenant's endpoints and their delivery log (docs/webhooks.md).

The tenant is always the caller's (from its token); another tenant's webhook is
NOT_FOUND, exactly like one that does not exist. A new endpoint's URL is checked
(scheme, host, no credentials) and so is every address its host resolves to (the SSRF
guard, services/webhooks/guard.py): INVALID_ARGUMENT on `url` otherwise. The signing
secret is returned by CreateWebhook only; it is stored as given (the sender needs the
key itself to compute HMACs) and never listed.

Page tokens are opaque to clients: base64url of the position after the last item
returned. They carry no authority: the tenant and the webhook always come from the
token and the request, so an edited page token only moves the start within the
caller's own data.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import secrets
from datetime import UTC, datetime
from typing import NoReturn

import asyncpg
import grpc

from services.webhooks.guard import TargetRefused, check_target
from shared.auth import current_principal
from shared.config import WebhookSettings
from shared.db import Connection
from shared.domain import webhooks as rules
from shared.domain.validation import Violation
from shared.envelopes import timestamp
from shared.pb import alerts_pb2, webhooks_pb2, webhooks_pb2_grpc
from shared.readmodel import webhooks as store
from shared.rpc import Context, abort_invalid
from shared.rpc_db import pooled_connection

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
#: Live endpoints one tenant may have.
MAX_WEBHOOKS_PER_TENANT = 100
MAX_DESCRIPTION_LENGTH = 500
#: How long a request waits for a pooled connection before UNAVAILABLE.
ACQUIRE_TIMEOUT_S = 5.0

STATUS_NAMES = {
    webhooks_pb2.DELIVERY_STATUS_PENDING: store.PENDING,
    webhooks_pb2.DELIVERY_STATUS_DELIVERED: store.DELIVERED,
    webhooks_pb2.DELIVERY_STATUS_DEAD: store.DEAD,
    webhooks_pb2.DELIVERY_STATUS_CANCELLED: store.CANCELLED,
}
STATUS_VALUES = {name: value for value, name in STATUS_NAMES.items()}


def _token(document: object) -> str:
    raw = json.dumps(document, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _untoken(token: str) -> object:
    """The document of a page token; ValueError if it is not one."""
    if len(token) > 1024:
        raise ValueError("too long")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as error:
        raise ValueError(str(error)) from None


def _check_webhook_id(value: str, violations: list[Violation]) -> None:
    if not value:
        violations.append(Violation("webhook_id", "required"))
    elif len(value) > 128 or not value.isprintable() or any(ch.isspace() for ch in value):
        violations.append(Violation("webhook_id", "is not a webhook id"))


def _webhooks_position(document: object) -> tuple[datetime, str]:
    """The (created_at, webhook_id) a ListWebhooks page token holds; ValueError (or
    KeyError, TypeError, OverflowError) for anything this service did not issue: an
    edited token must still not reach PostgreSQL with values it refuses."""
    if not isinstance(document, dict):
        raise ValueError("not an object")
    created_at, webhook_id = document["c"], document["w"]
    if not isinstance(created_at, str) or not isinstance(webhook_id, str):
        raise TypeError("not strings")
    moment = datetime.fromisoformat(created_at)
    if moment.tzinfo is None:
        raise ValueError("naive time")
    moment = moment.astimezone(UTC)  # OverflowError beyond year 1..9999
    if not 1 < moment.year < 9999:
        raise ValueError("time out of range")
    violations: list[Violation] = []
    _check_webhook_id(webhook_id, violations)
    if violations:
        raise ValueError("not a webhook id")
    return moment, webhook_id


def _page_size(value: int, violations: list[Violation]) -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        violations.append(Violation("page_size", f"0 (default {DEFAULT_PAGE_SIZE}) to 500"))
    return value or DEFAULT_PAGE_SIZE


def _webhook(endpoint: store.Endpoint) -> webhooks_pb2.Webhook:
    message = webhooks_pb2.Webhook(
        webhook_id=endpoint.webhook_id,
        url=endpoint.url,
        description=endpoint.description,
        created_by=endpoint.created_by,
        filter=webhooks_pb2.WebhookFilter(
            min_severity=endpoint.min_severity,  # type: ignore[arg-type]
            kinds=list(endpoint.kinds),  # type: ignore[arg-type]
        ),
    )
    message.created_at.CopyFrom(timestamp(endpoint.created_at))
    return message


def _delivery(row: store.DeliveryRow) -> webhooks_pb2.Delivery:
    message = webhooks_pb2.Delivery(
        delivery_id=row.delivery_id,
        webhook_id=row.webhook_id,
        alert_id=row.alert_id,
        shipment_id=row.shipment_id,
        kind=row.kind,  # type: ignore[arg-type]
        status=STATUS_VALUES[row.status],
        attempts=row.attempts,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
    )
    message.created_at.CopyFrom(timestamp(row.created_at))
    if row.last_attempt_at is not None:
        message.last_attempt_at.CopyFrom(timestamp(row.last_attempt_at))
    if row.status == store.PENDING:
        message.next_attempt_at.CopyFrom(timestamp(row.next_attempt_at))
    return message


class WebhookServicer(webhooks_pb2_grpc.WebhookServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: WebhookSettings) -> None:
        self._pool = pool
        self._settings = settings

    def _connection(self, context: Context) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A pooled connection; UNAVAILABLE when the database cannot be reached."""
        return pooled_connection(self._pool, context, timeout_s=ACQUIRE_TIMEOUT_S)

    @staticmethod
    async def _not_found(context: Context) -> NoReturn:
        await context.abort(grpc.StatusCode.NOT_FOUND, "webhook not found")
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def _filter(
        self, request: webhooks_pb2.WebhookFilter, violations: list[Violation]
    ) -> tuple[int, list[int]]:
        if request.min_severity not in set(alerts_pb2.Severity.values()):
            violations.append(Violation("filter.min_severity", "unknown severity"))
        known = set(alerts_pb2.AlertKind.values()) - {alerts_pb2.ALERT_KIND_UNSPECIFIED}
        for i, kind in enumerate(request.kinds):
            if kind not in known:
                violations.append(Violation(f"filter.kinds[{i}]", "unknown or unspecified kind"))
        return int(request.min_severity), sorted({int(kind) for kind in request.kinds})

    async def CreateWebhook(
        self, request: webhooks_pb2.CreateWebhookRequest, context: Context
    ) -> webhooks_pb2.CreateWebhookResponse:
        principal = current_principal()
        target, violations = rules.check_url(request.url, allow_http=self._settings.allow_http)
        min_severity, kinds = self._filter(request.filter, violations)
        if request.secret:
            violations += rules.check_secret(request.secret)
        if len(request.description) > MAX_DESCRIPTION_LENGTH:
            violations.append(
                Violation("description", f"at most {MAX_DESCRIPTION_LENGTH} characters")
            )
        elif "\x00" in request.description:
            violations.append(Violation("description", "must not contain NUL characters"))
        if violations:
            await abort_invalid(context, violations, "invalid webhook")
        assert target is not None
        try:
            await check_target(target, self._settings.allow_private)
        except TargetRefused as refused:
            await abort_invalid(context, [Violation("url", str(refused))], "invalid webhook")
        secret = request.secret or rules.new_secret()
        async with self._connection(context) as connection, connection.transaction():
            # One creation at a time per tenant, so the limit holds under concurrency.
            await connection.execute(
                "SELECT pg_advisory_xact_lock(hashtext('webhooks:' || $1))", principal.tenant_id
            )
            if await store.count_endpoints(connection, principal.tenant_id) >= (
                MAX_WEBHOOKS_PER_TENANT
            ):
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"at most {MAX_WEBHOOKS_PER_TENANT} webhooks per tenant: delete one first",
                )
            endpoint = await store.create_endpoint(
                connection,
                webhook_id="wh_" + secrets.token_hex(12),
                tenant_id=principal.tenant_id,
                url=request.url,
                secret=secret,
                min_severity=min_severity,
                kinds=kinds,
                description=request.description,
                created_by=principal.subject,
            )
        log.info(
            "webhook %s of %s created by %s",
            endpoint.webhook_id,
            endpoint.tenant_id,
            principal.subject,
        )
        return webhooks_pb2.CreateWebhookResponse(webhook=_webhook(endpoint), secret=secret)

    async def ListWebhooks(
        self, request: webhooks_pb2.ListWebhooksRequest, context: Context
    ) -> webhooks_pb2.ListWebhooksResponse:
        principal = current_principal()
        violations: list[Violation] = []
        page_size = _page_size(request.page_size, violations)
        after: tuple[datetime, str] | None = None
        if request.page_token:
            try:
                after = _webhooks_position(_untoken(request.page_token))
            except (ValueError, KeyError, TypeError, OverflowError):
                violations.append(
                    Violation("page_token", "is not a page token from a previous response")
                )
        if violations:
            await abort_invalid(context, violations, "invalid list request")
        async with self._connection(context) as connection:
            endpoints = await store.list_endpoints(
                connection, principal.tenant_id, after, page_size + 1
            )
        response = webhooks_pb2.ListWebhooksResponse(
            webhooks=[_webhook(e) for e in endpoints[:page_size]]
        )
        if len(endpoints) > page_size:
            last = endpoints[page_size - 1]
            response.next_page_token = _token(
                {"c": last.created_at.isoformat(), "w": last.webhook_id}
            )
        return response

    async def DeleteWebhook(
        self, request: webhooks_pb2.DeleteWebhookRequest, context: Context
    ) -> webhooks_pb2.DeleteWebhookResponse:
        principal = current_principal()
        violations: list[Violation] = []
        _check_webhook_id(request.webhook_id, violations)
        if violations:
            await abort_invalid(context, violations, "invalid request")
        async with self._connection(context) as connection, connection.transaction():
            deleted = await store.delete_endpoint(
                connection, principal.tenant_id, request.webhook_id
            )
        if not deleted:
            await self._not_found(context)
        log.info("webhook %s deleted by %s", request.webhook_id, principal.subject)
        return webhooks_pb2.DeleteWebhookResponse()

    async def ListDeliveries(
        self, request: webhooks_pb2.ListDeliveriesRequest, context: Context
    ) -> webhooks_pb2.ListDeliveriesResponse:
        principal = current_principal()
        violations: list[Violation] = []
        _check_webhook_id(request.webhook_id, violations)
        page_size = _page_size(request.page_size, violations)
        statuses = []
        for i, status in enumerate(request.statuses):
            if status not in STATUS_NAMES:
                violations.append(Violation(f"statuses[{i}]", "unknown or unspecified status"))
            else:
                statuses.append(STATUS_NAMES[status])
        before: int | None = None
        if request.page_token:
            try:
                document = _untoken(request.page_token)
                if (
                    not isinstance(document, int)
                    or isinstance(document, bool)
                    or not 1 <= document < 2**63
                ):
                    raise ValueError("not a delivery id")
                before = document
            except ValueError:
                violations.append(
                    Violation("page_token", "is not a page token from a previous response")
                )
        if violations:
            await abort_invalid(context, violations, "invalid list request")
        async with self._connection(context) as connection:
            if not await store.endpoint_exists(connection, principal.tenant_id, request.webhook_id):
                await self._not_found(context)
            rows = await store.list_deliveries(
                connection,
                principal.tenant_id,
                request.webhook_id,
                sorted(set(statuses)),
                before,
                page_size + 1,
            )
        response = webhooks_pb2.ListDeliveriesResponse(
            deliveries=[_delivery(row) for row in rows[:page_size]]
        )
        if len(rows) > page_size:
            response.next_page_token = _token(rows[page_size - 1].delivery_id)
        return response
