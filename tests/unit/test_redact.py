"""Secrets stay out of logs: URL passwords in configuration errors, device tokens in paths."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI

from iiot.api.errors import install_error_handlers
from iiot.config import load_settings
from iiot.errors import ConfigError
from iiot.redact import redact_path, redact_url


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IIOT_DATABASE_URL", "mysql://iiot:s3cret-pw@db.example/iiot"),
        ("IIOT_AMQP_URL", "http://iiot:s3cret-pw@mq.example/"),
        ("IIOT_MQTT_URL", "mqtt://iiot:s3cret-pw@"),
    ],
)
def test_configuration_errors_do_not_echo_passwords(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    message = str(caught.value)
    assert name in message and "***" in message
    assert "s3cret-pw" not in message


def test_redaction_helpers() -> None:
    assert redact_path("/api/v1/AbC-123_x/telemetry") == "/api/v1/***/telemetry"
    assert redact_path("/api/v1/tok/rpc/7?timeout=5") == "/api/v1/***/rpc/7?timeout=5"
    assert redact_path("/api/devices/1") == "/api/devices/1"
    assert redact_url("postgresql://u:p@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("amqp://h/vhost") == "amqp://h/vhost"


async def test_logged_request_paths_carry_no_device_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/api/v1/{token}/telemetry")
    async def boom(token: str) -> None:
        raise RuntimeError("a bug")

    caplog.set_level(logging.INFO)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answer = await client.post("/api/v1/SECRET-TOKEN-1/telemetry")
    assert answer.status_code == 500
    logged = [r.getMessage() for r in caplog.records if not r.name.startswith("httpx")]
    assert any("/api/v1/***/telemetry" in line for line in logged)
    assert not any("SECRET-TOKEN-1" in line for line in logged)
