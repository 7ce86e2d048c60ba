"""Configuration is parsed once, and every bad variable is named."""

from __future__ import annotations

import pytest

from shared.config import DEV_JWT_SECRET, ConfigError, load_settings

BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "CARGOTRACK_JWT_SECRET": "unit-test-hs256-secret-0123456789abcdef",
}


def test_defaults_are_usable() -> None:
    settings = load_settings(BASE, default_grpc_port=50051)
    assert settings.grpc.port == 50051
    assert settings.topics.gps_points == "cargotrack.gps-points"
    assert settings.auth.algorithms == ["HS256"]
    assert settings.kafka.client_options()["bootstrap_servers"] == "127.0.0.1:9092"


def test_every_bad_variable_is_named_at_once() -> None:
    env = {
        **BASE,
        "CARGOTRACK_TOPIC_PARTITIONS": "many",
        "CARGOTRACK_GRPC_PORT": "-1",
        "CARGOTRACK_LOG_FORMAT": "xml",
        "DATABASE_URL": "mysql://x",
    }
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    message = str(raised.value)
    for name in (
        "CARGOTRACK_TOPIC_PARTITIONS",
        "CARGOTRACK_GRPC_PORT",
        "CARGOTRACK_LOG_FORMAT",
        "DATABASE_URL",
    ):
        assert name in message


def test_missing_required_variables_say_what_to_set() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({})
    message = str(raised.value)
    assert "KAFKA_BOOTSTRAP_SERVERS is not set" in message
    assert "DATABASE_URL is not set" in message
    assert "CARGOTRACK_JWT_SECRET" in message


def test_dev_key_only_in_dev_mode() -> None:
    env = {k: v for k, v in BASE.items() if k != "CARGOTRACK_JWT_SECRET"}
    assert load_settings({**env, "CARGOTRACK_DEV_MODE": "1"}).auth.jwt_secret == DEV_JWT_SECRET
    with pytest.raises(ConfigError, match="development key"):
        load_settings({**env, "CARGOTRACK_JWT_SECRET": DEV_JWT_SECRET})


def test_tls_files_go_together() -> None:
    with pytest.raises(ConfigError, match="go together"):
        load_settings({**BASE, "CARGOTRACK_TLS_CERT_FILE": "/tmp/cert.pem"})


def test_the_page_token_key_is_configured_or_derived_from_the_jwt_secret() -> None:
    configured = load_settings({**BASE, "CARGOTRACK_PAGE_TOKEN_KEY": "p" * 32})
    assert configured.page_token_key_bytes() == b"p" * 32
    derived = load_settings(BASE).page_token_key_bytes()
    assert derived is not None
    assert len(derived) == 32
    assert BASE["CARGOTRACK_JWT_SECRET"].encode() not in derived
    other = load_settings(
        {**BASE, "CARGOTRACK_JWT_SECRET": "another-secret-of-at-least-32-bytes"}
    ).page_token_key_bytes()
    assert derived != other
    public_only = {k: v for k, v in BASE.items() if k != "CARGOTRACK_JWT_SECRET"}
    public_only["CARGOTRACK_JWT_PUBLIC_KEY"] = "-----BEGIN PUBLIC KEY-----"
    assert load_settings(public_only).page_token_key_bytes() is None


def test_a_short_page_token_key_is_named() -> None:
    with pytest.raises(ConfigError, match="CARGOTRACK_PAGE_TOKEN_KEY"):
        load_settings({**BASE, "CARGOTRACK_PAGE_TOKEN_KEY": "short"})


def test_tracking_query_refuses_to_start_without_a_page_token_key() -> None:
    from services.tracking_query.app import QueryServer

    public_only = {k: v for k, v in BASE.items() if k != "CARGOTRACK_JWT_SECRET"}
    public_only["CARGOTRACK_JWT_PUBLIC_KEY"] = "-----BEGIN PUBLIC KEY-----"
    with pytest.raises(ConfigError, match="CARGOTRACK_PAGE_TOKEN_KEY"):
        QueryServer(load_settings(public_only))


def test_learner_settings_are_parsed_and_checked() -> None:
    settings = load_settings(
        {
            **BASE,
            "CARGOTRACK_LEARNER_HALF_LIFE_DAYS": "3",
            "CARGOTRACK_LEARNER_TIMEZONE": "Europe/London",
        }
    )
    assert settings.learner.half_life_days == 3.0
    assert settings.learner.timezone == "Europe/London"
    with pytest.raises(ConfigError) as raised:
        load_settings(
            {
                **BASE,
                "CARGOTRACK_LEARNER_TIMEZONE": "Mars/Olympus",
                "CARGOTRACK_LEARNER_KEEP_VERSIONS": "1",
            }
        )
    assert "CARGOTRACK_LEARNER_TIMEZONE" in str(raised.value)
    assert "CARGOTRACK_LEARNER_KEEP_VERSIONS" in str(raised.value)


def test_processes_default_to_one_and_are_bounded() -> None:
    assert load_settings(BASE).processes == 1
    assert load_settings({**BASE, "CARGOTRACK_PROCESSES": "4"}).processes == 4
    for bad, expected in (("0", "at least 1"), ("65", "at most 64"), ("two", "an integer")):
        with pytest.raises(ConfigError, match=f"CARGOTRACK_PROCESSES=.*{expected}"):
            load_settings({**BASE, "CARGOTRACK_PROCESSES": bad})
    with pytest.raises(ConfigError, match="CARGOTRACK_METRICS_PORT=65534: with CARGOTRACK_PRO"):
        load_settings({**BASE, "CARGOTRACK_PROCESSES": "2", "CARGOTRACK_METRICS_PORT": "65534"})
    assert (
        load_settings(
            {**BASE, "CARGOTRACK_PROCESSES": "2", "CARGOTRACK_METRICS_PORT": "65533"}
        ).processes
        == 2
    )


def test_a_worker_shares_the_grpc_port_and_has_its_own_metrics_port() -> None:
    settings = load_settings(
        {**BASE, "CARGOTRACK_PROCESSES": "3", "CARGOTRACK_METRICS_PORT": "9090"},
        default_grpc_port=50054,
    )
    assert not settings.grpc.reuse_port  # a lone process never shares its port
    second = settings.for_worker(1)
    assert second.grpc.reuse_port
    assert second.grpc.port == 50054
    # Each on loopback above the parent's port, where the parent collects them.
    assert [settings.for_worker(i).metrics_port for i in range(3)] == [9091, 9092, 9093]
    assert second.metrics_host == "127.0.0.1"
    assert settings.metrics_host is None  # the parent binds the gRPC host
    assert load_settings(BASE).for_worker(0).metrics_port == 0  # metrics off stay off
    with pytest.raises(ValueError, match="worker 3 of 3"):
        settings.for_worker(3)


def test_projector_pipelining_is_off_unless_switched_on_and_a_bad_value_is_named() -> None:
    assert load_settings(BASE).projector_pipelined is False
    assert load_settings({**BASE, "CARGOTRACK_PROJECTOR_PIPELINED": "1"}).projector_pipelined
    with pytest.raises(ConfigError, match="CARGOTRACK_PROJECTOR_PIPELINED"):
        load_settings({**BASE, "CARGOTRACK_PROJECTOR_PIPELINED": "sometimes"})
