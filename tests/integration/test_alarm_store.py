"""The alarm store on SQLite and PostgreSQL: one open alarm per (device, type), decided by
the database; escalation, acknowledgement, clearing, tenant scope, rules and the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from iiot.alarms.model import AlarmFilter, AlarmStatus, Severity
from iiot.errors import Conflict, NotFound
from iiot.model import Device
from iiot.storage import Store, open_store
from iiot.storage.alarm_base import AlarmStore, alarm_store_for


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test runs on both stores."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'iiot.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def stores(db_url: str) -> AsyncIterator[tuple[Store, AlarmStore]]:
    async with open_store(db_url) as store:
        yield store, alarm_store_for(store)


async def device(store: Store, name: str = "boiler") -> Device:
    tenant = await store.create_tenant(f"t-{uuid.uuid4().hex[:8]}")
    return await store.create_device(tenant.id, name, uuid.uuid4().hex)


async def test_repeated_raises_update_one_alarm_and_escalate_in_place(
    stores: tuple[Store, AlarmStore],
) -> None:
    store, alarms = stores
    dev = await device(store)
    first, kind = await alarms.raise_alarm(
        dev.tenant_id, dev.id, "HighTemp", Severity.WARNING, 1000, 81, None, {"k": "t"}
    )
    assert kind == "raised"
    assert (first.status, first.start_ts, first.end_ts, first.value) == (
        AlarmStatus.ACTIVE_UNACK,
        1000,
        1000,
        81,
    )
    again, kind = await alarms.raise_alarm(
        dev.tenant_id, dev.id, "HighTemp", Severity.WARNING, 2000, 85, None, {}
    )
    assert kind is None and again.id == first.id and again.end_ts == 2000
    worse, kind = await alarms.raise_alarm(
        dev.tenant_id, dev.id, "HighTemp", Severity.CRITICAL, 3000, 99, None, {}
    )
    assert kind == "updated" and worse.id == first.id
    assert (worse.severity, worse.value, worse.start_ts, worse.end_ts) == (
        Severity.CRITICAL,
        99,
        1000,
        3000,
    )
    # A lower severity never downgrades the open alarm.
    lower, kind = await alarms.raise_alarm(
        dev.tenant_id, dev.id, "HighTemp", Severity.MINOR, 4000, 82, None, {}
    )
    assert kind is None and lower.severity is Severity.CRITICAL
    # Another type is another alarm.
    other, kind = await alarms.raise_alarm(
        dev.tenant_id, dev.id, "Vibration", Severity.MINOR, 4000, 1, None, {}
    )
    assert kind == "raised" and other.id != first.id
    page = await alarms.list_alarms(dev.tenant_id, AlarmFilter(device_id=dev.id), 10, 0)
    assert page.total == 2
    assert await alarms.alarm_summary(dev.tenant_id, None) == {"CRITICAL": 1, "MINOR": 1}


async def test_ack_clear_and_a_new_alarm_after_clearing(stores: tuple[Store, AlarmStore]) -> None:
    store, alarms = stores
    dev = await device(store)
    alarm, _ = await alarms.raise_alarm(
        dev.tenant_id, dev.id, "HighTemp", Severity.MAJOR, 1000, 90, None, {}
    )
    acked, kind = await alarms.ack_alarm(dev.tenant_id, alarm.id, "operator", 1500)
    assert kind == "acked" and acked.status is AlarmStatus.ACTIVE_ACK
    assert (acked.ack_ts, acked.ack_by) == (1500, "operator")
    assert (await alarms.ack_alarm(dev.tenant_id, alarm.id, "x", 1600))[1] is None
    cleared = await alarms.clear_open_alarm(dev.id, "HighTemp", 2000)
    assert cleared is not None and cleared.status is AlarmStatus.CLEARED_ACK
    assert cleared.clear_ts == 2000
    assert await alarms.clear_open_alarm(dev.id, "HighTemp", 2100) is None
    fresh, kind = await alarms.raise_alarm(
        dev.tenant_id, dev.id, "HighTemp", Severity.MAJOR, 3000, 91, None, {}
    )
    assert kind == "raised" and fresh.id != alarm.id
    done, kind = await alarms.clear_alarm(dev.tenant_id, fresh.id, 3500)
    assert kind == "cleared" and done.status is AlarmStatus.CLEARED_UNACK
    newest_first = await alarms.list_alarms(dev.tenant_id, AlarmFilter(), 10, 0)
    assert [a.id for a in newest_first.items] == [fresh.id, alarm.id]
    only_acked = AlarmFilter(statuses=(AlarmStatus.CLEARED_ACK,))
    assert [a.id for a in (await alarms.list_alarms(None, only_acked, 10, 0)).items] == [alarm.id]
    assert await alarms.alarm_summary(dev.tenant_id, dev.id) == {}


async def test_other_tenants_alarms_rules_and_webhooks_are_not_found(
    stores: tuple[Store, AlarmStore],
) -> None:
    store, alarms = stores
    dev = await device(store)
    other = await store.create_tenant("other")
    alarm, _ = await alarms.raise_alarm(
        dev.tenant_id, dev.id, "HighTemp", Severity.MAJOR, 1000, 90, None, {}
    )
    spec = {"name": "r", "target": {"device_id": str(dev.id)}}
    rule = await alarms.create_rule(dev.tenant_id, spec)
    hook = await alarms.create_webhook(
        dev.tenant_id, "http://127.0.0.1:9/x", "s", ("alarm.raised",)
    )
    for call in (
        alarms.get_alarm(other.id, alarm.id),
        alarms.ack_alarm(other.id, alarm.id, "x", 1),
        alarms.clear_alarm(other.id, alarm.id, 1),
        alarms.get_rule(other.id, rule.id),
        alarms.delete_rule(other.id, rule.id),
        alarms.get_webhook(other.id, hook.id),
        alarms.list_deliveries(other.id, hook.id, 10, 0),
        alarms.delete_webhook(other.id, hook.id),
    ):
        with pytest.raises(NotFound):
            await call
    assert (await alarms.list_alarms(other.id, AlarmFilter(), 10, 0)).total == 0
    with pytest.raises(Conflict):
        await alarms.create_rule(dev.tenant_id, spec)
    assert (await alarms.get_alarm(None, alarm.id)).id == alarm.id


async def test_outbox_rows_are_written_with_the_change(stores: tuple[Store, AlarmStore]) -> None:
    store, alarms = stores
    dev = await device(store)
    hook = await alarms.create_webhook(
        dev.tenant_id, "http://127.0.0.1:9/x", "s", ("alarm.raised", "alarm.cleared")
    )
    alarm, _ = await alarms.raise_alarm(
        dev.tenant_id, dev.id, "HighTemp", Severity.MAJOR, 1000, 90, None, {}
    )
    await alarms.ack_alarm(dev.tenant_id, alarm.id, "op", 1100)  # not subscribed
    await alarms.clear_open_alarm(dev.id, "HighTemp", 1200)
    items = await alarms.claim_outbox(2**62, 10, 60_000)
    assert [(i.event, i.webhook_id) for i in items] == [
        ("alarm.raised", hook.id),
        ("alarm.cleared", hook.id),
    ]
    assert await alarms.claim_outbox(2**62 - 1, 10, 60_000) == []  # leased
    await alarms.finish_attempt(items[0], 5, 200, None, 3, None, "delivered")
    await alarms.finish_attempt(items[1], 5, 500, "HTTP 500", 3, 10, "retrying")
    log = await alarms.list_deliveries(dev.tenant_id, hook.id, 10, 0)
    assert [(d.event, d.status_code, d.outcome) for d in log.items] == [
        ("alarm.cleared", 500, "retrying"),
        ("alarm.raised", 200, "delivered"),
    ]
    assert await alarms.next_outbox_due() == 10
    [again] = await alarms.claim_outbox(10, 10, 60_000)
    assert again.event == "alarm.cleared" and again.attempts == 1
    # The same event id is queued once, however many processes saw it.
    assert await alarms.enqueue_event(dev.tenant_id, "alarm.raised", "e1", b"{}") == 1
    assert await alarms.enqueue_event(dev.tenant_id, "alarm.raised", "e1", b"{}") == 0


async def test_rule_state_persists_and_goes_with_its_rule(stores: tuple[Store, AlarmStore]) -> None:
    store, alarms = stores
    dev = await device(store)
    rule = await alarms.create_rule(
        dev.tenant_id, {"name": "r", "target": {"device_id": str(dev.id)}}
    )
    await alarms.save_rule_state(rule.id, dev.id, {"active": False, "pending_since": 5})
    assert await alarms.rule_states() == {(rule.id, dev.id): {"active": False, "pending_since": 5}}
    await alarms.replace_rule(
        dev.tenant_id, rule.id, {"name": "r2", "target": {"device_type": "x"}}
    )
    assert await alarms.rule_states() == {}
    await alarms.save_rule_state(rule.id, dev.id, {"active": True})
    await alarms.delete_rule(dev.tenant_id, rule.id)
    assert await alarms.rule_states() == {}
    await alarms.save_rule_state(rule.id, dev.id, {"active": True})  # rule gone: ignored
    assert await alarms.rule_states() == {}


async def concurrent_raises(db_url: str, count: int) -> int:
    """`count` raises of one (device, type) from separate connections; returns open alarms."""
    async with open_store(db_url) as store:
        dev = await device(store)
    stores = [open_store(db_url) for _ in range(8)]
    async with contextlib.AsyncExitStack() as stack:
        opened = [await stack.enter_async_context(s) for s in stores]
        alarm_stores = [alarm_store_for(s) for s in opened]
        start = asyncio.Event()

        async def one(n: int) -> None:
            await start.wait()
            await alarm_stores[n % len(alarm_stores)].raise_alarm(
                dev.tenant_id, dev.id, "HighTemp", Severity.MAJOR, 1000 + n, n, None, {}
            )

        tasks = [asyncio.create_task(one(n)) for n in range(count)]
        await asyncio.sleep(0.1)
        start.set()
        await asyncio.gather(*tasks)
        page = await alarm_stores[0].list_alarms(
            dev.tenant_id, AlarmFilter(statuses=(AlarmStatus.ACTIVE_UNACK,)), 1000, 0
        )
        return page.total


async def test_fifty_concurrent_raises_leave_one_open_alarm(db_url: str) -> None:
    assert await concurrent_raises(db_url, 50) == 1


@pytest.mark.postgres
async def test_without_the_unique_index_concurrent_raises_duplicate(pg_url: str) -> None:
    """The same race with the constraint removed: the code alone does not prevent duplicates."""
    async with open_store(pg_url):
        pass  # migrated
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("DROP INDEX alarms_one_open")
    finally:
        await conn.close()
    assert await concurrent_raises(pg_url, 50) > 1
