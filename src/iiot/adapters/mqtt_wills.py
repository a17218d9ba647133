"""Will messages of the MQTT endpoint.

A device whose connection ends without a normal DISCONNECT has its will handled as if it had
published it (telemetry stored, attributes set, ...). MQTT 5 (section 3.1.3.2.2): the will
waits for its Will Delay Interval, or less when the session ends first (its Session Expiry
Interval; 0 ends it with the connection), and a new connection of the same device with the
same client id before then continues the session, so the will is dropped; one with Clean
Start ends the session, so the will is published at once. MQTT 3.1.1 has no delay.

Pending wills live in this process: a reconnection to another `--workers` process does not
cancel one, and when the endpoint stops they are published at once (kept, they would be
lost with the process).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING
from uuid import UUID

from iiot.adapters import mqtt_codec as mc
from iiot.adapters.mqtt_topics import TELEMETRY, route
from iiot.model import Device

if TYPE_CHECKING:
    from iiot.adapters.mqtt_connection import MqttConnection
    from iiot.adapters.mqtt_server import MqttServer

__all__ = ["Wills", "will_delay"]

PROTOCOL = "mqtt"


def will_delay(conn: MqttConnection, will: mc.Will) -> int:
    """Seconds from the end of the connection to the will: its delay, cut short by the end
    of the session."""
    if conn.version != mc.V5:
        return 0
    delay: int = will.properties.get(mc.WILL_DELAY_INTERVAL, 0)
    return min(delay, conn.session_expiry)


class _Pending:
    __slots__ = ("conn", "timer", "will")

    def __init__(self, conn: MqttConnection, will: mc.Will, timer: asyncio.TimerHandle) -> None:
        self.conn, self.will, self.timer = conn, will, timer


class Wills:
    """The wills of one endpoint: published now, or held until their delay has passed."""

    def __init__(self, server: MqttServer) -> None:
        self.server = server
        # (device id, client id) -> the will waiting for its delay, oldest first.
        self._pending: dict[tuple[UUID, str], _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def connection_ended(self, conn: MqttConnection) -> None:
        """The connection closed without a normal DISCONNECT: its will, now or later."""
        will, device = conn.will, conn.device
        if will is None or device is None:
            return
        conn.will = None
        delay = will_delay(conn, will)
        if delay <= 0:
            self.publish(conn, will)
            return
        key = (device.id, conn.client_id)
        earlier = self._pending.pop(key, None)
        if earlier is not None:  # not expected (a reconnection settles it); never lose one
            self._publish_pending(earlier)
        if len(self._pending) >= self.server.max_connections:
            # Bounded memory: the server may end a session early; its will goes out then.
            self._publish_pending(self._pending.pop(next(iter(self._pending))))
        timer = asyncio.get_running_loop().call_later(delay, self._due, key)
        self._pending[key] = _Pending(conn, will, timer)

    def reconnected(self, device: Device, client_id: str, clean_start: bool) -> None:
        """The device logged in again with this client id: a pending will is dropped (the
        session goes on) or, with Clean Start (the old session ends), published now."""
        pending = self._pending.pop((device.id, client_id), None)
        if pending is None:
            return
        pending.timer.cancel()
        if clean_start:
            self.publish(pending.conn, pending.will)

    def publish_all(self) -> None:
        """The endpoint stops: every pending will is published now."""
        pending, self._pending = list(self._pending.values()), {}
        for entry in pending:
            self._publish_pending(entry)

    def _due(self, key: tuple[UUID, str]) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            self.publish(pending.conn, pending.will)

    def _publish_pending(self, pending: _Pending) -> None:
        pending.timer.cancel()
        self.publish(pending.conn, pending.will)

    def publish(self, conn: MqttConnection, will: mc.Will) -> None:
        """The will of a device gone without DISCONNECT: as if it had published it."""
        server, device = self.server, conn.device
        assert device is not None
        found = route(str(device.id), device.is_gateway, will.topic)
        if found is None:
            server.forbidden(conn, "forbidden_topic", f"will topic {will.topic!r} refused")
            return
        if found.action == TELEMETRY:
            server.track(self._ingest(device, will.payload))
        else:
            server.track(server.actions.run(conn, found, will.payload))

    async def _ingest(self, device: Device, body: bytes) -> None:
        try:
            await self.server.services.ingestor.ingest(device, body, PROTOCOL)
        except Exception as exc:
            self.server.note("will", f"will message of device {device.id} not stored: {exc}")
