"""gps-ingest: drivers' apps stream GPS batches over gRPC; each batch becomes a Kafka record."""
