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
