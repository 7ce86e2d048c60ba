-- The speed learner (services/learner) and its model versions (issue 14).
-- SQL that reads or writes these tables lives only in shared/readmodel/learner_state.py
-- and shared/readmodel/model_snapshots.py.

-- Each tenant's learner state (shared.domain.learner.LearnerState, JSON, zlib), written
-- in the same transaction as the learner's offsets in projection_offsets.
CREATE TABLE learner_state (
    tenant_id   text        NOT NULL PRIMARY KEY,
    state       bytea       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Published models: the projector loads the newest version of each tenant. A row is
-- inserted whole (one statement), so a reader sees a complete model or none.
CREATE TABLE eta_models (
    tenant_id     text        NOT NULL,
    version       bigint      NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    trained_from  timestamptz,
    trained_until timestamptz NOT NULL,
    points        bigint      NOT NULL,
    size_bytes    integer     NOT NULL,
    payload       bytea       NOT NULL,
    PRIMARY KEY (tenant_id, version)
);

-- The model version behind each stored ETA (0: no learned model, the fleet average or
-- the default speed).
ALTER TABLE eta_history ADD COLUMN model_version bigint NOT NULL DEFAULT 0;
