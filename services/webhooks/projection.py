"""The consumer half of the worker: alerts in, pending deliveries out, exactly once.

Run by shared.projection.ProjectionRunner under the name ``webhooks``: its own
consumer group on the alerts topic, its offsets in projection_offsets, written in the
transaction that inserts the deliveries of the batch's alerts (outbox style). A crash
before that commit replays the batch; after it, nothing is lost: the sender
(services/webhooks/sender.py) delivers from the table. An alert read twice (the
projector's relay publishes at least once) is recorded once per endpoint (unique
(endpoint, alert)).

Which endpoints get an alert: the tenant's live endpoints whose filter matches and
that were registered before the alert was published (its envelope's `recorded_at`,
stamped by the projector's outbox relay): a new endpoint gets new alerts, not the
topic's retained history.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC

from google.protobuf import json_format

from shared import metrics
from shared.config import TopicSettings
from shared.db import Connection
from shared.domain.webhooks import matches
from shared.pb import alerts_pb2
from shared.projection import Delivered
from shared.readmodel import webhooks as store

log = logging.getLogger(__name__)

#: The `type` of every document POSTed (docs/webhooks.md).
EVENT_TYPE = "cargotrack.alert"


def body(webhook_id: str, tenant_id: str, alert: alerts_pb2.Alert) -> bytes:
    """The JSON document POSTed for an alert: the same bytes on every attempt.

    The alert is in protobuf's canonical JSON mapping (lowerCamelCase names, enum
    names, RFC 3339 times), as on the HTTP face."""
    document = {
        "type": EVENT_TYPE,
        "webhookId": webhook_id,
        "tenantId": tenant_id,
        "alert": json_format.MessageToDict(alert),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


class WebhookProjection:
    """Alerts → webhook_deliveries rows."""

    name = "webhooks"

    def __init__(
        self, topics: TopicSettings, *, on_recorded: Callable[[], None] | None = None
    ) -> None:
        self.topics = (topics.shipment_alerts,)
        self.payloads = {topics.shipment_alerts: ("alert",)}
        #: Called after a commit that recorded deliveries (wakes the sender).
        self._on_recorded = on_recorded
        self._staged = 0

    async def apply(self, connection: Connection, records: Sequence[Delivered]) -> None:
        tenants = sorted({record.envelope.tenant_id for record in records})
        endpoints = await store.live_endpoints(connection, tenants) if tenants else []
        by_tenant: dict[str, list[store.Endpoint]] = {}
        for endpoint in endpoints:
            by_tenant.setdefault(endpoint.tenant_id, []).append(endpoint)
        deliveries: list[store.NewDelivery] = []
        seen: set[tuple[str, str]] = set()
        for record in records:  # topic order: per shipment, the order of its alerts
            envelope = record.envelope
            alert = envelope.alert
            published = (
                envelope.recorded_at.ToDatetime(UTC) if envelope.HasField("recorded_at") else None
            )
            for endpoint in by_tenant.get(envelope.tenant_id, ()):
                if published is not None and published < endpoint.created_at:
                    continue
                if not matches(endpoint.min_severity, endpoint.kinds, alert.kind, alert.severity):
                    continue
                key = (endpoint.webhook_id, alert.alert_id)
                if key in seen:
                    continue
                seen.add(key)
                deliveries.append(
                    store.NewDelivery(
                        webhook_id=endpoint.webhook_id,
                        tenant_id=envelope.tenant_id,
                        alert_id=alert.alert_id,
                        shipment_id=alert.shipment_id,
                        kind=int(alert.kind),
                        body=body(endpoint.webhook_id, envelope.tenant_id, alert),
                    )
                )
        self._staged = await store.insert_deliveries(connection, deliveries)

    def committed(self) -> None:
        if self._staged:
            metrics.WEBHOOK_RECORDED.inc(self._staged)
            log.debug("recorded %d webhook deliveries", self._staged)
            if self._on_recorded is not None:
                self._on_recorded()
        self._staged = 0

    def forget(self) -> None:
        self._staged = 0
