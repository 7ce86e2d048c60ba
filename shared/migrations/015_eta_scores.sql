-- ETA accuracy on real arrivals (shared/readmodel/eta_scores.py): each shipment's
-- arrival, recorded once (the first of delivery and destination-geofence entry), and the
-- error of the ETA it was shown at each horizon (shared/domain/eta_accuracy.py).
CREATE TABLE eta_arrivals (
    tenant_id   text        NOT NULL,
    shipment_id text        NOT NULL,
    arrived_at  timestamptz NOT NULL,
    -- 'geofence' (entered the destination geofence) or 'delivered'
    source      text        NOT NULL,
    PRIMARY KEY (tenant_id, shipment_id)
);
CREATE INDEX eta_arrivals_by_time ON eta_arrivals (tenant_id, arrived_at);

CREATE TABLE eta_scores (
    tenant_id         text             NOT NULL,
    shipment_id       text             NOT NULL,
    -- '60m', '30m', '15m', '5m' before the arrival; '25%', '50%', '75%' of the trip
    horizon           text             NOT NULL,
    arrived_at        timestamptz      NOT NULL,
    computed_at       timestamptz      NOT NULL,
    estimated_arrival timestamptz      NOT NULL,
    -- estimated minus actual arrival, seconds (positive: the ETA was too late)
    error_s           double precision NOT NULL,
    PRIMARY KEY (tenant_id, shipment_id, horizon),
    FOREIGN KEY (tenant_id, shipment_id) REFERENCES eta_arrivals (tenant_id, shipment_id)
);
CREATE INDEX eta_scores_by_time ON eta_scores (tenant_id, arrived_at);
