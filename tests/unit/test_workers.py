"""`iiot run --workers N`: what each worker is told, and the shared listening sockets."""

from __future__ import annotations

import socket

import pytest

from iiot.config import load_settings
from iiot.errors import ConfigError
from iiot.listen import reuse_port_socket
from iiot.workers import run_workers, worker_env

PG = "postgresql://postgres@127.0.0.1:5432/iiot"


def test_ingest_workers_share_every_protocol_and_keep_one_opcua_server() -> None:
    settings = load_settings({"IIOT_DATABASE_URL": PG, "IIOT_MQTT_URL": "mqtt://broker:1883"})
    first, second = worker_env(settings, "ingest", 1), worker_env(settings, "ingest", 2)
    assert first["IIOT_WORKER_INDEX"] == "1" and second["IIOT_WORKER_INDEX"] == "2"
    assert first["IIOT_MQTT_SHARED_GROUP"] == second["IIOT_MQTT_SHARED_GROUP"] == "iiot"
    assert first["IIOT_HTTP_REUSE_PORT"] == second["IIOT_HTTP_REUSE_PORT"] == "1"
    assert "IIOT_OPCUA_PORT" not in first or first["IIOT_OPCUA_PORT"] != "0"
    assert second["IIOT_OPCUA_PORT"] == "0"
    # Each worker's settings load, and each has its own MQTT session id.
    assert load_settings(second).worker_index == 2


def test_a_configured_shared_group_is_kept_and_the_embedded_broker_runs_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IIOT_MQTT_SHARED_GROUP", "plant")
    settings = load_settings({"IIOT_DATABASE_URL": PG, "IIOT_MQTT_SHARED_GROUP": "plant"})
    assert worker_env(settings, "ingest", 2)["IIOT_MQTT_SHARED_GROUP"] == "plant"
    assert worker_env(settings, "ingest", 1).get("IIOT_MQTT_PORT") != "0"
    assert worker_env(settings, "ingest", 2)["IIOT_MQTT_PORT"] == "0"
    assert "IIOT_WORKER_INDEX" not in worker_env(settings, "api", 2)


def test_ingest_workers_need_postgresql() -> None:
    with pytest.raises(ConfigError, match="needs PostgreSQL"):
        run_workers(load_settings({}), "ingest", 2)
    with pytest.raises(ConfigError, match="--role api or --role ingest"):
        run_workers(load_settings({"IIOT_DATABASE_URL": PG}), "all", 2)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_reuse_port_sockets_share_a_port_that_a_plain_socket_cannot_take(kind: int) -> None:
    first = reuse_port_socket("127.0.0.1", 0, kind)
    port = first.getsockname()[1]
    second = reuse_port_socket("127.0.0.1", port, kind)
    try:
        assert second.getsockname()[1] == port
        with socket.socket(socket.AF_INET, kind) as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    finally:
        first.close()
        second.close()
