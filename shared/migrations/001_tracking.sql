-- Tracking projection: shipment state, vehicle positions, consumed offsets.
-- Tables are unqualified: the runner sets search_path to the cargotrack schema.

-- Offsets of every projection, written in the same transaction as the rows they
-- produced. `last_offset` is the offset of the last record applied; a consumer
-- resumes at last_offset + 1.
CREATE TABLE projection_offsets (
    projection  text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    last_offset bigint  NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

-- One row per shipment: query columns plus the fold's full state (jsonb), whose
-- timeline is the shipment's complete history in log order.
CREATE TABLE shipments (
    tenant_id      text        NOT NULL,
    shipment_id    text        NOT NULL,
    customer_id    text        NOT NULL DEFAULT '',
    status         smallint    NOT NULL,
    vehicle_id     text        NOT NULL DEFAULT '',
    tracking_token text,
    created_at     timestamptz,
    updated_at     timestamptz NOT NULL,
    state          jsonb       NOT NULL,
    PRIMARY KEY (tenant_id, shipment_id)
);
CREATE UNIQUE INDEX shipments_tracking_token ON shipments (tracking_token);
-- Keyset pagination for ListShipments: newest change first, shipment id breaks ties.
CREATE INDEX shipments_by_update ON shipments (tenant_id, updated_at DESC, shipment_id DESC);
CREATE INDEX shipments_by_vehicle ON shipments (tenant_id, vehicle_id) WHERE vehicle_id <> '';

-- Latest position per vehicle by event time, and the per-device batch sequences
-- that make a resent GPS batch a no-op.
CREATE TABLE vehicles (
    tenant_id   text        NOT NULL,
    vehicle_id  text        NOT NULL,
    latitude    double precision,
    longitude   double precision,
    recorded_at timestamptz,
    state       jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, vehicle_id)
);

-- Every accepted GPS point, partitioned by day of the fix for cheap retention.
CREATE TABLE vehicle_positions (
    tenant_id   text             NOT NULL,
    vehicle_id  text             NOT NULL,
    recorded_at timestamptz      NOT NULL,
    latitude    double precision NOT NULL,
    longitude   double precision NOT NULL,
    speed_mps   real             NOT NULL DEFAULT 0,
    heading_deg real             NOT NULL DEFAULT 0,
    accuracy_m  real             NOT NULL DEFAULT 0,
    event_id    text             NOT NULL
) PARTITION BY RANGE (recorded_at);
-- Points for a day without its own partition (yet) land here.
CREATE TABLE vehicle_positions_default PARTITION OF vehicle_positions DEFAULT;
CREATE INDEX vehicle_positions_by_vehicle ON vehicle_positions (tenant_id, vehicle_id, recorded_at);

-- Live tracking of a shipment, from its vehicle's positions: progress, ETA and the
-- alert conditions last reported (so alerts fire once per change).
CREATE TABLE shipment_tracking (
    tenant_id     text        NOT NULL,
    shipment_id   text        NOT NULL,
    vehicle_id    text        NOT NULL,
    position      jsonb,
    progress      jsonb,
    eta           jsonb,
    conditions    jsonb       NOT NULL DEFAULT '{}',
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, shipment_id)
);

-- Every ETA computed, to measure accuracy once the shipment arrived.
CREATE TABLE eta_history (
    tenant_id     text        NOT NULL,
    shipment_id   text        NOT NULL,
    position_at   timestamptz NOT NULL,
    computed_at   timestamptz NOT NULL,
    estimated_arrival timestamptz NOT NULL,
    remaining_m   double precision NOT NULL,
    method        smallint    NOT NULL,
    PRIMARY KEY (tenant_id, shipment_id, position_at)
);

-- Alerts decided in a projection transaction, published to Kafka afterwards by a
-- relay (transactional outbox): deciding and publishing cannot disagree.
CREATE TABLE alert_outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id     text        NOT NULL UNIQUE,
    tenant_id    text        NOT NULL,
    shipment_id  text        NOT NULL,
    payload      bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX alert_outbox_unpublished ON alert_outbox (id) WHERE published_at IS NULL;

-- Wakes WatchShipment streams: payload is tenant_id || ':' || shipment_id.
CREATE FUNCTION notify_shipment_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.shipment_changed', NEW.tenant_id || ':' || NEW.shipment_id);
    RETURN NULL;
END $$;
CREATE TRIGGER shipments_changed AFTER INSERT OR UPDATE ON shipments
    FOR EACH ROW EXECUTE FUNCTION notify_shipment_changed();
CREATE TRIGGER shipment_tracking_changed AFTER INSERT OR UPDATE ON shipment_tracking
    FOR EACH ROW EXECUTE FUNCTION notify_shipment_changed();
