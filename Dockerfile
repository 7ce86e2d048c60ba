# syntax=docker/dockerfile:1
#
# cargotrack runtime image: one image, every deployable.
#
#   docker build -t cargotrack:dev .
#   docker run --rm cargotrack:dev serve tracking-query      # the console script picks the service
#   docker run --rm cargotrack:dev migrate
#
# Kafka and PostgreSQL are external (Strimzi and CloudNativePG in Kubernetes), so
# the image has no Java and no database server: just CPython and a virtualenv.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------
# builder: a self-contained virtualenv at /opt/cargotrack
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

# Every dependency ships manylinux wheels for CPython 3.11 (grpcio, asyncpg,
# shapely, protobuf), so no compiler is installed.
RUN python -m venv /opt/cargotrack \
 && /opt/cargotrack/bin/pip install --upgrade pip setuptools wheel

WORKDIR /src
# requirements*.lock matches nothing until the lock file exists; COPY accepts that
# because the other sources are present.
COPY pyproject.toml README.md requirements*.lock ./
# The deployables only: not the development package devtools/ (also kept out of the
# context by .dockerignore; tests/k8s/test_image.py checks both).
COPY shared ./shared
COPY services ./services

# A non-editable install: the runtime stage needs only the venv, not /src.
# The lock file, when present, pins the whole dependency tree.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -f requirements.lock ]; then constraints="-c requirements.lock"; else constraints=""; fi \
 && /opt/cargotrack/bin/pip install $constraints . \
 && /opt/cargotrack/bin/cargotrack --help > /dev/null

# ---------------------------------------------------------------------------
# runtime: slim Python, the venv, a non-root user
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="cargotrack" \
      org.opencontainers.image.description="Shipment-tracking event backbone: gRPC ingest, Kafka, PostgreSQL projections" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid so Kubernetes can verify runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 cargotrack \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin cargotrack

COPY --from=builder /opt/cargotrack /opt/cargotrack

ENV PATH=/opt/cargotrack/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CARGOTRACK_GRPC_HOST=0.0.0.0 \
    CARGOTRACK_LOG_FORMAT=json

USER 10001:10001
WORKDIR /tmp

# gRPC: gps-ingest 50051, shipment-events 50052, delivery-confirmations 50053,
# tracking-query 50054, dispatch 50055, projector 50056 (health only); metrics 9090
# (CARGOTRACK_METRICS_PORT, set by the deployment).
EXPOSE 50051 50052 50053 50054 50055 50056 9090

# Python is PID 1 and handles SIGTERM itself (graceful drain within
# CARGOTRACK_SHUTDOWN_GRACE_S), so no init shim is needed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cargotrack"]
CMD ["serve", "gps-ingest"]
