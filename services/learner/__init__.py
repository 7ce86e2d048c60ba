"""The speed learner: its own consumer of gps-points, publishing model versions."""
