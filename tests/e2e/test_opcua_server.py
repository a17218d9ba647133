"""OPC UA server end to end: asyncua's client against the running platform.

One platform (OPC UA + HTTP) serves the whole module; each test makes its own devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Client, Node, ua

from iiot.adapters.opcua_pki import write_self_signed
from tests.e2e.api_helpers import ADMIN_PASSWORD, Api, api_platform
from tests.support import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

NS_URI = "urn:iiot:platform"
CLIENT_URI = "urn:iiot:tests:opcua-client"
WAIT_S = 10.0  # upper bound of every wait (never reached when things work)


@dataclass
class ClientCert:
    """A client application certificate and key on disk."""

    cert: Path
    key: Path


def make_client_cert(folder: Path, name: str = "client") -> ClientCert:
    """A fresh self-signed client certificate (DER) with its key (PEM)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert = ClientCert(folder / f"{name}.der", folder / f"{name}.pem")
    write_self_signed(cert.cert, cert.key, f"tests {name}", CLIENT_URI, ["localhost"])
    return cert


def trust(data_dir: Path, cert: ClientCert) -> None:
    """Put a client certificate into the platform's trusted folder."""
    trusted = data_dir / "pki" / "trusted"
    trusted.mkdir(parents=True, exist_ok=True)
    (trusted / cert.cert.name).write_bytes(cert.cert.read_bytes())


@contextlib.asynccontextmanager
async def opcua_client(
    port: int,
    cert: ClientCert | None,
    username: str | None,
    password: str | None,
    mode: str = "SignAndEncrypt",
) -> AsyncIterator[Client]:
    """A connected asyncua client (Basic256Sha256 with the certificate, or no security)."""
    client = Client(f"opc.tcp://127.0.0.1:{port}/iiot/", timeout=WAIT_S)
    client.application_uri = CLIENT_URI
    if cert is not None:
        await client.set_security_string(f"Basic256Sha256,{mode},{cert.cert},{cert.key}")
    if username is not None:
        client.set_user(username)
        client.set_password(password or "")
    await asyncio.wait_for(client.connect(), WAIT_S)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):  # the server may already have dropped us
            await asyncio.wait_for(client.disconnect(), WAIT_S)


@dataclass
class World:
    """The running platform and what the tests share."""

    api: Api
    port: int
    data_dir: Path
    cert: ClientCert
    acme: dict[str, Any]
    globex: dict[str, Any]
    acme_admin: dict[str, str]  # REST headers

    def client(self, username: str = "admin", password: str = ADMIN_PASSWORD, **kw: Any) -> Any:
        """An OPC UA client of a user over Basic256Sha256 SignAndEncrypt."""
        return opcua_client(self.port, self.cert, username, password, **kw)

    async def device(self, tenant: dict[str, Any], prefix: str = "dev") -> dict[str, Any]:
        """A new device of a tenant (made by the sysadmin); the answer holds its token."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        return await self.api.device(self.api.admin, name, tenant_id=tenant["id"])

    async def send(self, device: dict[str, Any], payload: Any) -> None:
        """Telemetry over the device HTTP API."""
        await self.api.ok("POST", f"/api/v1/{device['token']}/telemetry", json=payload)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    data_dir = tmp_path_factory.mktemp("opcua")
    port = free_port()
    cert = make_client_cert(tmp_path_factory.mktemp("client-pki"))
    async with api_platform(data_dir, IIOT_OPCUA_PORT=str(port)) as api:
        trust(data_dir, cert)
        acme = await api.tenant("acme")
        globex = await api.tenant("globex")
        _, acme_admin = await api.user("acme-admin", "tenant_admin", acme["id"])
        await api.user("acme-viewer", "tenant_user", acme["id"])
        await api.user("globex-admin", "tenant_admin", globex["id"])
        yield World(api, port, data_dir, cert, acme, globex, acme_admin)


async def device_node(client: Client, tenant: str, device: str) -> tuple[int, Node]:
    """The namespace index and the object of a device, found by browse path."""
    ns = await client.get_namespace_index(NS_URI)
    node = await client.nodes.objects.get_child(
        [f"{ns}:Tenants", f"{ns}:{tenant}", f"{ns}:{device}"]
    )
    return ns, node


async def eventually(check: Any, within_s: float = WAIT_S) -> Any:
    """Retry an async check until it returns a truthy value (bounded)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# --- browse, read, types -------------------------------------------------------------------
async def test_browse_and_read_latest_values_with_types_and_source_timestamps(world: World) -> None:
    device = await world.device(world.acme)
    ts = 1767225600000
    await world.send(
        device,
        {"ts": ts, "values": {"temperature": 21.5, "count": 7, "running": True, "mode": "auto"}},
    )
    async with world.client() as client:
        ns, node = await device_node(client, "acme", device["name"])
        names = {(await child.read_browse_name()).Name for child in await node.get_children()}
        assert names == {
            "Status",
            "SetStatus",
            "SendCommand",
            "temperature",
            "count",
            "running",
            "mode",
        }
        expected = {
            "temperature": (21.5, ua.VariantType.Double),
            "count": (7.0, ua.VariantType.Double),
            "running": (True, ua.VariantType.Boolean),
            "mode": ("auto", ua.VariantType.String),
        }
        for key, (value, vtype) in expected.items():
            dv = await (await node.get_child(f"{ns}:{key}")).read_data_value()
            assert dv.Value.Value == value and dv.Value.VariantType == vtype
            assert dv.SourceTimestamp == datetime.datetime.fromtimestamp(ts / 1000, datetime.UTC)
        status = await (await node.get_child(f"{ns}:Status")).read_value()
        assert status == "active"


async def test_new_keys_renames_and_deletes_follow_the_platform(world: World) -> None:
    device = await world.device(world.acme)
    async with world.client() as client:
        ns, node = await device_node(client, "acme", device["name"])
        await world.send(device, {"pressure": 1.5})
        var = await eventually(lambda: _child(node, f"{ns}:pressure"))
        assert await var.read_value() == 1.5

        new_name = device["name"] + "-renamed"
        await world.api.ok(
            "PATCH",
            f"/api/devices/{device['id']}",
            json={"name": new_name},
            headers=world.acme_admin,
        )
        assert (await node.read_browse_name()).Name == new_name
        assert (await node.read_display_name()).Text == new_name
        _, renamed = await device_node(client, "acme", new_name)
        assert renamed.nodeid == node.nodeid

        await world.api.ok("DELETE", f"/api/devices/{device['id']}", 204, headers=world.acme_admin)
        tenant = await client.nodes.objects.get_child([f"{ns}:Tenants", f"{ns}:acme"])
        children = [(await c.read_browse_name()).Name for c in await tenant.get_children()]
        assert new_name not in children
        with pytest.raises(ua.UaStatusCodeError):
            await var.read_value()


async def _child(node: Node, path: str) -> Node | None:
    try:
        return await node.get_child(path)
    except ua.UaStatusCodeError:
        return None


# --- subscriptions -------------------------------------------------------------------------
class _Collector:
    def __init__(self) -> None:
        self.values: asyncio.Queue[tuple[Any, ua.DataValue]] = asyncio.Queue()

    def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
        self.values.put_nowait((val, data.monitored_item.Value))


async def test_subscription_receives_values_sent_over_http(world: World) -> None:
    device = await world.device(world.acme)
    await world.send(device, {"ts": 1767225601000, "values": {"speed": 1.0}})
    async with world.client() as client:
        ns, node = await device_node(client, "acme", device["name"])
        speed = await node.get_child(f"{ns}:speed")
        collector = _Collector()
        subscription = await client.create_subscription(50, collector)
        await subscription.subscribe_data_change(speed)
        first, _ = await asyncio.wait_for(collector.values.get(), WAIT_S)  # the current value
        assert first == 1.0
        await world.send(device, {"ts": 1767225602000, "values": {"speed": 42.5}})
        value, dv = await asyncio.wait_for(collector.values.get(), WAIT_S)
        assert value == 42.5
        assert dv.SourceTimestamp == datetime.datetime.fromtimestamp(1767225602, datetime.UTC)
        # A late, older point is stored but does not replace the latest value.
        await world.send(device, {"ts": 1767225601500, "values": {"speed": 0.0}})
        await world.send(device, {"ts": 1767225603000, "values": {"speed": 7.0}})
        value, _ = await asyncio.wait_for(collector.values.get(), WAIT_S)
        assert value == 7.0
        await subscription.delete()


async def test_a_burst_is_coalesced_to_the_newest_value_for_readers_and_subscribers(
    world: World,
) -> None:
    device = await world.device(world.acme)
    T0 = 1_767_225_600_000
    await world.send(device, {"ts": T0 + 1000, "values": {"level": 0.0, "mode": "idle"}})
    async with world.client() as client:
        ns, node = await device_node(client, "acme", device["name"])
        level = await eventually(lambda: _child(node, f"{ns}:level"))
        collector = _Collector()
        subscription = await client.create_subscription(50, collector)
        await subscription.subscribe_data_change(level)
        first, _ = await asyncio.wait_for(collector.values.get(), WAIT_S)
        assert first == 0.0
        # 200 values in one request, then 20 more requests: the newest one is what counts.
        burst = [{"ts": T0 + 2000 + i, "values": {"level": float(i)}} for i in range(200)]
        await world.send(device, burst)
        for i in range(200, 220):
            await world.send(device, {"ts": T0 + 2000 + i, "values": {"level": float(i)}})
        # A read sees the newest committed value at once (it is served on read).
        dv = await level.read_data_value()
        assert dv.Value.Value == 219.0
        assert dv.SourceTimestamp == datetime.datetime.fromtimestamp(
            (T0 + 2219) / 1000, datetime.UTC
        )
        # The subscription ends on the newest value (intermediate ones may be coalesced).
        seen: list[float] = []
        while not seen or seen[-1] != 219.0:
            value, _ = await asyncio.wait_for(collector.values.get(), WAIT_S)
            seen.append(value)
        assert seen == sorted(seen) and len(seen) < 220
        # A key that changes type keeps working: the new type is read and notified.
        await world.send(device, {"ts": T0 + 3000, "values": {"level": "full"}})
        value, _ = await asyncio.wait_for(collector.values.get(), WAIT_S)
        assert value == "full"
        assert (await level.read_data_value()).Value.VariantType == ua.VariantType.String
        assert await (await node.get_child(f"{ns}:mode")).read_value() == "idle"
        await subscription.delete()


# --- SetStatus -----------------------------------------------------------------------------
async def test_set_status_changes_the_device_in_the_platform(world: World) -> None:
    device = await world.device(world.acme)
    async with world.client("acme-admin", "password-123") as client:
        ns, node = await device_node(client, "acme", device["name"])
        method = await node.get_child(f"{ns}:SetStatus")
        assert (
            await node.call_method(method, ua.Variant("maintenance", ua.VariantType.String)) is None
        )
        answer = await world.api.ok("GET", f"/api/devices/{device['id']}", headers=world.acme_admin)
        assert answer["status"] == "maintenance"
        status = await node.get_child(f"{ns}:Status")
        await eventually(lambda: _has_value(status, "maintenance"))

        for bad in ("", "   ", "x" * 65, 5, True, "bad\x00status"):
            with pytest.raises(ua.uaerrors.BadInvalidArgument):
                await node.call_method(method, bad)
        with pytest.raises(ua.UaStatusCodeError):
            await node.call_method(method)  # no argument
        answer = await world.api.ok("GET", f"/api/devices/{device['id']}", headers=world.acme_admin)
        assert answer["status"] == "maintenance"


async def _has_value(node: Node, value: Any) -> bool:
    return bool(await node.read_value() == value)


async def test_read_only_tenant_user_can_read_but_not_set_status(world: World) -> None:
    device = await world.device(world.acme)
    await world.send(device, {"level": 3.0})
    async with world.client("acme-viewer", "password-123") as client:
        ns, node = await device_node(client, "acme", device["name"])
        assert await (await node.get_child(f"{ns}:level")).read_value() == 3.0
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await node.call_method(await node.get_child(f"{ns}:SetStatus"), "maintenance")
        with pytest.raises(ua.UaStatusCodeError):  # telemetry variables are read-only
            await (await node.get_child(f"{ns}:level")).write_value(1.0)
    answer = await world.api.ok("GET", f"/api/devices/{device['id']}", headers=world.acme_admin)
    assert answer["status"] == "active"


# --- history -------------------------------------------------------------------------------
async def test_history_read_10000_points_page_by_page(world: World) -> None:
    device = await world.device(world.acme)
    base = 1_700_000_000_000
    for chunk in range(0, 10_000, 2500):  # 256 KiB per message
        await world.send(
            device,
            [
                {"ts": base + i * 1000, "values": {"flow": float(i)}}
                for i in range(chunk, chunk + 2500)
            ],
        )
    async with world.client() as client:
        ns, node = await device_node(client, "acme", device["name"])
        flow = await node.get_child(f"{ns}:flow")
        start = datetime.datetime.fromtimestamp(base / 1000, datetime.UTC)
        end = start + datetime.timedelta(seconds=10_000)

        details = ua.ReadRawModifiedDetails(
            IsReadModified=False,
            StartTime=start,
            EndTime=end,
            NumValuesPerNode=1000,
            ReturnBounds=False,
        )
        values: list[ua.DataValue] = []
        continuation = None
        pages = 0
        while True:
            result = await flow.history_read(details, continuation)
            result.StatusCode.check()
            values.extend(result.HistoryData.DataValues)
            pages += 1
            continuation = result.ContinuationPoint
            if continuation is None:
                break
            assert pages < 20, "paging does not end"
        assert pages == 10
        assert [v.Value.Value for v in values] == [float(i) for i in range(10_000)]
        assert values[0].SourceTimestamp == start
        assert values[-1].SourceTimestamp == end - datetime.timedelta(seconds=1)

        # asyncua's helper follows the server's own continuation points to the end.
        everything = await flow.read_raw_history(start, end)
        assert len(everything) == 10_000
        # A sub-range with a limit, and a backward read (start after end).
        middle = await flow.read_raw_history(start + datetime.timedelta(seconds=100), end, 5)
        assert [v.Value.Value for v in middle] == [100.0, 101.0, 102.0, 103.0, 104.0]
        backward = await flow.read_raw_history(end, start, 3)
        assert [v.Value.Value for v in backward] == [9999.0, 9998.0, 9997.0]


# --- tenants -------------------------------------------------------------------------------
async def test_another_tenants_nodes_are_hidden_and_refused(world: World) -> None:
    device = await world.device(world.acme)
    await world.device(world.globex)  # a tenant's folder appears with its first device
    await world.send(device, {"ts": 1767225605000, "values": {"secret": 1.0}})
    async with world.client() as admin:
        ns, node = await device_node(admin, "acme", device["name"])
        secret_id = (await node.get_child(f"{ns}:secret")).nodeid
        method_id = (await node.get_child(f"{ns}:SetStatus")).nodeid
        acme_id = (await node.get_parent()).nodeid
    async with world.client("globex-admin", "password-123") as client:
        tenants = await client.nodes.objects.get_child([f"{ns}:Tenants"])
        visible = [(await c.read_browse_name()).Name for c in await tenants.get_children()]
        assert visible == ["globex"]
        with pytest.raises(ua.UaStatusCodeError):
            await client.nodes.objects.get_child([f"{ns}:Tenants", f"{ns}:acme"])

        secret = client.get_node(secret_id)
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await secret.read_value()
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await secret.write_value(2.0)
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await secret.read_raw_history()
        assert await client.get_node(acme_id).get_children() == []
        browse = ua.BrowseParameters(NodesToBrowse=[ua.BrowseDescription(NodeId=acme_id)])
        [result] = await client.uaclient.browse(browse)
        assert result.StatusCode.value == ua.StatusCodes.BadUserAccessDenied
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await client.get_node(device_id_of(secret_id, ns)).call_method(method_id, "disabled")
        subscription = await client.create_subscription(50, _Collector())
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await subscription.subscribe_data_change(secret)
    answer = await world.api.ok("GET", f"/api/devices/{device['id']}", headers=world.acme_admin)
    assert answer["status"] == "active"


def device_id_of(variable: ua.NodeId, ns: int) -> ua.NodeId:
    """The device object's node id of one of its telemetry variables."""
    return ua.NodeId(variable.Identifier.split(":telemetry:")[0], ns)


async def test_a_tenant_created_later_appears_is_renamed_and_deleted(world: World) -> None:
    tenant = await world.api.tenant(f"late-{uuid.uuid4().hex[:6]}")
    device = await world.device(tenant)
    await world.send(device, {"x": 1.0})
    async with world.client() as client:
        ns, node = await device_node(client, tenant["name"], device["name"])
        assert await (await node.get_child(f"{ns}:x")).read_value() == 1.0
        folder = await client.nodes.objects.get_child([f"{ns}:Tenants", f"{ns}:{tenant['name']}"])

        admin = world.api.admin
        renamed = tenant["name"] + "-north"
        url = f"/api/tenants/{tenant['id']}"
        await world.api.ok("PATCH", url, json={"name": renamed}, headers=admin)

        async def folder_name() -> bool:
            return (await folder.read_browse_name()).Name == renamed

        await eventually(folder_name)
        assert (await folder.read_display_name()).Text == renamed
        _, found = await device_node(client, renamed, device["name"])
        assert found.nodeid == node.nodeid

        await world.api.ok("DELETE", url, 204, headers=admin)
        tenants = await client.nodes.objects.get_child(f"{ns}:Tenants")

        async def folder_gone() -> bool:
            names = [(await c.read_browse_name()).Name for c in await tenants.get_children()]
            return renamed not in names and "acme" in names

        await eventually(folder_gone)
        with pytest.raises(ua.UaStatusCodeError):
            await folder.read_browse_name()
        with pytest.raises(ua.UaStatusCodeError):
            await node.read_browse_name()


# --- login ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("username", "password"),
    [("admin", "wrong-password"), ("acme-admin", ADMIN_PASSWORD), ("nobody", "password-123")],
)
async def test_wrong_password_or_unknown_user_is_refused(
    world: World, username: str, password: str
) -> None:
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        async with world.client(username, password):
            pass


async def test_sign_only_mode_works_too(world: World) -> None:
    async with world.client("acme-admin", "password-123", mode="Sign") as client:
        ns = await client.get_namespace_index(NS_URI)
        assert ns > 0
