"""Topic replication: replication factor and min.insync.replicas from the settings,
and the local stack's choice between one broker and a 3-node cluster (no broker
needed: tests/faults/test_cluster.py runs the cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.devstack import DevStackError, KafkaBroker, KafkaCluster, LocalStack
from devtools.devstack.stack import kafka_brokers_from_env
from shared.config import ConfigError, load_settings
from shared.kafka import topic_specs

BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "CARGOTRACK_DEV_MODE": "1",
}


@pytest.mark.parametrize(
    ("replication", "min_isr"),
    [("1", "1"), ("2", "1"), ("3", "2"), ("5", "4")],
)
def test_min_insync_replicas_defaults_to_one_less_than_three_or_more_replicas(
    replication: str, min_isr: str
) -> None:
    topics = load_settings({**BASE, "CARGOTRACK_TOPIC_REPLICATION_FACTOR": replication}).topics
    specs = topic_specs(topics)
    assert {s.replication_factor for s in specs} == {int(replication)}
    assert {s.config()["min.insync.replicas"] for s in specs} == {min_isr}


def test_min_insync_replicas_is_configurable_up_to_the_replication_factor() -> None:
    topics = load_settings(
        {
            **BASE,
            "CARGOTRACK_TOPIC_REPLICATION_FACTOR": "3",
            "CARGOTRACK_TOPIC_MIN_INSYNC_REPLICAS": "3",
        }
    ).topics
    assert {s.config()["min.insync.replicas"] for s in topic_specs(topics)} == {"3"}
    with pytest.raises(ConfigError, match="CARGOTRACK_TOPIC_MIN_INSYNC_REPLICAS=4"):
        load_settings(
            {
                **BASE,
                "CARGOTRACK_TOPIC_REPLICATION_FACTOR": "3",
                "CARGOTRACK_TOPIC_MIN_INSYNC_REPLICAS": "4",
            }
        )


def test_retention_is_still_in_the_topic_config() -> None:
    topics = load_settings(BASE).topics
    configs = {s.name: s.config() for s in topic_specs(topics)}
    assert configs[topics.gps_points]["retention.ms"] == str(168 * 3_600_000)
    assert configs[topics.shipment_events]["retention.ms"] == "-1"


@pytest.mark.parametrize(("raw", "count"), [("", 1), ("1", 1), (" 3 ", 3)])
def test_kafka_brokers_variable(raw: str, count: int) -> None:
    assert kafka_brokers_from_env({"CARGOTRACK_KAFKA_BROKERS": raw}) == count


@pytest.mark.parametrize("raw", ["2", "0", "three", "5"])
def test_kafka_brokers_variable_refuses_other_counts(raw: str) -> None:
    with pytest.raises(DevStackError, match="CARGOTRACK_KAFKA_BROKERS must be 1"):
        kafka_brokers_from_env({"CARGOTRACK_KAFKA_BROKERS": raw})


def test_the_default_stack_runs_one_broker(tmp_path: Path) -> None:
    stack = LocalStack.for_dev(tmp_path, {})
    assert isinstance(stack.kafka, KafkaBroker)
    assert stack.topic_env() == {}
    assert [b.node_id for b in stack.kafka_brokers] == [1]


def test_a_three_broker_stack_replicates_its_topics(tmp_path: Path) -> None:
    stack = LocalStack.for_dev(tmp_path, {"CARGOTRACK_KAFKA_BROKERS": "3"})
    cluster = stack.kafka
    assert isinstance(cluster, KafkaCluster)
    assert stack.topic_env() == {
        "CARGOTRACK_TOPIC_REPLICATION_FACTOR": "3",
        "CARGOTRACK_TOPIC_MIN_INSYNC_REPLICAS": "2",
    }
    # The dev ports: the first node's are the single broker's, the others two apart.
    assert cluster.bootstrap_servers == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    assert [b.controller_port for b in cluster.brokers] == [19093, 19095, 19097]
    assert [b.node_id for b in stack.kafka_brokers] == [1, 2, 3]
    # Every node knows the whole quorum and replicates the internal topics 3 times.
    properties = cluster.node(2)._server_properties(tmp_path / "data")
    assert (
        "controller.quorum.voters=1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
        in properties
    )
    assert "node.id=2\n" in properties
    assert "offsets.topic.replication.factor=3\n" in properties
    assert "transaction.state.log.min.isr=2\n" in properties
    assert "min.insync.replicas=2\n" in properties


def test_a_cluster_chooses_distinct_free_ports(tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path, 3)
    ports = [b.port for b in cluster.brokers] + [b.controller_port for b in cluster.brokers]
    assert len(set(ports)) == 6
    assert None not in ports
