"""Shared fixtures: real services (PostgreSQL, Mosquitto, RabbitMQ), never mocks.

A test that needs a service skips when it is unreachable, unless IIOT_REQUIRE_SERVICES=1
(as in CI), where it fails instead so that a missing service cannot pass unseen.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support import need_service

PG_URL = os.environ.get("IIOT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
MQTT_HOST, MQTT_PORT = "127.0.0.1", int(os.environ.get("IIOT_TEST_MQTT_PORT", "1883"))
AMQP_URL = os.environ.get("IIOT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import asyncpg

    parts = urlsplit(PG_URL)
    need_service("PostgreSQL", parts.hostname or "127.0.0.1", parts.port or 5432)
    name = f"iiot_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _with_database(PG_URL, name)
    finally:
        admin = await asyncpg.connect(PG_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


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
