"""The control store (commands, transitions, attributes) on SQLite and PostgreSQL alike:
states never go backwards, one of two racing claims wins, tenants stay apart."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from iiot.errors import NotFound
from iiot.storage import Store, open_store
from iiot.storage.control import NewCommand


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'control.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    async with open_store(db_url) as opened:
        yield opened


def _new(tenant_id: uuid.UUID, device_id: uuid.UUID) -> NewCommand:
    return NewCommand(
        tenant_id=tenant_id,
        device_id=device_id,
        method="setValve",
        params={"open": True, "list": [1, "a", None]},
        oneway=False,
        persistent=True,
        timeout_ms=1000,
        expires_at=10_000_000,
        retries=1,
        sent_by=None,
    )


async def test_commands_move_forward_only_and_stay_in_their_tenant(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    other = await store.create_tenant("globex")
    device = await store.create_device(tenant.id, "valve", "hash-1")
    control = store.control
    command = await control.create_command(tenant.id, _new(tenant.id, device.id), 100)
    assert command.status == "QUEUED" and command.transitions == [("QUEUED", 100)]
    assert command.params == {"open": True, "list": [1, "a", None]}
    with pytest.raises(NotFound):
        await control.create_command(other.id, _new(other.id, device.id), 100)
    with pytest.raises(NotFound):
        await control.get_command(other.id, command.id)

    # Two processes race for the same QUEUED command: exactly one gets it.
    claims = await asyncio.gather(
        *(
            control.transition_command(None, command.id, "SENT", ("QUEUED",), 200, deadline=1200)
            for _ in range(5)
        )
    )
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1 and winners[0].deadline == 1200
    # Not from a state that is not allowed (never backwards).
    assert await control.transition_command(None, command.id, "QUEUED", ("DELIVERED",), 250) is None
    done = await control.transition_command(
        None, command.id, "SUCCESSFUL", ("SENT", "DELIVERED"), 300, response={"rpm": 900}
    )
    assert done is not None and done.response == {"rpm": 900}
    assert done.transitions == [("QUEUED", 100), ("SENT", 200), ("SUCCESSFUL", 300)]
    again = await control.transition_command(None, command.id, "CANCELED", ("QUEUED", "SENT"), 400)
    assert again is None
    stored = await control.get_command(tenant.id, command.id)
    assert stored.status == "SUCCESSFUL" and stored.transitions == done.transitions

    page = await control.list_commands(None, device.id, "SUCCESSFUL", 10, 0)
    assert page.total == 1 and page.items[0].id == command.id
    assert (await control.list_commands(None, device.id, "QUEUED", 10, 0)).total == 0
    with pytest.raises(NotFound):
        await control.list_commands(other.id, device.id, None, 10, 0)


async def test_queue_order_due_commands_and_attributes(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    other = await store.create_tenant("globex")
    device = await store.create_device(tenant.id, "valve", "hash-1")
    control = store.control
    first = await control.create_command(None, _new(tenant.id, device.id), 100)
    second = await control.create_command(None, _new(tenant.id, device.id), 101)
    queued = await control.queued_commands(None, device.id, 10)
    assert [c.id for c in queued] == [first.id, second.id]
    assert await control.queued_devices(None, 101, 10) == [device.id]
    assert await control.queued_devices(None, 99, 10) == []
    await control.transition_command(None, first.id, "SENT", ("QUEUED",), 150, deadline=500)
    due = await control.due_commands(None, 600, 10)
    assert [c.id for c in due] == [first.id]  # past its deadline; the other is not due
    assert [c.id for c in await control.stale_sent_commands(None, 10)] == [first.id]

    await control.set_attributes(tenant.id, device.id, "shared", {"a": 1, "b": {"x": [1]}}, 10)
    await control.set_attributes(tenant.id, device.id, "shared", {"a": 2}, 20)
    await control.set_attributes(tenant.id, device.id, "client", {"fw": "1.0"}, 30)
    found = await control.get_attributes(tenant.id, device.id, ("client", "shared", "server"), None)
    assert {k: (v.value, v.ts) for k, v in found["shared"].items()} == {
        "a": (2, 20),
        "b": ({"x": [1]}, 10),
    }
    assert found["client"]["fw"].value == "1.0" and found["server"] == {}
    only = await control.get_attributes(None, device.id, ("shared",), ["b"])
    assert list(only["shared"]) == ["b"]
    assert await control.delete_attributes(None, device.id, "shared", ["a", "zz"]) == ["a"]
    with pytest.raises(NotFound):
        await control.get_attributes(other.id, device.id, ("shared",), None)
    with pytest.raises(NotFound):
        await control.set_attributes(other.id, device.id, "shared", {"a": 1}, 40)

    # Deleting the device removes its commands and attributes with it.
    await store.delete_device(None, device.id)
    with pytest.raises(NotFound):
        await control.get_command(None, first.id)


async def test_claims_take_the_oldest_unexpired_command_once(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    device = await store.create_device(tenant.id, "valve", "hash-1")
    control = store.control
    expired = await control.create_command(
        None, replace(_new(tenant.id, device.id), expires_at=150), 90
    )
    first = await control.create_command(None, _new(tenant.id, device.id), 100)
    second = await control.create_command(None, _new(tenant.id, device.id), 101)

    # Five racing claims at 200, then more until none is left: the two unexpired commands
    # go once each, oldest first (a claim that lost a race may find nothing).
    raced = await asyncio.gather(
        *(control.claim_next_command(None, device.id, 200) for _ in range(5))
    )
    taken = [c for c in raced if c is not None]
    while (claimed := await control.claim_next_command(None, device.id, 200)) is not None:
        taken.append(claimed)
    taken.sort(key=lambda c: c.command.created_at)
    assert [c.command.id for c in taken] == [first.id, second.id]
    head = taken[0].command
    assert head.status == "SENT" and head.deadline == 200 + head.timeout_ms
    assert head.attempts == 1 and head.transitions == [("QUEUED", 100), ("SENT", 200)]
    assert await control.claim_next_command(None, device.id, 201) is None
    # `more` says whether another unexpired command waits (an expired one does not count;
    # a claim that raced may also say True when the other one was just taken).
    fourth = await control.create_command(None, _new(tenant.id, device.id), 210)
    fifth = await control.create_command(None, _new(tenant.id, device.id), 211)
    one = await control.claim_next_command(None, device.id, 220)
    two = await control.claim_next_command(None, device.id, 221)
    assert one is not None and one.command.id == fourth.id and one.more is True
    assert two is not None and two.command.id == fifth.id and two.more is False
    assert (await control.get_command(None, expired.id)).status == "QUEUED"  # the sweeper's
    # Another tenant's scope sees nothing to claim.
    other = await store.create_tenant("globex")
    third = await control.create_command(None, _new(tenant.id, device.id), 300)
    assert await control.claim_next_command(other.id, device.id, 301) is None
    # Sequential: not while another command of the device is in flight.
    assert await control.claim_next_command(None, device.id, 302, only_if_next=True) is None
    assert (await control.get_command(None, third.id)).status == "QUEUED"


async def test_an_answer_records_delivery_when_it_overtakes_the_receipt(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    device = await store.create_device(tenant.id, "valve", "hash-1")
    other_device = await store.create_device(tenant.id, "pump", "hash-2")
    control = store.control
    sent = await control.create_command(None, _new(tenant.id, device.id), 100)
    delivered = await control.create_command(None, _new(tenant.id, device.id), 101)
    oneway = await control.create_command(
        None, replace(_new(tenant.id, device.id), oneway=True), 102
    )
    for command in (sent, delivered, oneway):
        await control.transition_command(None, command.id, "SENT", ("QUEUED",), 200)
    await control.transition_command(None, delivered.id, "DELIVERED", ("SENT",), 250)

    # Not another device's command, and a one-way command has no answer.
    assert await control.answer_command(None, sent.id, other_device.id, {"x": 1}, 300) is None
    assert await control.answer_command(None, oneway.id, device.id, {"x": 1}, 300) is None

    answered = await control.answer_command(None, sent.id, device.id, {"rpm": 900}, 300)
    assert answered is not None and answered.delivered_now
    assert answered.command.status == "SUCCESSFUL" and answered.command.response == {"rpm": 900}
    history = [("QUEUED", 100), ("SENT", 200), ("DELIVERED", 300), ("SUCCESSFUL", 300)]
    assert answered.command.transitions == history
    assert (await control.get_command(None, sent.id)).transitions == history

    plain = await control.answer_command(tenant.id, delivered.id, device.id, None, 310)
    assert plain is not None and not plain.delivered_now and plain.command.response is None
    assert [s for s, _ in plain.command.transitions][-2:] == ["DELIVERED", "SUCCESSFUL"]
    # Answered once: a duplicate answer changes nothing.
    assert await control.answer_command(None, sent.id, device.id, {"rpm": 1}, 320) is None
    assert (await control.get_command(None, sent.id)).response == {"rpm": 900}


async def test_a_command_claimed_as_it_is_stored_waits_behind_older_queued_ones(
    store: Store,
) -> None:
    tenant = await store.create_tenant("acme")
    device = await store.create_device(tenant.id, "valve", "hash-1")
    control = store.control
    # Nothing ahead of it (an expired QUEUED command does not count): SENT at once, as a
    # claim would leave it, and stored so.
    expired = await control.create_command(
        None, replace(_new(tenant.id, device.id), expires_at=150), 90
    )
    direct = await control.create_command(tenant.id, _new(tenant.id, device.id), 200, claim=True)
    assert direct.status == "SENT" and direct.attempts == 1
    assert direct.deadline == 200 + direct.timeout_ms
    assert direct.transitions == [("QUEUED", 200), ("SENT", 200)]
    stored = await control.get_command(None, direct.id)
    assert (stored.status, stored.attempts, stored.deadline) == ("SENT", 1, direct.deadline)
    assert stored.transitions == direct.transitions
    assert await control.claim_next_command(None, device.id, 201) is None

    # An unexpired QUEUED command is ahead: the new one queues behind it (creation order).
    waiting = await control.create_command(None, _new(tenant.id, device.id), 300)
    behind = await control.create_command(None, _new(tenant.id, device.id), 301, claim=True)
    assert behind.status == "QUEUED" and behind.attempts == 0 and behind.deadline is None
    assert behind.transitions == [("QUEUED", 301)]
    queued = await control.queued_commands(None, device.id, 10)
    assert [c.id for c in queued] == [expired.id, waiting.id, behind.id]  # the sweeper's
    # Another device's queue does not hold this one back; another tenant cannot claim.
    pump = await store.create_device(tenant.id, "pump", "hash-2")
    assert (
        await control.create_command(None, _new(tenant.id, pump.id), 302, claim=True)
    ).status == "SENT"
    other = await store.create_tenant("globex")
    with pytest.raises(NotFound):
        await control.create_command(other.id, _new(other.id, pump.id), 303, claim=True)
