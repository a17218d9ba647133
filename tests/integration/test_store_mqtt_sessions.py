"""Persistent MQTT sessions in both stores: saved, replaced, scoped, gone with the device."""

from __future__ import annotations

from tests.integration.test_store_contract import db_url, store  # noqa: F401 (fixtures)


async def test_mqtt_sessions_are_saved_scoped_and_deleted(store) -> None:  # noqa: F811
    acme = await store.create_tenant("acme")
    other = await store.create_tenant("other")
    device = await store.create_device(acme.id, "d1", "hash-1")
    assert await store.get_mqtt_session(acme.id, "c1") is None
    await store.save_mqtt_session(acme.id, "c1", device.id, {"v1/devices/me/rpc/request/+": 1})
    assert await store.get_mqtt_session(acme.id, "c1") == (
        device.id,
        {"v1/devices/me/rpc/request/+": 1},
    )
    await store.save_mqtt_session(acme.id, "c1", device.id, {"v1/devices/me/attributes": 0})
    assert await store.get_mqtt_session(None, "c1") == (
        device.id,
        {"v1/devices/me/attributes": 0},
    )
    assert await store.get_mqtt_session(other.id, "c1") is None  # another tenant's: not there
    await store.delete_mqtt_session(other.id, "c1")  # another tenant cannot delete it
    assert await store.get_mqtt_session(acme.id, "c1") is not None
    await store.delete_mqtt_session(acme.id, "c1")
    assert await store.get_mqtt_session(acme.id, "c1") is None
    await store.save_mqtt_session(acme.id, "c2", device.id, {"a": 1})
    await store.delete_device(acme.id, device.id)
    assert await store.get_mqtt_session(acme.id, "c2") is None


async def test_many_sessions_are_deleted_at_once_each_in_its_scope(store) -> None:  # noqa: F811
    acme = await store.create_tenant("acme")
    other = await store.create_tenant("other")
    mine = await store.create_device(acme.id, "d1", "hash-1")
    theirs = await store.create_device(other.id, "d2", "hash-2")
    for client_id, device in (("a1", mine), ("a2", mine), ("a3", mine), ("o1", theirs)):
        await store.save_mqtt_session(None, client_id, device.id, {"t": 1})
    await store.delete_mqtt_sessions([])  # nothing to do
    # a1 in its tenant, a2 unscoped; a3 and o1 named with the wrong tenant stay.
    await store.delete_mqtt_sessions(
        [(acme.id, "a1"), (None, "a2"), (other.id, "a3"), (acme.id, "o1"), (acme.id, "none")]
    )
    remaining = {c for c in ("a1", "a2", "a3", "o1") if await store.get_mqtt_session(None, c)}
    assert remaining == {"a3", "o1"}
