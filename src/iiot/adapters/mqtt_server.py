"""The platform's own MQTT endpoint for devices (MQTT 3.1.1 and 5.0), used when
`IIOT_MQTT_URL` is unset.

The listener (and a TLS one on `IIOT_MQTTS_PORT` when `IIOT_TLS_CERT`/`IIOT_TLS_KEY` are
set), logins checked through the device registry, client-id takeover, persistent sessions,
the device links and the limits shared by every connection. The per-connection protocol is
`mqtt_connection` (its CONNECT handshake `mqtt_login`), the topics `mqtt_topics`, what they
do `mqtt_actions`, wills `mqtt_wills`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import Any, Self

from iiot.adapters import mqtt_codec as mc
from iiot.adapters.mqtt_actions import Actions, MqttDeviceLink
from iiot.adapters.mqtt_connection import PROTOCOL, MqttConnection
from iiot.adapters.mqtt_sessions import SessionStore
from iiot.adapters.mqtt_shared import RefusalLog
from iiot.adapters.mqtt_wills import Wills
from iiot.errors import AuthenticationError
from iiot.model import Device
from iiot.services import Services

__all__ = ["MqttServer"]

log = logging.getLogger(__name__)

# QoS 1 messages a device may have awaiting PUBACK (v5 Receive Maximum; 3.1.1: read pause).
RECEIVE_MAXIMUM = 100
# Room for the fixed header, topic and properties beside a payload of the message size limit.
_HEADER_ROOM = 1024


class MqttServer:
    """The embedded MQTT endpoint (a platform component)."""

    name = "mqtt"

    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings
        self.max_packet_size = settings.max_message_bytes + _HEADER_ROOM
        self.receive_maximum = RECEIVE_MAXIMUM
        self.max_connections = settings.mqtt_max_connections
        self.refusals = RefusalLog(log)
        self.actions = Actions(self)
        self.sessions = SessionStore(services, spawn=self.track)
        self.wills = Wills(self)
        self.connections: set[MqttConnection] = set()
        self.by_client_id: dict[str, MqttConnection] = {}
        self._links: dict[tuple[MqttConnection, str | None], MqttDeviceLink] = {}
        self._servers: list[asyncio.Server] = []
        self._problem: str | None = None
        self._tls_problem: str | None = None
        self._closing = False
        self._gauge = services.metrics.connections.labels(PROTOCOL)
        self._tasks: set[asyncio.Future[Any]] = set()

    # --- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        settings = self.services.settings
        health, metrics = self.services.health, self.services.metrics
        self._closing = False
        try:
            self._servers.append(await self._listen(settings.mqtt_port, None))
        except OSError as exc:
            port = settings.mqtt_port
            what = (
                "is taken (is Mosquitto running?)"
                if exc.errno == errno.EADDRINUSE
                else f"cannot be opened ({exc.strerror})"
            )
            self._problem = (
                f"MQTT port {port} {what}: set IIOT_MQTT_PORT to a free port, "
                f"or IIOT_MQTT_URL=mqtt://host:{port} to use that broker"
            )
            # Not fatal on purpose: the rest of the platform runs (e.g. next to Mosquitto).
            log.error("%s", self._problem)
            health.set(self.name, "down", self._problem)
            metrics.component_up.labels(self.name).set(0)
            return self
        if settings.tls_cert and settings.tls_key and settings.mqtts_port:
            try:
                context = self._tls_context()
                self._servers.append(await self._listen(settings.mqtts_port, context))
            except (OSError, ssl.SSLError) as exc:
                self._tls_problem = f"MQTTS port {settings.mqtts_port} not listening: {exc}"
                log.error("%s", self._tls_problem)
        health.set(self.name, "up", f"embedded MQTT endpoint on port {settings.mqtt_port}")
        metrics.component_up.labels(self.name).set(1)
        return self

    async def _listen(self, port: int, context: ssl.SSLContext | None) -> asyncio.Server:
        settings = self.services.settings
        reuse_port = settings.http_reuse_port and hasattr(socket, "SO_REUSEPORT")
        return await asyncio.get_running_loop().create_server(
            lambda: MqttConnection(self),
            settings.bind_host,
            port,
            ssl=context,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=4096,
        )

    def _tls_context(self) -> ssl.SSLContext:
        settings = self.services.settings
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if settings.tls_client_ca:
            # Ask for a client certificate (optional: token logins still work over TLS).
            context.load_verify_locations(cafile=str(settings.tls_client_ca))
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        self.wills.publish_all()
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close(0x8B)  # server shutting down
        tasks = [task for conn in list(self.connections) for task in conn.cancel_tasks()]
        if self._tasks:  # session saves and wills: short writes, let them finish
            await asyncio.wait(list(self._tasks), timeout=5)
        tasks += list(self._tasks)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._problem is None:
            self.services.health.set(self.name, "down", "stopped")
            self.services.metrics.component_up.labels(self.name).set(0)

    def describe(self) -> str:
        """One line for the start-up log."""
        settings = self.services.settings
        where = f"MQTT {settings.bind_host}:{settings.mqtt_port} (embedded endpoint, 3.1.1 and 5.0)"
        if self._problem:
            return f"{where}: not listening, {self._problem}"
        if len(self._servers) > 1:
            where += f", MQTTS port {settings.mqtts_port}"
        elif self._tls_problem:
            where += f"; {self._tls_problem}"
        return where

    # --- connections -----------------------------------------------------------------------
    def opened(self, conn: MqttConnection) -> None:
        """A TCP connection arrived."""
        self.connections.add(conn)
        self._gauge.inc()

    def admit(self, conn: MqttConnection) -> bool:
        """Whether one more logged-in connection fits under the limit."""
        return not self._closing and len(self.by_client_id) < self.max_connections

    async def authenticate(self, packet: mc.Connect, certificate: bytes | None) -> Device:
        """The device behind these credentials (`AuthenticationError` if none)."""
        registry = self.services.registry
        if certificate is not None:
            device = await self._by_certificate(certificate)
            if device is not None:
                return device
        username = packet.username
        if not username:
            raise AuthenticationError("no username, token or registered certificate")
        if packet.password:
            try:
                password = packet.password.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise AuthenticationError("password is not a device token") from exc
            return await registry.authenticate_id(username, password)
        return await registry.authenticate(username)  # ThingsBoard: the token as username

    async def _by_certificate(self, der: bytes) -> Device | None:
        """The device a presented client certificate is registered to (None: not registered)."""
        try:
            return await self.services.identity.authenticate_certificate(der)
        except AuthenticationError:
            return None

    def take_over(self, conn: MqttConnection, device: Device, clean_start: bool) -> bool:
        """Register the connection under its client id; an older one of the same device is
        closed (session taken over); one of another device keeps it and this one is refused.

        The older connection's will (or one still waiting for its delay) is dropped when the
        v5 session goes on in this connection, and published now when it ends: Clean Start,
        a Session Expiry of 0, or MQTT 3.1.1 (whose will is due whenever a connection ends).
        """
        old = self.by_client_id.get(conn.client_id)
        if old is not None and old is not conn:
            if old.device is None or old.device.id != device.id:
                return False
            will, old.will = old.will, None
            goes_on = old.version == mc.V5 and not clean_start and old.session_expiry > 0
            if will is not None and not goes_on:
                self.wills.publish(old, will)
            old.close(0x8E)  # session taken over
            self._forget(old)
        self.wills.reconnected(device, conn.client_id, clean_start)
        self.by_client_id[conn.client_id] = conn
        return True

    def connected(self, conn: MqttConnection) -> None:
        """The CONNECT was accepted: links for restored subscriptions."""
        self.subscriptions_changed(conn)

    def lost(self, conn: MqttConnection, abnormal: bool) -> None:
        """The TCP connection ended."""
        if conn in self.connections:
            self.connections.discard(conn)
            self._gauge.dec()
        if conn.will is not None and not self._closing:
            self.wills.connection_ended(conn)
        if conn.device is not None and conn.persistent and not self._closing:
            self.track(self.sessions.save(conn.client_id, conn.device, conn.subscriptions))
        self._forget(conn)

    def _forget(self, conn: MqttConnection) -> None:
        if self.by_client_id.get(conn.client_id) is conn:
            del self.by_client_id[conn.client_id]
        for key in [key for key in self._links if key[0] is conn]:
            link = self._links.pop(key)
            self.services.links.detach(link.device.id, link)

    # --- links -----------------------------------------------------------------------------
    def subscriptions_changed(self, conn: MqttConnection) -> None:
        """Attach or detach the device's links after its subscriptions changed."""
        if conn.device is None or conn.closed:
            return
        self._update_link(conn, conn.device, None)
        for name, child in self._children(conn).items():
            self._update_link(conn, child, name)
        if conn.persistent:
            self.track(self.sessions.save(conn.client_id, conn.device, conn.subscriptions))

    def _update_link(self, conn: MqttConnection, device: Device, child: str | None) -> None:
        # A device's link stays attached while its connection is open (a child's while its
        # gateway says it is connected): that is what `connected` means. What it listens
        # for follows its subscriptions; attaching again tells the services of a change.
        key = (conn, child)
        link = self._links.get(key) or MqttDeviceLink(conn, device, child)
        link.refresh()
        self._links[key] = link
        self.services.links.attach(device, link)

    # --- gateways --------------------------------------------------------------------------
    @staticmethod
    def _children(conn: MqttConnection) -> dict[str, Device]:
        children: dict[str, Device] = conn.extra.setdefault("children", {})
        return children

    async def gateway_child(self, conn: MqttConnection, name: str, announce: bool) -> Device:
        """The gateway's child device named `name`, created in its tenant when missing."""
        children = self._children(conn)
        child = children.get(name)
        if child is None:
            gateway = conn.device
            assert gateway is not None
            child = await self.services.identity.child(gateway, name)
            children[name] = child
            if len(children) > 100_000:
                del children[next(iter(children))]
            if not conn.closed:  # a will acts for a closed connection: nothing to link
                self._update_link(conn, child, name)
        return child

    def gateway_child_gone(self, conn: MqttConnection, name: str) -> None:
        """The gateway says the child disconnected: nothing more is routed to it."""
        child = self._children(conn).pop(name, None)
        link = self._links.pop((conn, name), None)
        if child is not None and link is not None:
            self.services.links.detach(child.id, link)

    # --- refusals --------------------------------------------------------------------------
    def note(self, kind: str, message: str) -> None:
        """Log a refusal (rate-limited per kind)."""
        self.refusals.note(kind, message)

    def refused(self, reason: str, message: str) -> None:
        """A connection closed for `reason`: counted and logged."""
        self.services.metrics.messages_refused.labels(PROTOCOL, reason).inc()
        self.refusals.note(reason, message)

    def login_refused(self, message: str) -> None:
        """A refused login: counted as an authentication failure and logged."""
        self.services.metrics.auth_failures.labels(PROTOCOL).inc()
        self.refusals.note("login", message)

    def forbidden(self, conn: MqttConnection, reason: str, message: str) -> None:
        """A topic the device may not use: counted and logged."""
        metrics = self.services.metrics
        if reason == "forbidden_topic":
            metrics.messages_received.labels(PROTOCOL).inc()
        metrics.messages_refused.labels(PROTOCOL, reason).inc()
        who = f"device {conn.device.id}" if conn.device is not None else conn.client_id
        self.refusals.note(reason, f"{who} {message}")

    def track(self, coro: Any) -> asyncio.Future[Any]:
        """Run a coroutine in the background, cancelled when the endpoint stops."""
        task: asyncio.Future[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
