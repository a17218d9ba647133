"""Store contract for device types, gateways, presence, certificates and list filters."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iiot.errors import Conflict, NotFound
from iiot.security import hash_token, new_device_token
from iiot.storage import open_store
from iiot.storage.base import DeviceFilter, Store

T0 = 1_767_225_600_000


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'iiot.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    async with open_store(db_url) as opened:
        yield opened


async def test_type_and_gateway_are_stored_and_children_found_by_name(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    gateway = await store.create_device(
        tenant.id, "gw-1", hash_token(new_device_token()), type="gateway"
    )
    child = await store.create_device(
        tenant.id, "Modbus PLC 3", hash_token(new_device_token()), gateway_id=gateway.id
    )
    assert gateway.is_gateway and gateway.gateway_id is None
    assert (await store.get_device(None, child.id)).gateway_id == gateway.id
    assert await store.find_device_by_name(tenant.id, "Modbus PLC 3") == child
    assert await store.find_device_by_name(tenant.id, "nope") is None
    other = await store.create_tenant("other")
    assert await store.find_device_by_name(other.id, "Modbus PLC 3") is None
    changed = await store.update_device(tenant.id, child.id, type="plc")
    assert changed.type == "plc" and changed.name == "Modbus PLC 3"
    # Deleting the gateway leaves its children, no longer linked.
    await store.delete_device(None, gateway.id)
    assert (await store.get_device(None, child.id)).gateway_id is None


async def test_presence_is_batched_and_never_moves_back(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    a = await store.create_device(tenant.id, "a", hash_token(new_device_token()))
    b = await store.create_device(tenant.id, "b", hash_token(new_device_token()))
    assert a.last_seen is None and not a.connected
    await store.record_presence({a.id: T0 + 5, b.id: T0}, {a.id: True})
    await store.record_presence({a.id: T0 + 1}, {})  # an older report arrives late
    await store.record_presence({uuid.uuid4(): T0}, {uuid.uuid4(): True})  # deleted: ignored
    a2, b2 = await store.get_device(None, a.id), await store.get_device(None, b.id)
    assert (a2.last_seen, a2.connected) == (T0 + 5, True)
    assert (b2.last_seen, b2.connected) == (T0, False)
    await store.record_presence({}, {a.id: False})
    assert not (await store.get_device(None, a.id)).connected


async def test_list_filters(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    other = await store.create_tenant("other")
    names = ["Press_1", "press-2", "pump 100%", "gateway"]
    made = {}
    for name in names:
        kind = "gateway" if name == "gateway" else "default"
        made[name] = await store.create_device(
            tenant.id, name, hash_token(new_device_token()), type=kind
        )
    await store.create_device(other.id, "press-9", hash_token(new_device_token()))
    await store.update_device(None, made["press-2"].id, status="maintenance")
    await store.record_presence(
        {made["Press_1"].id: T0, made["press-2"].id: T0 - 700_000}, {made["Press_1"].id: True}
    )

    async def names_of(filters: DeviceFilter, scope: uuid.UUID | None = tenant.id) -> list[str]:
        page = await store.list_devices(scope, 100, 0, filters)
        assert page.total == len(page.items)
        return [d.name for d in page.items]

    assert await names_of(DeviceFilter(search="PRESS")) == ["Press_1", "press-2"]
    assert await names_of(DeviceFilter(search="PRESS"), None) == ["Press_1", "press-2", "press-9"]
    assert await names_of(DeviceFilter(search="s_")) == ["Press_1"]  # `_` is not a wildcard
    assert await names_of(DeviceFilter(search="100%")) == ["pump 100%"]
    assert await names_of(DeviceFilter(type="gateway")) == ["gateway"]
    assert await names_of(DeviceFilter(status="maintenance")) == ["press-2"]
    assert await names_of(DeviceFilter(connected=True)) == ["Press_1"]
    assert await names_of(DeviceFilter(seen_since=T0 - 600_000)) == ["Press_1"]
    assert await names_of(DeviceFilter(not_seen_since=T0 - 600_000)) == [
        "gateway",
        "press-2",
        "pump 100%",
    ]
    page = await store.list_devices(tenant.id, 1, 1, DeviceFilter(search="press"))
    assert page.total == 2 and [d.name for d in page.items] == ["press-2"]


async def test_client_certificates(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    other = await store.create_tenant("other")
    a = await store.create_device(tenant.id, "a", hash_token(new_device_token()))
    b = await store.create_device(tenant.id, "b", hash_token(new_device_token()))
    fingerprint = "ab" * 32
    with pytest.raises(NotFound):
        await store.set_device_certificate(other.id, a.id, fingerprint)
    await store.set_device_certificate(tenant.id, a.id, fingerprint)
    assert await store.find_device_by_certificate(fingerprint) == await store.get_device(None, a.id)
    with pytest.raises(Conflict):
        await store.set_device_certificate(None, b.id, fingerprint)
    await store.set_device_certificate(None, a.id, None)
    assert await store.find_device_by_certificate(fingerprint) is None


async def test_gateway_children_are_created_once_and_only_for_gateways(store: Store) -> None:
    import asyncio

    from iiot.bus import DeviceEvent, LiveBus
    from iiot.device_identity import DeviceIdentity
    from iiot.errors import PermissionDenied

    bus = LiveBus()
    events = bus.subscribe()
    identity = DeviceIdentity(store, bus)
    tenant = await store.create_tenant("acme")
    gateway = await store.create_device(
        tenant.id, "gw", hash_token(new_device_token()), type="gateway"
    )
    plain = await store.create_device(tenant.id, "plain", hash_token(new_device_token()))
    children = await asyncio.gather(*(identity.child(gateway, "Modbus 1") for _ in range(10)))
    assert len({c.id for c in children}) == 1
    child = children[0]
    assert (child.gateway_id, child.tenant_id) == (gateway.id, tenant.id)
    assert events.qsize() == 1 and isinstance(events.get_nowait(), DeviceEvent)
    # Another process (a fresh identity) finds the same child.
    assert await DeviceIdentity(store, bus).child(gateway, "Modbus 1") == child
    with pytest.raises(PermissionDenied):
        await identity.child(plain, "Modbus 2")  # not a gateway
    with pytest.raises(PermissionDenied):
        await identity.child(gateway, "plain")  # a device that is not its child
