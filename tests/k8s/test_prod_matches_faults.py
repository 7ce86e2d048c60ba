"""The prod overlay runs what the cluster fault scenarios tested (issue 17).

What tests/faults ran, and what prod must have for it to hold:

- 3 Kafka brokers, topics with replication factor 3 and min.insync.replicas 2, the
  internal topics too (a broker killed, restarted, paused): 3+ brokers and 3
  controllers, the Kafka config and every KafkaTopic at 3 / 2, no unclean leader
  election.
- The PostgreSQL primary killed and a standby promoted (test_failover.py): a
  CloudNativePG Cluster with a standby (`instances` >= 2).
- The services found the new primary through a multi-host DATABASE_URL with
  target_session_attrs=read-write. In prod DATABASE_URL names the operator's `-rw`
  Service, which CloudNativePG points at the primary after a failover: one host, so
  no multi-host URL is needed; it passes the same start-up validation.
- One projector or query replica killed, the others go on: every Deployment with
  more than one replica has a PodDisruptionBudget that lets a drain proceed yet keeps
  one up. Kafka's budget (Strimzi makes one, maxUnavailable 1, unless its template
  says otherwise) and PostgreSQL's (CloudNativePG makes them unless
  `enablePDB: false`) are left on.

Renders only the prod overlay (`scripts/validate-k8s --overlay prod`), once per module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from shared.config import database_hosts, database_url_problems

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "validate-k8s"

Resource = dict[str, Any]

# A cold cache installs kustomize and the validators first (see test_manifests.py).
pytestmark = pytest.mark.timeout(900)

#: What tests/faults ran Kafka with (devtools/devstack/kafka.py, the 3-node cluster).
REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2
#: The DATABASE_URL of the services that use no database (a placeholder the config requires).
NO_DATABASE = "no-database"


@pytest.fixture(scope="module")
def prod(tmp_path_factory: pytest.TempPathFactory) -> list[Resource]:
    out = tmp_path_factory.mktemp("k8s-prod")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--overlay", "prod", "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, f"validate-k8s failed:\n{result.stdout}\n{result.stderr}"
    resources: list[Resource] = json.loads((out / "prod.json").read_text())
    return resources


def of_kind(resources: list[Resource], kind: str) -> dict[str, Resource]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def config(resources: list[Resource]) -> dict[str, str]:
    (data,) = (
        c["data"]
        for name, c in of_kind(resources, "ConfigMap").items()
        if name.startswith("cargotrack-config")
    )
    return dict(data)


def replicas(resources: list[Resource], deployment: Resource) -> int:
    """The fewest replicas a Deployment runs: its autoscaler's minimum if it has one."""
    name = deployment["metadata"]["name"]
    for hpa in of_kind(resources, "HorizontalPodAutoscaler").values():
        if hpa["spec"]["scaleTargetRef"]["name"] == name:
            return int(hpa["spec"]["minReplicas"])
    for scaled in of_kind(resources, "ScaledObject").values():
        if scaled["spec"]["scaleTargetRef"]["name"] == name:
            return int(scaled["spec"].get("minReplicaCount", 0))
    return int(deployment["spec"].get("replicas", 1))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels", {})
    assert not selector.get("matchExpressions"), "only matchLabels selectors are checked here"
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def test_kafka_replicates_every_topic_as_the_cluster_suite_did(prod: list[Resource]) -> None:
    pools = of_kind(prod, "KafkaNodePool").values()
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    controllers = sum(p["spec"]["replicas"] for p in pools if "controller" in p["spec"]["roles"])
    assert brokers >= REPLICATION_FACTOR
    assert controllers >= 3, "a KRaft quorum that survives losing one controller"
    (kafka,) = of_kind(prod, "Kafka").values()
    settings = kafka["spec"]["kafka"]["config"]
    assert settings["default.replication.factor"] == REPLICATION_FACTOR
    assert settings["min.insync.replicas"] == MIN_INSYNC_REPLICAS
    # Internal topics: consumer offsets (min ISR from the broker default above) and
    # transaction state.
    assert settings["offsets.topic.replication.factor"] == REPLICATION_FACTOR
    assert settings["transaction.state.log.replication.factor"] == REPLICATION_FACTOR
    assert settings["transaction.state.log.min.isr"] == MIN_INSYNC_REPLICAS
    # A replica that missed writes must never become leader: that would drop acks.
    assert settings["unclean.leader.election.enable"] is False
    topics = of_kind(prod, "KafkaTopic").values()
    assert topics
    for topic in topics:
        assert topic["spec"]["replicas"] == REPLICATION_FACTOR, topic["metadata"]["name"]
        assert topic["spec"]["config"]["min.insync.replicas"] == MIN_INSYNC_REPLICAS
    # `cargotrack create-topics` (outside Strimzi) creates the same.
    assert config(prod)["CARGOTRACK_TOPIC_REPLICATION_FACTOR"] == str(REPLICATION_FACTOR)


def test_postgres_has_a_standby_and_the_services_follow_the_primary(
    prod: list[Resource],
) -> None:
    (cluster,) = of_kind(prod, "Cluster").values()
    assert cluster["spec"]["instances"] >= 2, "no standby to promote"
    rw_service = f"{cluster['metadata']['name']}-rw"
    using_database = 0
    for name, deployment in of_kind(prod, "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        variables = {v["name"]: v for v in container.get("env", [])}
        url = variables["DATABASE_URL"]["value"]
        assert database_url_problems(url) == [], (name, url)
        if urlsplit(url).username == NO_DATABASE:
            continue
        using_database += 1
        # One host: the operator's read-write Service, which follows the primary.
        assert [host for host, _port in database_hosts(url)] == [rw_service], (name, url)
    assert using_database >= 3  # projector, learner, webhooks, tracking-query, ...


def test_every_replicated_workload_keeps_one_up_through_a_disruption(
    prod: list[Resource],
) -> None:
    budgets = of_kind(prod, "PodDisruptionBudget").values()
    for name, deployment in of_kind(prod, "Deployment").items():
        count = replicas(prod, deployment)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        if count <= 1:
            continue  # the learner: a single writer, Recreate
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        spec = covering[0]["spec"]
        if "minAvailable" in spec:
            assert 1 <= spec["minAvailable"] < count, (name, spec)
        else:
            assert 1 <= spec["maxUnavailable"] < count, (name, spec)
    # Kafka and PostgreSQL: the operators' own budgets, not turned off.
    (kafka,) = of_kind(prod, "Kafka").values()
    kafka_budget = kafka["spec"]["kafka"].get("template", {}).get("podDisruptionBudget", {})
    assert kafka_budget.get("maxUnavailable", 1) == 1, kafka_budget
    (cluster,) = of_kind(prod, "Cluster").values()
    assert cluster["spec"].get("enablePDB", True) is True
