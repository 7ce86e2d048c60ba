-- The alert debouncer's cursor gets its own columns (shared/readmodel/shipment_tracking.py):
-- the event time of the last observation fed to the debouncer, and its estimate
-- (shared.domain.eta.EtaEstimate, JSON). Before, both lived in the `eta` jsonb (keys
-- `observed_at`, `observed`) beside what the API shows.
--
-- Expand step: nullable columns without a default (a catalogue change, no rewrite, no
-- long lock), no backfill. The previous release neither reads nor writes them and
-- keeps working; this release writes both the columns and the old keys, and reads the
-- later of the two. A later release (the contract step) stops writing the keys.
ALTER TABLE shipment_tracking ADD COLUMN observed_at timestamptz;
ALTER TABLE shipment_tracking ADD COLUMN observed jsonb;
