"""Composition root: builds the services and enters every component in order.

Components are entered with one `AsyncExitStack` and left in reverse order: protocols stop
taking data first, then the pipeline flushes what it holds, then the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from contextlib import AsyncExitStack
from typing import Literal, Self

from iiot.adapters.base import Component
from iiot.alarms.service import AlarmService
from iiot.bus import LiveBus
from iiot.codec import Limits
from iiot.config import Settings
from iiot.control.attributes import AttributeService
from iiot.control.commands import CommandService
from iiot.control.inbox import ControlInbox
from iiot.device_identity import DeviceIdentity
from iiot.errors import Conflict
from iiot.filemodes import secure_data_dir
from iiot.ingest import Ingestor
from iiot.links import DeviceLinks
from iiot.metrics import Metrics
from iiot.model import Role
from iiot.pipeline import Pipeline, PipelineSettings
from iiot.presence import Presence
from iiot.presence_tracker import PresenceTracker
from iiot.registry import DeviceRegistry
from iiot.runtime import freeze_started_objects
from iiot.security import hash_password, random_secret
from iiot.services import HealthBoard, Services
from iiot.storage import open_store
from iiot.storage.alarm_base import alarm_store_for
from iiot.storage.base import Store

__all__ = ["Platform", "RunRole", "build_components", "run_platform"]

log = logging.getLogger("iiot")

RunRole = Literal["all", "api", "ingest"]


def build_components(services: Services, role: RunRole = "all") -> list[Component]:
    """The enabled components for a role, in start order (HTTP last, so it stops first)."""
    settings = services.settings
    health = services.health
    # Presence first: it stops last, after every adapter has closed its devices' links.
    components: list[Component] = [PresenceTracker(services)]
    if role in ("all", "ingest"):
        if settings.opcua_port:
            from iiot.adapters.opcua import OpcUaServer

            components.append(OpcUaServer(services))
        else:
            health.set("opcua", "off", "IIOT_OPCUA_PORT=0")
        if settings.coap_port:
            from iiot.adapters.coap import CoapServer

            components.append(CoapServer(services))
        else:
            health.set("coap", "off", "IIOT_COAP_PORT=0")
        if settings.mqtt_url:
            from iiot.adapters.mqtt import MqttAdapter

            components.append(MqttAdapter(services))
            from iiot.adapters.mqtt_commands import MqttCommandChannel

            components.append(MqttCommandChannel(services))
            from iiot.adapters.mqtt_broker_stats import BrokerStats

            components.append(BrokerStats(services))
        elif settings.mqtt_port:
            from iiot.adapters.mqtt_server import MqttServer

            components.append(MqttServer(services))
        else:
            health.set("mqtt", "off", "IIOT_MQTT_PORT=0 and IIOT_MQTT_URL unset")
        if settings.amqp_url:
            from iiot.adapters.amqp import AmqpAdapter

            components.append(AmqpAdapter(services))
            from iiot.adapters.amqp_commands import AmqpCommandChannel

            components.append(AmqpCommandChannel(services))
        else:
            health.set("amqp", "off", "IIOT_AMQP_URL unset")
            log.info("AMQP ingestion off (IIOT_AMQP_URL unset)")
    if role in ("all", "ingest") and services.alarms is not None:
        from iiot.alarms.components import alarm_components

        components += alarm_components(services)
    if services.alarms is not None:
        from iiot.alarms.webhooks import WebhookSender

        components.append(WebhookSender(services))
    if role in ("all", "ingest"):
        from iiot.retention import RetentionJob

        components.append(RetentionJob(services))
    # Live values and commands between split roles, or between the nodes of a cluster.
    if settings.uses_postgres and (role != "all" or settings.cluster):
        from iiot.livebridge import LiveBridge

        components.append(LiveBridge(services))
    from iiot.changefeed import ChangeFeed  # changes made by `iiot` commands meanwhile

    if ChangeFeed.wanted(settings, role):
        components.append(ChangeFeed(services))
    if role == "ingest" and settings.http_port:  # supervisors still need /healthz
        from iiot.ops_http import OpsHttpServer

        components.append(OpsHttpServer(services))
    if role in ("all", "api") and settings.http_port:
        from iiot.api.server import HttpServer

        components.append(HttpServer(services))
    return components


class Platform:
    """The running platform: services plus every enabled component."""

    def __init__(self, settings: Settings, role: RunRole = "all") -> None:
        self.settings = settings
        self.role = role
        self.components: list[Component] = []
        self._stack = AsyncExitStack()
        self._services: Services | None = None

    @property
    def services(self) -> Services:
        """The shared services (available once entered)."""
        if self._services is None:
            raise RuntimeError("platform not started")
        return self._services

    async def __aenter__(self) -> Self:
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        secure_data_dir(settings.data_dir)
        try:
            store = await self._stack.enter_async_context(
                open_store(
                    settings.effective_database_url,
                    read_url=settings.database_read_url,
                    batch_writers=settings.batch_writers,
                )
            )
            await ensure_admin(store, settings)
            bus = LiveBus()
            metrics = Metrics()
            registry = DeviceRegistry(store, bus)
            pipeline = await self._stack.enter_async_context(
                Pipeline(
                    store,
                    bus,
                    metrics,
                    PipelineSettings(
                        max_batch_points=settings.batch_max_points,
                        max_delay_s=settings.batch_max_delay_ms / 1000,
                        queue_max_points=settings.queue_max_points,
                        commit_timeout_s=settings.commit_timeout_s,
                        writers=settings.batch_writers,
                    ),
                )
            )
            presence = Presence()
            ingestor = Ingestor(
                registry,
                pipeline,
                metrics,
                Limits(settings.max_message_bytes, settings.max_points_per_message),
                presence,
            )
            links = DeviceLinks()
            commands = await self._stack.enter_async_context(
                CommandService(
                    store,
                    bus,
                    links,
                    metrics,
                    distributed=self.role != "all" or settings.cluster,
                    sequential=settings.commands_sequential,
                )
            )
            attributes = await self._stack.enter_async_context(AttributeService(store, bus, links))
            self._services = Services(
                settings=settings,
                store=store,
                bus=bus,
                metrics=metrics,
                registry=registry,
                pipeline=pipeline,
                ingestor=ingestor,
                commands=commands,
                attributes=attributes,
                health=HealthBoard(starting=True),
                identity=DeviceIdentity(store, bus),
                presence=presence,
                links=links,
                inbox=ControlInbox(commands, attributes),
            )
            self._services.alarms = AlarmService(alarm_store_for(store), bus)
            for component in build_components(self._services, self.role):
                await self._stack.enter_async_context(component)
                self.components.append(component)
                log.info("%s", component.describe())
            self._services.health.starting = False
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


async def ensure_admin(store: Store, settings: Settings) -> None:
    """Create the first system administrator when no user exists yet."""
    if await store.count_users() > 0:
        return
    password = settings.admin_password or random_secret(18)
    try:
        await store.create_user(
            None,
            settings.admin_username,
            hash_password(password, settings.bcrypt_rounds),
            Role.SYSADMIN,
        )
    except Conflict:
        return  # another platform process (a second role) created it at the same moment
    if settings.admin_password is None:
        path = settings.data_dir / "admin-password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        # Printed once, on purpose: the operator needs it to log in the first time.
        print(
            f"Created administrator {settings.admin_username!r} with password {password} "
            f"(also stored in {path}, mode 0600)",
            flush=True,
        )


async def run_platform(settings: Settings, role: RunRole = "all") -> None:
    """Run until SIGINT or SIGTERM, then stop in reverse order after flushing."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Platform(settings, role):
            freeze_started_objects()
            log.info("platform ready (role %s)", role)
            await stop.wait()
            log.info("stopping")
        log.info("stopped")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
