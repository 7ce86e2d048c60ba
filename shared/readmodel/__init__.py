"""Read models kept by the projector beside the tracking tables: one module per table."""
