"""One command in flight per device (`IIOT_COMMANDS_SEQUENTIAL`), as the control store
enforces it on SQLite and PostgreSQL: a claim `only_if_next` is refused while another
command of the device is in flight or an older one is queued, and of such claims racing
from two stores (two processes) on different commands of one device exactly one wins."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iiot.storage import Store, open_store
from iiot.storage.control import NewCommand

T0 = 1_767_225_600_000


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'control.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    async with open_store(db_url) as opened:
        yield opened


def _new(tenant_id: uuid.UUID, device_id: uuid.UUID, *, oneway: bool = False) -> NewCommand:
    return NewCommand(
        tenant_id=tenant_id,
        device_id=device_id,
        method="setValve",
        params={},
        oneway=oneway,
        persistent=True,
        timeout_ms=1000,
        expires_at=T0 + 86_400_000,
        retries=1,
        sent_by=None,
    )


async def test_a_claim_waits_for_every_in_flight_state_and_older_queued_ones(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    device = await store.create_device(tenant.id, "valve", "hash-1")
    neighbour = await store.create_device(tenant.id, "pump", "hash-2")
    control = store.control
    first = await control.create_command(None, _new(tenant.id, device.id), T0)
    second = await control.create_command(None, _new(tenant.id, device.id), T0 + 1)
    elsewhere = await control.create_command(None, _new(tenant.id, neighbour.id), T0 + 2)

    async def claim(command_id: uuid.UUID, at: int) -> bool:
        moved = await control.transition_command(
            None, command_id, "SENT", ("QUEUED",), at, deadline=at + 1000, only_if_next=True
        )
        return moved is not None

    async def move(to: str, at: int, deadline: int | None = None) -> None:
        moved = await control.transition_command(
            None, first.id, to, ("SENT", "DELIVERED", "TIMEOUT"), at, deadline=deadline
        )
        assert moved is not None and moved.status == to

    assert await control.command_in_flight(None, device.id) is None
    assert await claim(first.id, T0 + 10)
    in_flight = await control.command_in_flight(None, device.id)
    assert in_flight is not None and in_flight.id == first.id and in_flight.in_flight
    assert not await claim(second.id, T0 + 11)  # SENT
    assert await claim(elsewhere.id, T0 + 12)  # another device is not held up
    await move("DELIVERED", T0 + 20, deadline=T0 + 1020)
    assert not await claim(second.id, T0 + 21)  # DELIVERED two-way: the answer is due
    await move("TIMEOUT", T0 + 30, deadline=T0 + 30)
    assert not await claim(second.id, T0 + 31)  # TIMEOUT with a retry due
    await move("QUEUED", T0 + 40)
    assert await control.command_in_flight(None, device.id) is None
    assert not await claim(second.id, T0 + 41)  # the retry is older: it goes first
    assert await claim(first.id, T0 + 42)
    await move("SUCCESSFUL", T0 + 43)
    assert await claim(second.id, T0 + 44)
    third = await control.create_command(None, _new(tenant.id, device.id), T0 + 50)
    plain = await control.transition_command(None, third.id, "SENT", ("QUEUED",), T0 + 51)
    assert plain is not None  # without only_if_next nothing is checked

    # TIMEOUT without a retry, final states and a one-way DELIVERED free the device.
    oneway = await control.create_command(None, _new(tenant.id, device.id, oneway=True), T0 + 52)
    fourth = await control.create_command(None, _new(tenant.id, device.id), T0 + 53)
    for command_id, to in ((second.id, "TIMEOUT"), (third.id, "CANCELED")):
        moved = await control.transition_command(None, command_id, to, ("SENT",), T0 + 60)
        assert moved is not None and not moved.in_flight
    assert not await claim(fourth.id, T0 + 61)  # the one-way command is older
    assert await claim(oneway.id, T0 + 62)
    assert not await claim(fourth.id, T0 + 63)
    delivered = await control.transition_command(None, oneway.id, "DELIVERED", ("SENT",), T0 + 64)
    assert delivered is not None and delivered.final and not delivered.in_flight
    assert await claim(fourth.id, T0 + 65)


async def test_racing_claims_from_two_processes_let_only_the_next_through(db_url: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(open_store(db_url)) for _ in range(2)]
        tenant = await stores[0].create_tenant("acme")
        device = await stores[0].create_device(tenant.id, "valve", "hash-1")
        new = _new(tenant.id, device.id)
        for round_ in range(15):
            at = T0 + round_ * 100
            commands = [await stores[0].control.create_command(None, new, at + i) for i in range(6)]
            claims = await asyncio.gather(
                *(
                    stores[i % 2].control.transition_command(
                        None, c.id, "SENT", ("QUEUED",), at + 10, deadline=at, only_if_next=True
                    )
                    for i, c in enumerate(commands)
                )
            )
            winners = [c for c in claims if c is not None]
            assert len(winners) == 1, f"round {round_}: {len(winners)} commands in flight"
            # Finish the round: its winner done, the rest canceled.
            for command in commands:
                await stores[1].control.transition_command(
                    None, command.id, "CANCELED", ("QUEUED", "SENT"), at + 20
                )
            assert await stores[1].control.command_in_flight(None, device.id) is None
