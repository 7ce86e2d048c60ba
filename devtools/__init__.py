"""Development tooling: never deployed, never imported by services/ or shared/.

The local stack (`devstack`: Kafka and PostgreSQL without Docker), `cargotrack dev`
(`launcher`, `supervisor`, `view`), the simulated fleet (`fleet_simulator`) and the
offline ETA evaluation on data/ (`eta_eval`). Installed from a checkout with the dev
extra (`make bootstrap`: ``pip install -e '.[dev,local]'``); the container image does
not carry this package (Dockerfile, .dockerignore).
"""
