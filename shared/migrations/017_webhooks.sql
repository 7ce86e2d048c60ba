-- Webhooks (shared/readmodel/webhooks.py; services/webhooks; docs/webhooks.md): the
-- endpoints tenants registered, and one delivery row per (endpoint, alert) that the
-- worker inserts in the transaction that stores its consumer offsets, then attempts
-- with backoff until it is delivered or dead.
CREATE TABLE webhook_endpoints (
    webhook_id   text        PRIMARY KEY,
    tenant_id    text        NOT NULL,
    url          text        NOT NULL,
    -- The HMAC key of the signatures. Kept as it is (an HMAC needs the key itself),
    -- never returned after creation.
    secret       text        NOT NULL,
    min_severity integer     NOT NULL DEFAULT 0,
    -- AlertKind numbers; empty: every kind
    kinds        integer[]   NOT NULL DEFAULT '{}',
    description  text        NOT NULL DEFAULT '',
    created_by   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Set by DeleteWebhook (which also blanks the secret): the endpoint gets nothing
    -- more; its log is kept until pruned.
    deleted_at   timestamptz
);
CREATE INDEX webhook_endpoints_by_tenant ON webhook_endpoints (tenant_id, created_at)
    WHERE deleted_at IS NULL;

CREATE TABLE webhook_deliveries (
    delivery_id      bigserial   PRIMARY KEY,
    webhook_id       text        NOT NULL REFERENCES webhook_endpoints (webhook_id),
    tenant_id        text        NOT NULL,
    alert_id         text        NOT NULL,
    shipment_id      text        NOT NULL,
    kind             integer     NOT NULL,
    -- The JSON document POSTed (the same bytes on every attempt).
    body             bytea       NOT NULL,
    -- 'pending', 'delivered', 'dead', 'cancelled'
    status           text        NOT NULL DEFAULT 'pending',
    attempts         integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- A worker attempting it holds it until then (lease_token fences its result).
    leased_until     timestamptz,
    lease_token      uuid,
    last_attempt_at  timestamptz,
    last_status_code integer     NOT NULL DEFAULT 0,
    last_error       text        NOT NULL DEFAULT '',
    finished_at      timestamptz,
    -- An alert read twice from the topic is delivered once per endpoint.
    UNIQUE (webhook_id, alert_id)
);
-- The sender's scan: the oldest pending delivery of each (endpoint, shipment).
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (webhook_id, shipment_id, delivery_id)
    WHERE status = 'pending';
-- ListDeliveries: an endpoint's log, newest first.
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (webhook_id, delivery_id DESC);
-- Pruning finished deliveries past CARGOTRACK_WEBHOOK_RETENTION_DAYS.
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (finished_at)
    WHERE status <> 'pending';
