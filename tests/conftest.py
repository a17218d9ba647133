"""Shared fixtures: real services (PostgreSQL, Mosquitto, RabbitMQ), never mocks.

A test that needs a service skips when it is unreachable, unless IIOT_REQUIRE_SERVICES=1
(as in CI), where it fails instead so that a missing service cannot pass unseen.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from tests.support import need_service, temporary_pg_database

PG_URL = os.environ.get("IIOT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
MQTT_HOST, MQTT_PORT = "127.0.0.1", int(os.environ.get("IIOT_TEST_MQTT_PORT", "1883"))
AMQP_URL = os.environ.get("IIOT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    parts = urlsplit(PG_URL)
    need_service("PostgreSQL", parts.hostname or "127.0.0.1", parts.port or 5432)
    async with temporary_pg_database(PG_URL) as url:
        yield url


@pytest.fixture
def mosquitto() -> tuple[str, int]:
    """The shared Mosquitto broker (host, port)."""
    need_service("Mosquitto", MQTT_HOST, MQTT_PORT)
    return MQTT_HOST, MQTT_PORT


@pytest.fixture
def amqp_url() -> str:
    """The shared RabbitMQ broker URL."""
    parts = urlsplit(AMQP_URL)
    need_service("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
    return AMQP_URL
