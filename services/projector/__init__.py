"""The tracking projector: folds the Kafka streams into PostgreSQL state."""
