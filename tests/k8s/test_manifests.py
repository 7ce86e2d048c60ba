"""The deployment: every kustomize overlay builds and validates offline, and keeps the
properties operations rely on (probes, security, sizing, topics, autoscaling).

scripts/validate-k8s does the building and the schema validation (and installs its
pinned tools into the cache on first use, which takes a minute or two); these tests
run it once, then read the rendered resources it writes as JSON.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "validate-k8s"
OVERLAYS = ("dev", "prod")
# name -> conventional gRPC port (services/cli.py)
SERVICES = {
    "gps-ingest": 50051,
    "shipment-events": 50052,
    "delivery-confirmations": 50053,
    "tracking-query": 50054,
    "dispatch": 50055,
    "projector": 50056,
    "learner": 50057,
    "webhooks": 50058,
    "http-gateway": 50059,
}
#: Scaled on CPU by an HPA (the consumers are not; webhooks has a fixed replica count).
GRPC_SERVICES = [name for name in SERVICES if name not in ("projector", "learner", "webhooks")]
#: Ports besides the gRPC and metrics ones: the http-gateway's HTTP port.
EXTRA_PORTS = {"http-gateway": {8080}}
METRICS_PORT = 9090
TOPIC_RETENTION_MS = {
    "cargotrack.gps-points": 7 * 24 * 3600 * 1000,
    "cargotrack.shipment-events": -1,
    "cargotrack.delivery-confirmations": -1,
    "cargotrack.shipment-alerts": 30 * 24 * 3600 * 1000,
    "cargotrack.dead-letters": 30 * 24 * 3600 * 1000,
}

Resource = dict[str, Any]

# A cold cache installs kustomize (go install), a virtualenv and npm packages first.
pytestmark = pytest.mark.timeout(900)


def run_validator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Resource]]:
    """Run the validation of every overlay once; the resources of each overlay."""
    out = tmp_path_factory.mktemp("k8s-rendered")
    result = run_validator("--json-out", str(out))
    assert result.returncode == 0, f"validate-k8s failed:\n{result.stdout}\n{result.stderr}"
    for overlay in OVERLAYS:
        assert re.search(rf"^ok +{overlay} ", result.stdout, re.MULTILINE), result.stdout
    return {overlay: json.loads((out / f"{overlay}.json").read_text()) for overlay in OVERLAYS}


def of_kind(resources: list[Resource], kind: str) -> dict[str, Resource]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def config(resources: list[Resource]) -> dict[str, str]:
    (configmap,) = (
        c
        for name, c in of_kind(resources, "ConfigMap").items()
        if name.startswith("cargotrack-config")
    )
    data: dict[str, str] = configmap["data"]
    return data


def container(workload: Resource) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    assert only["name"] == "cargotrack"
    return dict(only)


def env(workload: Resource) -> dict[str, Any]:
    return {var["name"]: var for var in container(workload).get("env", [])}


def topic_by_name(resources: list[Resource]) -> dict[str, Resource]:
    return {t["spec"]["topicName"]: t for t in of_kind(resources, "KafkaTopic").values()}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[Resource]]) -> list[Resource]:
    resources: list[Resource] = rendered[request.param]
    return resources


# --- every overlay ------------------------------------------------------------------


def test_every_service_is_deployed_with_its_port(overlay: list[Resource]) -> None:
    deployments = of_kind(overlay, "Deployment")
    services = of_kind(overlay, "Service")
    assert set(deployments) == set(SERVICES)
    for name, port in SERVICES.items():
        c = container(deployments[name])
        assert c["args"] == ["serve", name]
        assert env(deployments[name])["CARGOTRACK_GRPC_PORT"]["value"] == str(port)
        health = config(overlay).get("CARGOTRACK_GRPC_HEALTH_PORT")  # prod: TLS probes
        extra = EXTRA_PORTS.get(name, set())
        expected = {port, METRICS_PORT} | extra | ({int(health)} if health else set())
        assert {p["containerPort"] for p in c["ports"]} == expected
        assert {p["port"] for p in services[name]["spec"]["ports"]} == {port, METRICS_PORT} | extra
    assert config(overlay)["CARGOTRACK_METRICS_PORT"] == str(METRICS_PORT)
    assert config(overlay)["CARGOTRACK_GRPC_HOST"] == "0.0.0.0"
    assert config(overlay)["CARGOTRACK_LOG_FORMAT"] == "json"


def test_every_deployment_has_grpc_readiness_and_liveness_probes(overlay: list[Resource]) -> None:
    for name, deployment in of_kind(overlay, "Deployment").items():
        c = container(deployment)
        # The gRPC port, or (prod: TLS, which kubelet probes cannot speak) the
        # plaintext health-only port.
        health = config(overlay).get("CARGOTRACK_GRPC_HEALTH_PORT")
        probe_port = int(health) if health else SERVICES[name]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["grpc"]["port"] == probe_port, (name, probe)
        # Readiness follows the dependencies (overall status); liveness must not.
        assert c["readinessProbe"]["grpc"].get("service", "") == ""
        assert c["livenessProbe"]["grpc"]["service"] == "liveness"


def test_workloads_run_as_non_root_with_resource_limits(overlay: list[Resource]) -> None:
    workloads = [*of_kind(overlay, "Deployment").values(), *of_kind(overlay, "Job").values()]
    assert len(workloads) == len(SERVICES) + 1
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        c = container(workload)
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][bound]), workload["metadata"]["name"]


#: What the projector's RSS came to in the 10-minute soak (docs/performance.md, "Memory"):
#: ~100 MB before any load, then ~1.25 KB per fix in the track cache once it is full.
PROJECTOR_BASE_BYTES = 100_000_000
BYTES_PER_CACHED_FIX = 1_250


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (`512Mi`, `2Gi`, `1G`, bytes) in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def test_the_projectors_memory_limit_holds_its_track_cache_when_full(
    overlay: list[Resource],
) -> None:
    """A limit below what the configured cache takes when full would get the projector
    killed for memory exactly when the fleet is largest, again after every restart."""
    fixes = int(config(overlay)["CARGOTRACK_TRACK_CACHE_FIXES"])
    projector = container(of_kind(overlay, "Deployment")["projector"])
    limit = memory_bytes(projector["resources"]["limits"]["memory"])
    needed = PROJECTOR_BASE_BYTES + fixes * BYTES_PER_CACHED_FIX
    assert limit >= needed, f"limit {limit:,} B < {needed:,} B for {fixes:,} cached fixes"


def test_termination_grace_exceeds_the_drain(overlay: list[Resource]) -> None:
    shutdown_grace = float(config(overlay)["CARGOTRACK_SHUTDOWN_GRACE_S"])
    for deployment in of_kind(overlay, "Deployment").values():
        pre_stop = container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= pre_stop + shutdown_grace + 10


def test_configuration_uses_only_variables_the_code_reads(overlay: list[Resource]) -> None:
    source = (REPO / "shared" / "config.py").read_text()
    known = set(re.findall(r'"((?:CARGOTRACK|KAFKA)_[A-Z0-9_]+|DATABASE_URL)"', source))
    used = set(config(overlay))
    for secret in of_kind(overlay, "Secret").values():
        if secret.get("type") == "kubernetes.io/basic-auth":
            continue  # a database role's password for CloudNativePG, not pod variables
        used |= set(secret.get("data", {})) | set(secret.get("stringData", {}))
    for workload in [*of_kind(overlay, "Deployment").values(), *of_kind(overlay, "Job").values()]:
        used |= set(env(workload))
    assert used - known == set()
    # What the services need is all there.
    assert {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "KAFKA_SASL_PASSWORD"} <= used


#: Each workload's Kafka user and what its ACLs allow on which topic (issue 12).
KAFKA_ACCESS = {
    "gps-ingest": {"cargotrack.gps-points": "Write"},
    "shipment-events": {"cargotrack.shipment-events": "Write"},
    "delivery-confirmations": {"cargotrack.delivery-confirmations": "Write"},
    "projector": {
        "cargotrack.gps-points": "Read",
        "cargotrack.shipment-events": "Read",
        "cargotrack.delivery-confirmations": "Read",
        "cargotrack.shipment-alerts": "Write",
        "cargotrack.dead-letters": "Write",
    },
    "dispatch": {"cargotrack.shipment-alerts": "Read"},
    # Dead letters: the same ProjectionRunner as the projector (shared/projection.py).
    "learner": {"cargotrack.gps-points": "Read", "cargotrack.dead-letters": "Write"},
    "webhooks": {"cargotrack.shipment-alerts": "Read", "cargotrack.dead-letters": "Write"},
}
#: The consumer groups each Kafka user may join (pattern type, name): the runner's group
#: is the topic prefix plus the projection's name; the projector's user also covers
#: the one-off groups of `cargotrack rebuild`.
KAFKA_GROUPS = {
    "gps-ingest": set(),
    "shipment-events": set(),
    "delivery-confirmations": set(),
    "projector": {("literal", "cargotrack.tracking"), ("prefix", "cargotrack-")},
    "dispatch": set(),
    "learner": {("literal", "cargotrack.learner")},
    "webhooks": {("literal", "cargotrack.webhooks")},
}
#: Each workload's database role (None: no database credentials at all).
DATABASE_ROLE = {
    "gps-ingest": None,
    "shipment-events": None,
    "delivery-confirmations": "cargotrack_query",  # the read-model pre-check
    "dispatch": None,
    "tracking-query": "cargotrack_query",
    "projector": "cargotrack_projector",
    "learner": "cargotrack_learner",
    "webhooks": "cargotrack_webhooks",
    "http-gateway": None,
}


def test_each_workload_has_its_own_kafka_user_with_least_privilege(
    overlay: list[Resource],
) -> None:
    users = of_kind(overlay, "KafkaUser")
    assert set(users) == {f"cargotrack-{name}" for name in KAFKA_ACCESS}
    for name, workload in of_kind(overlay, "Deployment").items():
        variables = env(workload)
        if name not in KAFKA_ACCESS:  # tracking-query reads no topic
            assert "KAFKA_SASL_USERNAME" not in variables, name
            assert "KAFKA_SASL_PASSWORD" not in variables, name
            continue
        user = variables["KAFKA_SASL_USERNAME"]["value"]
        assert user == f"cargotrack-{name}"
        password = variables["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert password == {"name": user, "key": "password"}
        topics: dict[str, set[str]] = {}
        groups: set[tuple[str, str]] = set()
        for acl in users[user]["spec"]["authorization"]["acls"]:
            resource = acl["resource"]
            assert resource["type"] in ("topic", "group"), f"{user}: no cluster rights"
            assert not {"All", "Create", "Delete", "Alter", "AlterConfigs"} & set(acl["operations"])
            if resource["type"] == "topic":
                assert resource["patternType"] == "literal", f"{user}: no topic prefixes"
                topics[resource["name"]] = set(acl["operations"]) - {"Describe", "DescribeConfigs"}
            else:
                assert set(acl["operations"]) <= {"Describe", "Read"}, user
                groups.add((resource["patternType"], resource["name"]))
        assert topics == {topic: {op} for topic, op in KAFKA_ACCESS[name].items()}
        assert groups == KAFKA_GROUPS[name], user
    for job in of_kind(overlay, "Job").values():
        assert "KAFKA_SASL_PASSWORD" not in env(job)
    assert "KAFKA_SASL_USERNAME" not in config(overlay)
    assert config(overlay)["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    # KEDA reads the projector group's lag as the projector.
    (trigger_auth,) = of_kind(overlay, "TriggerAuthentication").values()
    refs = {ref["parameter"]: ref["name"] for ref in trigger_auth["spec"]["secretTargetRef"]}
    assert refs["password"] == "cargotrack-projector"


def test_each_workload_has_its_own_database_role_over_verified_tls(
    overlay: list[Resource],
) -> None:
    (cluster,) = of_kind(overlay, "Cluster").values()
    roles = {role["name"]: role for role in cluster["spec"]["managed"]["roles"]}
    assert set(roles) == {role for role in DATABASE_ROLE.values() if role}
    # Members of the owner role: both run `migrate` at start, the projector also
    # creates and drops partitions.
    assert roles["cargotrack_projector"]["inRoles"] == ["cargotrack"]
    assert roles["cargotrack_learner"]["inRoles"] == ["cargotrack"]
    assert roles["cargotrack_webhooks"]["inRoles"] == ["cargotrack"]
    assert "inRoles" not in roles["cargotrack_query"]
    workloads = {**of_kind(overlay, "Deployment"), **of_kind(overlay, "Job")}
    for name, workload in workloads.items():
        variables = env(workload)
        url = variables["DATABASE_URL"]["value"]
        role = "cargotrack" if workload["kind"] == "Job" else DATABASE_ROLE[name]
        if role is None:
            assert "CARGOTRACK_DB_PASSWORD" not in variables, name
            assert "@localhost:1/" in url, f"{name} names no database"
            continue
        assert url.startswith(f"postgresql://{role}@cargotrack-pg-rw:5432/"), name
        assert "sslmode=verify-full" in url, name
        # Members of the owner role act as it, so what they create stays the owner's.
        member = "inRoles" in roles.get(role, {})
        assert ("&role=cargotrack" in url) == member, name
        ca_file = url.partition("sslrootcert=")[2]
        mounts = {m["mountPath"]: m["name"] for m in container(workload)["volumeMounts"]}
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        ca_volume = volumes[mounts[str(Path(ca_file).parent)]]
        assert ca_volume["secret"]["secretName"] == f"{cluster['metadata']['name']}-ca"
        secret = variables["CARGOTRACK_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]
        if role != "cargotrack":
            assert secret["name"] == roles[role]["passwordSecret"]["name"]


def test_kafka_bootstrap_is_fully_qualified(overlay: list[Resource]) -> None:
    """KEDA's scaler resolves the address from its own namespace."""
    (kafka,) = of_kind(overlay, "Kafka")
    (namespace,) = of_kind(overlay, "Namespace")
    expected = f"{kafka}-kafka-bootstrap.{namespace}.svc:9093"
    assert config(overlay)["KAFKA_BOOTSTRAP_SERVERS"] == expected


def test_topics_partitions_and_retention(overlay: list[Resource]) -> None:
    topics = topic_by_name(overlay)
    settings = config(overlay)
    assert set(topics) == set(TOPIC_RETENTION_MS)
    for name, topic in topics.items():
        assert name.startswith(settings["CARGOTRACK_TOPIC_PREFIX"])
        assert topic["spec"]["config"]["retention.ms"] == TOPIC_RETENTION_MS[name]
        assert topic["spec"]["partitions"] == int(settings["CARGOTRACK_TOPIC_PARTITIONS"])
        assert topic["spec"]["replicas"] == int(settings["CARGOTRACK_TOPIC_REPLICATION_FACTOR"])
        assert topic["spec"]["config"]["min.insync.replicas"] == int(
            settings["CARGOTRACK_TOPIC_MIN_INSYNC_REPLICAS"]
        )
    assert topics["cargotrack.gps-points"]["spec"]["partitions"] == 12
    assert topics["cargotrack.shipment-events"]["spec"]["partitions"] == 12
    # Co-partitioned: the same shipments on the same partition numbers.
    assert (
        topics["cargotrack.delivery-confirmations"]["spec"]["partitions"]
        == topics["cargotrack.shipment-events"]["spec"]["partitions"]
    )
    hours = {
        "cargotrack.gps-points": "CARGOTRACK_GPS_RETENTION_HOURS",
        "cargotrack.shipment-events": "CARGOTRACK_EVENTS_RETENTION_HOURS",
        "cargotrack.shipment-alerts": "CARGOTRACK_ALERTS_RETENTION_HOURS",
    }
    for name, variable in hours.items():
        value = int(settings[variable])
        assert TOPIC_RETENTION_MS[name] == (value * 3600 * 1000 if value > 0 else -1)


def test_projector_scales_on_lag_up_to_the_partition_count(overlay: list[Resource]) -> None:
    scaled = of_kind(overlay, "ScaledObject")["projector"]["spec"]
    partitions = topic_by_name(overlay)["cargotrack.shipment-events"]["spec"]["partitions"]
    assert scaled["scaleTargetRef"]["name"] == "projector"
    assert scaled["maxReplicaCount"] == partitions
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == "cargotrack.tracking"
    assert trigger["metadata"]["bootstrapServersFromEnv"] == "KAFKA_BOOTSTRAP_SERVERS"
    # The gRPC services scale on CPU; the projector has no HPA besides KEDA's.
    hpas = of_kind(overlay, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == set(GRPC_SERVICES)


def test_network_policies_open_only_the_service_ports(overlay: list[Resource]) -> None:
    policies = of_kind(overlay, "NetworkPolicy")
    for name, port in SERVICES.items():
        policy = policies[name]["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        opened = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
        if name == "http-gateway":
            # HTTP and metrics only (its gRPC port serves the probes); egress to the
            # two services it calls, on their gRPC ports.
            assert opened == {8080, METRICS_PORT}
            called = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
            assert called == {SERVICES["tracking-query"], SERVICES["dispatch"]}
            continue
        if name == "webhooks":  # tenants' endpoints: public addresses only
            (rule,) = policy["egress"]
            blocks = {b["ipBlock"]["cidr"]: set(b["ipBlock"]["except"]) for b in rule["to"]}
            assert set(blocks) == {"0.0.0.0/0", "::/0"}
            assert {"10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16"} <= blocks["0.0.0.0/0"]
            assert {"::1/128", "fc00::/7", "fe80::/10"} <= blocks["::/0"]
        else:
            assert "egress" not in policy
        assert opened == {port, METRICS_PORT}
    baseline = policies["cargotrack-baseline"]["spec"]
    assert "ingress" not in baseline
    egress_ports = {p["port"] for rule in baseline["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 9093, 5432}


def test_the_gateway_ingress_does_not_buffer_streams(overlay: list[Resource]) -> None:
    ingress = of_kind(overlay, "Ingress")["http-gateway"]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": "http-gateway", "port": {"name": "http"}}
    assert config(overlay)["CARGOTRACK_GATEWAY_TRACKING_TARGET"] == "tracking-query:50054"
    assert config(overlay)["CARGOTRACK_GATEWAY_DISPATCH_TARGET"] == "dispatch:50055"


def test_every_resource_carries_the_common_labels(overlay: list[Resource]) -> None:
    for resource in overlay:
        labels = resource["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "cargotrack", resource["metadata"]
        if resource["kind"] != "Namespace":
            assert "app.kubernetes.io/name" in labels or resource["kind"] in (
                "ConfigMap",
                "Secret",
                "ServiceAccount",
            ), resource["metadata"]


def test_every_workload_is_scraped_by_a_pod_monitor(overlay: list[Resource]) -> None:
    """A PodMonitor selects each Deployment's pods, on a port the pod has (metrics)."""
    monitors = of_kind(overlay, "PodMonitor")
    for name, deployment in of_kind(overlay, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        scraped = [
            endpoint["port"]
            for monitor in monitors.values()
            if all(
                labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()
            )
            for endpoint in monitor["spec"]["podMetricsEndpoints"]
        ]
        assert scraped == ["metrics"], name
        assert ports["metrics"] == METRICS_PORT


def test_the_alert_rules_and_the_dashboard_are_deployed(overlay: list[Resource]) -> None:
    (rules,) = of_kind(overlay, "PrometheusRule").values()
    alerts = {r["alert"] for g in rules["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"CargotrackProjectorLagGrowing", "CargotrackDeadLetters"} <= alerts
    dashboard = of_kind(overlay, "ConfigMap")["cargotrack-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["cargotrack.json"])["uid"] == "cargotrack"


def test_migration_job_runs_migrate(overlay: list[Resource]) -> None:
    (job,) = of_kind(overlay, "Job").values()
    args = container(job)["args"]
    assert args[0] == "migrate"
    # It waits for PostgreSQL, within the Job's own deadline.
    wait_s = float(args[args.index("--wait") + 1])
    assert 0 < wait_s < job["spec"]["activeDeadlineSeconds"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


# --- per environment ----------------------------------------------------------------


def test_prod_is_highly_available(rendered: dict[str, list[Resource]]) -> None:
    prod = rendered["prod"]
    deployments = of_kind(prod, "Deployment")
    # The learner is a single writer of each tenant's state (k8s/base/services/learner.yaml).
    learner = deployments.pop("learner")
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"]["type"] == "Recreate"
    assert {d["spec"]["replicas"] for d in deployments.values()} == {3}
    for pdb in of_kind(prod, "PodDisruptionBudget").values():
        assert pdb["spec"]["minAvailable"] == 2
        assert "maxUnavailable" not in pdb["spec"]
    hpas = of_kind(prod, "HorizontalPodAutoscaler").values()
    assert {h["spec"]["minReplicas"] for h in hpas} == {3}
    assert of_kind(prod, "ScaledObject")["projector"]["spec"]["minReplicaCount"] == 3
    pools = of_kind(prod, "KafkaNodePool")
    assert {n: (p["spec"]["replicas"], p["spec"]["roles"]) for n, p in pools.items()} == {
        "controller": (3, ["controller"]),
        "broker": (3, ["broker"]),
    }
    (kafka,) = of_kind(prod, "Kafka").values()
    kafka_config = kafka["spec"]["kafka"]["config"]
    assert kafka_config["default.replication.factor"] == 3
    assert kafka_config["min.insync.replicas"] == 2
    assert kafka_config["offsets.topic.replication.factor"] == 3
    for topic in of_kind(prod, "KafkaTopic").values():
        assert topic["spec"]["replicas"] == 3
        assert topic["spec"]["config"]["min.insync.replicas"] == 2
    (cluster,) = of_kind(prod, "Cluster").values()
    assert cluster["spec"]["instances"] == 3
    assert of_kind(prod, "Secret") == {}, "production secrets are never committed"


def test_dev_is_small(rendered: dict[str, list[Resource]]) -> None:
    dev = rendered["dev"]
    assert {d["spec"]["replicas"] for d in of_kind(dev, "Deployment").values()} == {1}
    (pool,) = of_kind(dev, "KafkaNodePool").values()
    assert pool["spec"]["replicas"] == 1
    assert sorted(pool["spec"]["roles"]) == ["broker", "controller"]
    for topic in of_kind(dev, "KafkaTopic").values():
        assert topic["spec"]["replicas"] == 1
    (cluster,) = of_kind(dev, "Cluster").values()
    assert cluster["spec"]["instances"] == 1
    secrets = of_kind(dev, "Secret").values()
    (auth,) = [s for s in secrets if s["metadata"]["name"].startswith("cargotrack-auth")]
    assert set(auth["data"]) == {"CARGOTRACK_JWT_SECRET"}
    roles = {s["metadata"]["name"] for s in secrets if s["type"] == "kubernetes.io/basic-auth"}
    assert roles == {
        "cargotrack-db-projector",
        "cargotrack-db-learner",
        "cargotrack-db-webhooks",
        "cargotrack-db-query",
    }
    for deployment in of_kind(dev, "Deployment").values():
        prod_like = of_kind(rendered["prod"], "Deployment")[deployment["metadata"]["name"]]
        assert container(deployment)["resources"] != container(prod_like)["resources"]


# --- the validation itself catches mistakes -------------------------------------------


def write_overlay(directory: Path, patches: str) -> Path:
    """An overlay of k8s/overlays/dev with the given patches, outside the repository."""
    base = os.path.relpath(REPO / "k8s" / "overlays" / "dev", directory)
    (directory / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "namespace: cargotrack-dev\n"
        f"resources:\n  - {base}\n"
        f"patches:\n{patches}"
    )
    return directory


def test_validation_rejects_broken_manifests(tmp_path: Path) -> None:
    overlay = write_overlay(
        tmp_path,
        """
  - target: {kind: Deployment, name: gps-ingest}
    patch: |-
      - {op: add, path: /spec/template/spec/containers/0/bogusField, value: 1}
      - {op: replace, path: /spec/template/spec/containers/0/readinessProbe/grpc/port, value: 1}
  - target: {kind: Kafka}
    patch: |-
      - {op: add, path: /spec/kafka/listeners/0/tsl, value: true}
  - target: {kind: Cluster}
    patch: |-
      - {op: replace, path: /spec/postgresql/parameters/max_connections, value: 100}
  - target: {kind: ScaledObject}
    patch: |-
      - {op: replace, path: /spec/maxReplicaCount, value: "12"}
  - target: {kind: Deployment, name: dispatch}
    patch: |-
      - {op: replace, path: /spec/template/spec/volumes/0/secret/secretName, value: nope}
""",
    )
    result = run_validator("--overlay", str(overlay))
    assert result.returncode == 1, result.stdout + result.stderr
    for expected in (
        "Deployment/gps-ingest: Kubernetes 1.31.0: spec.template.spec.containers.0: "
        "Additional properties are not allowed ('bogusField' was unexpected)",
        "Deployment/gps-ingest: readinessProbe port 1 is not a container port",
        "Kafka/cargotrack: spec.kafka.listeners.0: Additional properties are not allowed",
        "Cluster/cargotrack-pg: spec.postgresql.parameters.max_connections: "
        "100 is not of type 'string'",
        "ScaledObject/projector: @kubernetes-models/keda: "
        "data/spec/maxReplicaCount must be integer",
        "Deployment/dispatch: Secret 'nope' is neither in the overlay nor made by an operator",
    ):
        assert expected in result.stdout, result.stdout


def test_validation_uses_crd_schemas_when_given(tmp_path: Path) -> None:
    """--crd-dir validates custom resources against CustomResourceDefinition files."""
    crds = tmp_path / "crds"
    crds.mkdir()
    (crds / "kafkatopics.yaml").write_text(
        """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: kafkatopics.kafka.strimzi.io}
spec:
  group: kafka.strimzi.io
  names: {kind: KafkaTopic, plural: kafkatopics}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            apiVersion: {type: string}
            kind: {type: string}
            metadata: {type: object}
            spec:
              type: object
              properties:
                topicName: {type: string}
                partitions: {type: integer, minimum: 1, maximum: 6}
                replicas: {type: integer, minimum: 1}
                config: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""
    )
    result = run_validator("--overlay", "dev", "--crd-dir", str(crds))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "loaded 1 CRD schema(s)" in result.stdout
    assert (
        "KafkaTopic/cargotrack-shipment-events: CRD schema: spec.partitions: "
        "12 is greater than the maximum of 6" in result.stdout
    ), result.stdout


# --- the image ----------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_multi_stage_image() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", dockerfile, re.MULTILINE | re.IGNORECASE)
    assert [name for _, name in stages] == ["builder", "runtime"]
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", dockerfile, re.MULTILINE)
    assert "pip install $constraints ." in dockerfile
    assert "COPY --from=builder /opt/cargotrack /opt/cargotrack" in dockerfile
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users
    assert users[-1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["cargotrack"]' in dockerfile
    # Kafka and PostgreSQL are external: no JVM, no database server in the image.
    assert not re.search(r"openjdk|default-jre|default-jdk|postgresql-\d", dockerfile)
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in ("**/.venv", "**/.git", "**/__pycache__", "data/", ".cargotrack/"):
        assert entry in ignored


def test_prod_serves_grpc_over_tls_with_probes_on_the_health_port(
    rendered: dict[str, list[Resource]],
) -> None:
    prod = rendered["prod"]
    settings = config(prod)
    cert, key = settings["CARGOTRACK_TLS_CERT_FILE"], settings["CARGOTRACK_TLS_KEY_FILE"]
    health_port = int(settings["CARGOTRACK_GRPC_HEALTH_PORT"])
    for name, workload in of_kind(prod, "Deployment").items():
        mounts = {m["mountPath"]: m["name"] for m in container(workload)["volumeMounts"]}
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        for path in (cert, key):
            volume = volumes[mounts[str(Path(path).parent)]]
            assert volume["secret"]["secretName"] == "cargotrack-grpc-tls", name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container(workload)[probe]["grpc"]["port"] == health_port, (name, probe)
    for service in of_kind(prod, "Service").values():
        assert service["spec"]["ports"][0]["appProtocol"] != "kubernetes.io/h2c"
    # The dev overlay stays plaintext (and says so).
    assert not config(rendered["dev"]).get("CARGOTRACK_TLS_CERT_FILE")


def overlay_environment(resources: list[Resource]) -> dict[str, str]:
    """The variables the ConfigMap and the generated Secrets give every pod."""
    environment = {name: value for name, value in config(resources).items() if value}
    for secret in of_kind(resources, "Secret").values():
        if secret["metadata"]["name"].startswith("cargotrack-auth"):
            for name, value in secret.get("data", {}).items():
                environment[name] = base64.b64decode(value).decode()
    environment["DATABASE_URL"] = "postgresql://u@localhost:1/none"
    return environment


def test_the_dev_overlay_cannot_pass_as_production(rendered: dict[str, list[Resource]]) -> None:
    """The production guard (CARGOTRACK_PRODUCTION=1, set by the base) refuses the dev
    overlay's development mode and key; the prod overlay keeps the guard on."""
    dev = overlay_environment(rendered["dev"])
    assert load_settings(dev).auth.dev_mode
    with pytest.raises(ConfigError, match="cannot run as production"):
        load_settings(dev | {"CARGOTRACK_PRODUCTION": "1"})
    with pytest.raises(ConfigError, match="development key"):
        load_settings({k: v for k, v in dev.items() if k != "CARGOTRACK_DEV_MODE"})
    prod = config(rendered["prod"])
    assert prod["CARGOTRACK_PRODUCTION"] == "1"
    assert not prod.get("CARGOTRACK_DEV_MODE")
