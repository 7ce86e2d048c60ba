"""The tracking-query service: shipment state for portals and operations, read from the
PostgreSQL projection (see docs/query.md)."""
