"""The CONNECT handshake of one MQTT connection, up to its CONNACK (a mixin of `MqttConnection`).

The protocol level and name, the connection limit, the login (credentials or client
certificate), the client-id takeover, the persistent session (restored or dropped), the
CONNACK with the v5 limits, then the packets held while all this was decided.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any, cast
from uuid import uuid4

from iiot.adapters import mqtt_codec as mc
from iiot.errors import AuthenticationError, StorageUnavailable

if TYPE_CHECKING:
    from iiot.adapters.mqtt_connection import MqttConnection
    from iiot.adapters.mqtt_server import MqttServer
    from iiot.model import Device

__all__ = ["MqttLogin"]


class MqttLogin:
    """What `MqttConnection` does with its CONNECT, before the device is known."""

    if TYPE_CHECKING:  # `MqttConnection` provides these; declared for the type checker only
        server: MqttServer
        transport: asyncio.Transport | None
        version: int
        device: Device | None
        client_id: str
        persistent: bool
        session_expiry: int
        subscriptions: dict[str, int]
        will: mc.Will | None
        closed: bool
        window: int
        extra: dict[str, Any]
        _held: list[mc.Packet] | None
        _reading_paused: bool
        _keepalive: float

        def write(self, data: bytes) -> None: ...
        def close(self, code: int | None = None) -> None: ...
        def refuse(self, reason: str, message: str, code_v5: int | None) -> None: ...
        def _who(self) -> str: ...
        def _handle(self, packet: mc.Packet) -> None: ...
        def _schedule_keepalive(self) -> None: ...
        def _track(self, task: asyncio.Future[Any]) -> None: ...

    def _on_connect(self, packet: mc.Connect) -> None:
        if packet.level not in (mc.V311, mc.V5):
            # A level this endpoint does not speak: answer in a form that client can read.
            old = packet.level < mc.V311
            self.write(mc.encode_connack(mc.V311 if old else mc.V5, 0x01 if old else 0x84))
            self.refuse("protocol_version", f"protocol level {packet.level} refused", None)
            return
        self.version = packet.level
        if packet.level == mc.V311 and packet.protocol_name != "MQTT":
            self.refuse("protocol_error", "protocol name is not MQTT", None)
            return
        self.client_id = packet.client_id
        self._held = []
        if self.transport is not None:  # nothing more is read until the login is decided
            self.transport.pause_reading()
        task = asyncio.ensure_future(self._login(packet))
        self._track(task)

    async def _login(self, packet: mc.Connect) -> None:
        v5 = self.version == mc.V5
        server = self.server
        conn = cast("MqttConnection", self)  # the server speaks of whole connections
        if not server.admit(conn):
            self._connack(0x97 if v5 else 0x03)  # quota exceeded / server unavailable
            self.refuse("too_many_connections", "connection limit reached", None)
            return
        if not packet.client_id and not v5 and not packet.clean_start:
            self._connack(0x02)  # identifier rejected: a session needs a name
            self.refuse("login", "empty client id with a persistent session", None)
            return
        if mc.AUTH_METHOD in packet.properties:
            self._connack(0x8C)  # bad authentication method
            self.refuse("login", "enhanced authentication is not offered", None)
            return
        try:
            device = await server.authenticate(packet, self._certificate())
        except AuthenticationError as exc:
            bad_credentials = packet.username is None and self._certificate() is None
            code = (
                (0x86 if bad_credentials else 0x87) if v5 else (0x04 if bad_credentials else 0x05)
            )
            self._connack(code)
            server.login_refused(f"{self._who()}: login refused ({exc}); connection closed")
            self.close()
            return
        except StorageUnavailable as exc:
            self._connack(0x88 if v5 else 0x03)
            self.refuse("storage_unavailable", f"login not checked: {exc}", None)
            return
        if self.closed:
            return
        assigned = None
        if not packet.client_id:
            assigned = f"iiot-{uuid4().hex}"
            self.client_id = assigned
        if not server.take_over(conn, device, packet.clean_start):
            self._connack(0x85 if v5 else 0x02)  # client identifier not valid / rejected
            self.refuse(
                "client_id_taken",
                f"client id {self.client_id!r} is in use by another device",
                None,
            )
            return
        self.device = device
        self.will = packet.will
        expiry = packet.properties.get(mc.SESSION_EXPIRY, 0) if v5 else None
        self.session_expiry = expiry or 0
        # Kept after the connection ends: 3.1.1 clean session 0; v5 a session expiry, also
        # with Clean Start 1 (which only ends the session there was before).
        self.persistent = not packet.clean_start if expiry is None else expiry > 0
        present = False
        if not packet.clean_start:
            saved = await server.sessions.load(self.client_id, device)
            if saved is not None:
                self.subscriptions.update(saved)
                present = True
        if self.persistent and packet.clean_start:
            await server.sessions.drop(self.client_id, device)  # before this one's saves
        elif not self.persistent:
            server.sessions.drop_soon(self.client_id, device)  # not awaited: CONNACK first
        if self.closed:
            return
        props: mc.Properties = {}
        if v5:
            props = {
                mc.MAXIMUM_QOS: 1,
                mc.RETAIN_AVAILABLE: 0,
                mc.RECEIVE_MAXIMUM: self.window,
                mc.MAXIMUM_PACKET_SIZE: server.max_packet_size,
                mc.TOPIC_ALIAS_MAXIMUM: 0,
                mc.WILDCARD_AVAILABLE: 1,
                mc.SUB_IDS_AVAILABLE: 0,
                mc.SHARED_AVAILABLE: 0,
            }
            if assigned:
                props[mc.ASSIGNED_CLIENT_ID] = assigned
            client_max = packet.properties.get(mc.RECEIVE_MAXIMUM)
            if client_max:
                self.extra["client_receive_max"] = client_max
        self._connack(0, present, props)
        self._keepalive = packet.keepalive * 1.5
        self._schedule_keepalive()
        server.connected(conn)
        held, self._held = self._held or [], None
        for queued in held:
            if self.closed:
                return
            self._handle(queued)
        if self.transport is not None and not self._reading_paused and not self.closed:
            self.transport.resume_reading()

    def _connack(
        self, code: int, present: bool = False, props: mc.Properties | None = None
    ) -> None:
        self.write(mc.encode_connack(self.version, code, present, props))

    def _certificate(self) -> bytes | None:
        if self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject):
            return None
        der = ssl_object.getpeercert(binary_form=True)
        return der or None
