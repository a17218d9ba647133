"""Settings: defaults, environment, TOML file, and one-line errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from iiot.config import load_settings
from iiot.errors import ConfigError


def test_defaults_are_the_embedded_ones() -> None:
    settings = load_settings({})
    assert settings.http_port == 8080
    assert settings.mqtt_url is None
    assert settings.effective_database_url == "sqlite:///data/iiot.db"
    assert not settings.uses_postgres


def test_environment_overrides() -> None:
    settings = load_settings(
        {
            "IIOT_HTTP_PORT": "9000",
            "IIOT_OPCUA_ALLOW_NONE": "yes",
            "IIOT_DATABASE_URL": "postgresql://postgres@127.0.0.1/test",
        }
    )
    assert settings.http_port == 9000
    assert settings.opcua_allow_none is True
    assert settings.uses_postgres


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("IIOT_HTTP_PORT", "http", "expected a port number"),
        ("IIOT_COAP_PORT", "70000", "expected a port number"),
        ("IIOT_DATABASE_URL", "mysql://x/y", "expected sqlite:///path or postgresql://"),
        ("IIOT_MQTT_URL", "tcp://broker", "expected mqtt://"),
        ("IIOT_OPCUA_ALLOW_NONE", "maybe", "expected 1/0"),
        ("IIOT_LOG_LEVEL", "LOUD", "expected one of DEBUG"),
    ],
)
def test_bad_values_name_variable_value_and_expectation(
    name: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    message = str(caught.value)
    assert "\n" not in message
    assert f"{name}={value!r}" in message
    assert expected in message


def test_toml_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    config = tmp_path / "iiot.toml"
    config.write_text("http_port = 9100\ncoap_port = 0\nopcua_allow_none = true\n")
    settings = load_settings({"IIOT_CONFIG": str(config), "IIOT_HTTP_PORT": "9200"})
    assert (settings.http_port, settings.coap_port, settings.opcua_allow_none) == (9200, 0, True)


def test_toml_unknown_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "iiot.toml"
    config.write_text("htp_port = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'htp_port'"):
        load_settings({"IIOT_CONFIG": str(config)})


def test_cluster_needs_postgresql() -> None:
    pg = "postgresql://postgres@127.0.0.1/test"
    assert load_settings({"IIOT_CLUSTER": "1", "IIOT_DATABASE_URL": pg}).cluster is True
    assert load_settings({}).cluster is False
    with pytest.raises(ConfigError, match="IIOT_CLUSTER=1 needs a PostgreSQL IIOT_DATABASE_URL"):
        load_settings({"IIOT_CLUSTER": "1"})
