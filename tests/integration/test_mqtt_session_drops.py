"""The embedded endpoint's clean-session deletes: gathered into few statements when many
devices connect at once, yet in order with each client id's own reads and writes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from iiot.adapters.mqtt_sessions import SessionStore
from iiot.storage.base import Scope
from tests.integration.test_store_contract import db_url, store  # noqa: F401 (fixtures)


class _Counting:
    """The real store, counting the gathered deletes it is asked for."""

    def __init__(self, inner: Any) -> None:
        self._store = inner
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def delete_mqtt_sessions(self, sessions: Sequence[tuple[Scope, str]]) -> None:
        self.batches.append(len(sessions))
        await self._store.delete_mqtt_sessions(sessions)


class _Services:
    def __init__(self, inner: Any) -> None:
        self.store = inner


async def test_a_reconnect_storm_costs_few_deletes(store) -> None:  # noqa: F811
    tenant = await store.create_tenant("acme")
    devices = [await store.create_device(tenant.id, f"d{i}", f"hash-{i}") for i in range(300)]
    for i, device in enumerate(devices):
        await store.save_mqtt_session(None, f"c{i}", device.id, {"t": 1})
    counting = _Counting(store)
    sessions = SessionStore(_Services(counting))  # type: ignore[arg-type]
    for i, device in enumerate(devices):
        sessions.drop_soon(f"c{i}", device)
    assert sessions._dropper is not None
    await sessions._dropper
    assert counting.batches == [300]
    assert all([await store.get_mqtt_session(None, f"c{i}") is None for i in range(300)])


async def test_a_client_id_reads_and_writes_after_its_pending_delete(store) -> None:  # noqa: F811
    tenant = await store.create_tenant("acme")
    device = await store.create_device(tenant.id, "d1", "hash-1")
    sessions = SessionStore(_Services(store))  # type: ignore[arg-type]
    await store.save_mqtt_session(None, "c1", device.id, {"old/#": 1})

    # A clean connect, then at once a persistent one with the same client id: it must not
    # find the old session, and what it saves must outlive the earlier connect's delete.
    sessions.drop_soon("c1", device)
    assert await sessions.load("c1", device) is None
    await sessions.save("c1", device, {"new/#": 1})
    assert sessions._dropper is not None and sessions._dropper.done()
    assert await sessions.load("c1", device) == {"new/#": 1}

    # The same while the delete is being written (its statement under way).
    sessions.drop_soon("c1", device)
    await asyncio.sleep(0)  # the gathered delete starts
    await sessions.save("c1", device, {"newer/#": 0})
    assert await store.get_mqtt_session(None, "c1") == (device.id, {"newer/#": 0})
    # A device of another id under that client id finds nothing either.
    assert await sessions.load("c1", await store.create_device(tenant.id, "d2", "h2")) is None
