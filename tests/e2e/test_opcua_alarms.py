"""OPC UA Alarms & Conditions: an asyncua client sees the platform's alarms as
AlarmConditionType events on the device and acknowledges them with `Acknowledge`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from tests.e2e.alarm_helpers import now_ms, rule_body, send, wait_for
from tests.e2e.api_helpers import api_platform
from tests.e2e.test_opcua_server import WAIT_S, device_node, make_client_cert, opcua_client, trust
from tests.support import free_port


class Events:
    """asyncua subscription handler collecting events."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def event_notification(self, event: Any) -> None:
        self.queue.put_nowait(event)

    async def next(self) -> dict[str, Any]:
        event = await asyncio.wait_for(self.queue.get(), WAIT_S)
        fields: dict[str, Any] = event.get_event_props_as_fields_dict()
        return {k: v.Value if isinstance(v, ua.Variant) else v for k, v in fields.items()}


async def test_alarm_events_and_acknowledge_through_opcua(tmp_path: Path) -> None:
    port = free_port()
    cert = make_client_cert(tmp_path / "client-pki")
    async with api_platform(tmp_path / "data", IIOT_OPCUA_PORT=str(port)) as api:
        trust(tmp_path / "data", cert)
        tenant = await api.tenant("acme")
        _, admin = await api.user("acme-admin", "tenant_admin", tenant["id"])
        await api.user("acme-viewer", "tenant_user", tenant["id"])
        globex = await api.tenant("globex")
        device = await api.device(admin, "boiler")
        await api.ok("POST", "/api/rules", 201, json=rule_body(device["id"]), headers=admin)
        async with opcua_client(port, cert, "acme-viewer", "password-123") as client:
            _, node = await device_node(client, "acme", "boiler")
            events = Events()
            subscription = await client.create_subscription(50, events)
            await subscription.subscribe_events(node, ua.ObjectIds.AlarmConditionType)
            await send(api, device["token"], now_ms(), t=93)
            raised = await events.next()
            assert raised["ConditionName"] == "High temperature"
            assert raised["Severity"] == 700 and raised["Retain"] is True
            assert raised["ActiveState/Id"] is True and raised["AckedState/Id"] is False
            assert raised["SourceNode"] == node.nodeid
            [alarm] = (await api.ok("GET", "/api/alarms", headers=admin))["items"]
            assert alarm["status"] == "ACTIVE_UNACK"

            condition = client.get_node(raised["NodeId"])
            await condition.call_method(
                ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                ua.Variant(raised["EventId"], ua.VariantType.ByteString),
                ua.LocalizedText("seen, going there"),
            )
            # At once: the method returns after the platform stored the acknowledgement.
            acked = await api.ok("GET", f"/api/alarms/{alarm['id']}", headers=admin)
            assert acked["status"] == "ACTIVE_ACK" and acked["ack_by"] == "acme-viewer"
            event = await events.next()
            assert event["AckedState/Id"] is True and event["ActiveState/Id"] is True
            # Twice is refused as the standard says; clearing in the platform is an event too.
            with pytest.raises(ua.UaStatusCodeError, match="BadConditionBranchAlreadyAcked"):
                await condition.call_method(
                    ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                    ua.Variant(raised["EventId"], ua.VariantType.ByteString),
                    ua.LocalizedText("again"),
                )
            await send(api, device["token"], now_ms(), t=20)
            cleared = await events.next()
            assert cleared["ActiveState/Id"] is False and cleared["Retain"] is False
            await wait_for(
                lambda: api.ok("GET", f"/api/alarms/{alarm['id']}", headers=admin),
                lambda a: a["status"] == "CLEARED_ACK",
            )
            await send(api, device["token"], now_ms() + 1, t=95)
            second = await events.next()
            assert second["ActiveState/Id"] is True and second["NodeId"] != raised["NodeId"]
        # Another tenant's user can neither subscribe to the device's events nor acknowledge.
        await api.user("globex-admin", "tenant_admin", globex["id"])
        async with opcua_client(port, cert, "globex-admin", "password-123") as client:
            other = client.get_node(node.nodeid)
            subscription = await client.create_subscription(50, Events())
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await subscription.subscribe_events(other, ua.ObjectIds.AlarmConditionType)
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await client.get_node(second["NodeId"]).call_method(
                    ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                    ua.Variant(second["EventId"], ua.VariantType.ByteString),
                    ua.LocalizedText("not mine"),
                )
        items = await api.ok("GET", "/api/alarms", params={"status": "ACTIVE"}, headers=admin)
        assert [a["status"] for a in items["items"]] == ["ACTIVE_UNACK"]
