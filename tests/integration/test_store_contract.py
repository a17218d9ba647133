"""One contract suite for every `Store`: SQLite in a temporary file and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from iiot.errors import ConfigError, Conflict, InvalidRequest, NotFound
from iiot.model import Device, DevicePoints, Point, Role, Scalar
from iiot.storage import Store, TelemetryQuery, open_store

pytestmark = pytest.mark.asyncio

ALL_TIME = TelemetryQuery(start=-(2**62), end=2**62, limit=100_000)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database of each kind."""
    if request.param == "sqlite":
        # A directory that does not exist yet: the store must create it.
        return f"sqlite:///{tmp_path / 'data' / 'iiot.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """An open store on an empty database."""
    async with open_store(db_url) as opened:
        yield opened


async def telemetry_rows(url: str) -> int:
    """How many rows the telemetry table holds, as an operator would count them."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            return int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM telemetry"))
    finally:
        await conn.close()


async def new_device(store: Store, tenant_id: uuid.UUID, name: str) -> Device:
    return await store.create_device(tenant_id, name, f"hash-{uuid.uuid4()}")


def batch(device: Device, *points: tuple[str, int, Scalar]) -> list[DevicePoints]:
    return [DevicePoints(device, tuple(Point(k, ts, v) for k, ts, v in points))]


# --- lifecycle ---------------------------------------------------------------------------


async def test_open_store_refuses_unknown_url() -> None:
    with pytest.raises(ConfigError, match="IIOT_DATABASE_URL"):
        open_store("mysql://root:secret@localhost/iiot")
    with pytest.raises(ConfigError) as info:
        open_store("mysql://root:secret@localhost/iiot")
    assert "secret" not in str(info.value)


async def test_reopening_keeps_data_and_migrations_are_idempotent(db_url: str) -> None:
    async with open_store(db_url) as store:
        tenant = await store.create_tenant("acme")
    # Two processes starting at once: both must come up on the same schema.
    first, second = open_store(db_url), open_store(db_url)
    await asyncio.gather(first.__aenter__(), second.__aenter__())
    try:
        assert (await first.get_tenant(None, tenant.id)).name == "acme"
        assert (await second.list_tenants(None, 10, 0)).total == 1
        await first.ping()
    finally:
        await first.__aexit__(None, None, None)
        await second.__aexit__(None, None, None)


# --- tenants -----------------------------------------------------------------------------


async def test_tenant_crud_and_pagination(store: Store) -> None:
    for name in ["delta", "alpha", "echo", "charlie", "bravo"]:
        await store.create_tenant(name)
    page = await store.list_tenants(None, 2, 0)
    assert [t.name for t in page.items] == ["alpha", "bravo"]
    assert page.total == 5
    page = await store.list_tenants(None, 2, 4)
    assert [t.name for t in page.items] == ["echo"]
    assert page.total == 5
    assert (await store.list_tenants(None, 10, 10)).items == []

    alpha = (await store.list_tenants(None, 1, 0)).items[0]
    assert await store.get_tenant(None, alpha.id) == alpha
    assert alpha.retention_days is None and alpha.created_at > 0

    renamed = await store.update_tenant(None, alpha.id, name="aardvark", retention_days=30)
    assert (renamed.name, renamed.retention_days) == ("aardvark", 30)
    kept = await store.update_tenant(None, alpha.id, name="aardvark2")
    assert kept.retention_days == 30
    cleared = await store.update_tenant(None, alpha.id, clear_retention=True)
    assert (cleared.name, cleared.retention_days) == ("aardvark2", None)

    await store.delete_tenant(None, alpha.id)
    with pytest.raises(NotFound):
        await store.get_tenant(None, alpha.id)
    with pytest.raises(NotFound):
        await store.delete_tenant(None, alpha.id)
    assert (await store.list_tenants(None, 10, 0)).total == 4


async def test_tenant_names_are_unique(store: Store) -> None:
    await store.create_tenant("acme")
    other = await store.create_tenant("globex")
    with pytest.raises(Conflict, match="a tenant named 'acme' already exists"):
        await store.create_tenant("acme")
    with pytest.raises(Conflict, match="acme"):
        await store.update_tenant(None, other.id, name="acme")
    assert (await store.get_tenant(None, other.id)).name == "globex"


async def test_tenant_scope_sees_only_itself(store: Store) -> None:
    a = await store.create_tenant("a")
    b = await store.create_tenant("b")
    assert [t.name for t in (await store.list_tenants(a.id, 10, 0)).items] == ["a"]
    assert (await store.list_tenants(a.id, 10, 0)).total == 1
    with pytest.raises(NotFound):
        await store.get_tenant(a.id, b.id)
    with pytest.raises(NotFound):
        await store.update_tenant(a.id, b.id, name="mine")
    with pytest.raises(NotFound):
        await store.delete_tenant(a.id, b.id)
    assert (await store.get_tenant(None, b.id)).name == "b"


# --- users -------------------------------------------------------------------------------


async def test_user_crud(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    assert await store.count_users() == 0
    admin = await store.create_user(None, "root", "h0", Role.SYSADMIN)
    bob = await store.create_user(tenant.id, "bob", "h1", Role.TENANT_ADMIN)
    alice = await store.create_user(tenant.id, "alice", "h2", Role.TENANT_USER)
    assert await store.count_users() == 3
    assert admin.tenant_id is None and bob.tenant_id == tenant.id

    found = await store.find_user("bob")
    assert found is not None and found.id == bob.id and found.password_hash == "h1"
    assert found.role is Role.TENANT_ADMIN
    assert await store.find_user("nobody") is None
    assert await store.get_user(None, alice.id) == alice

    page = await store.list_users(None, 2, 0)
    assert [u.username for u in page.items] == ["alice", "bob"] and page.total == 3
    page = await store.list_users(tenant.id, 10, 0)
    assert [u.username for u in page.items] == ["alice", "bob"] and page.total == 2

    changed = await store.update_user(
        tenant.id, alice.id, password_hash="h3", role=Role.TENANT_ADMIN
    )
    assert (changed.password_hash, changed.role) == ("h3", Role.TENANT_ADMIN)
    assert await store.update_user(None, alice.id) == changed

    await store.delete_user(tenant.id, alice.id)
    with pytest.raises(NotFound):
        await store.get_user(None, alice.id)
    with pytest.raises(NotFound):
        await store.delete_user(None, alice.id)
    assert await store.count_users() == 2


async def test_user_rules(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    user = await store.create_user(tenant.id, "bob", "h", Role.TENANT_USER)
    with pytest.raises(Conflict, match="a user named 'bob' already exists"):
        await store.create_user(None, "bob", "h", Role.SYSADMIN)
    with pytest.raises(InvalidRequest, match="sysadmin"):
        await store.create_user(tenant.id, "eve", "h", Role.SYSADMIN)
    with pytest.raises(InvalidRequest, match="tenant"):
        await store.create_user(None, "eve", "h", Role.TENANT_ADMIN)
    with pytest.raises(InvalidRequest):
        await store.update_user(None, user.id, role=Role.SYSADMIN)
    with pytest.raises(NotFound):
        await store.create_user(uuid.uuid4(), "eve", "h", Role.TENANT_USER)
    assert await store.find_user("eve") is None


async def test_users_of_another_tenant_are_not_found(store: Store) -> None:
    a = await store.create_tenant("a")
    b = await store.create_tenant("b")
    bob = await store.create_user(a.id, "bob", "h", Role.TENANT_USER)
    root = await store.create_user(None, "root", "h", Role.SYSADMIN)
    for user_id in (bob.id, root.id):
        with pytest.raises(NotFound):
            await store.get_user(b.id, user_id)
        with pytest.raises(NotFound):
            await store.update_user(b.id, user_id, password_hash="stolen")
        with pytest.raises(NotFound):
            await store.delete_user(b.id, user_id)
    assert (await store.list_users(b.id, 10, 0)).total == 0
    assert (await store.get_user(None, bob.id)).password_hash == "h"


# --- devices -----------------------------------------------------------------------------


async def test_device_crud(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    other = await store.create_tenant("globex")
    pump = await store.create_device(tenant.id, "pump", "hash-pump")
    assert (pump.status, pump.tenant_id, pump.name) == ("active", tenant.id, "pump")
    assert not pump.disabled
    for name in ["valve", "boiler", "chiller"]:
        await new_device(store, tenant.id, name)
    await new_device(store, other.id, "pump")  # same name, other tenant: allowed

    assert await store.get_device(None, pump.id) == pump
    assert await store.find_device_by_token_hash("hash-pump") == pump
    assert await store.find_device_by_token_hash("unknown") is None

    page = await store.list_devices(tenant.id, 2, 1)
    assert [d.name for d in page.items] == ["chiller", "pump"] and page.total == 4
    assert (await store.list_devices(None, 100, 0)).total == 5

    changed = await store.update_device(tenant.id, pump.id, name="pump-1", status="disabled")
    assert (changed.name, changed.status, changed.disabled) == ("pump-1", "disabled", True)
    assert (await store.update_device(None, pump.id, status="maintenance")).name == "pump-1"

    await store.set_device_token_hash(tenant.id, pump.id, "hash-new")
    assert await store.find_device_by_token_hash("hash-pump") is None
    found = await store.find_device_by_token_hash("hash-new")
    assert found is not None and found.id == pump.id

    await store.delete_device(tenant.id, pump.id)
    with pytest.raises(NotFound):
        await store.get_device(None, pump.id)
    with pytest.raises(NotFound):
        await store.delete_device(None, pump.id)
    assert await store.find_device_by_token_hash("hash-new") is None


async def test_device_names_are_unique_per_tenant(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    pump = await store.create_device(tenant.id, "pump", "h1")
    valve = await store.create_device(tenant.id, "valve", "h2")
    with pytest.raises(Conflict, match="a device named 'pump' already exists in this tenant"):
        await store.create_device(tenant.id, "pump", "h3")
    with pytest.raises(Conflict, match="'pump' already exists in this tenant"):
        await store.update_device(None, valve.id, name="pump")
    with pytest.raises(Conflict, match="token"):
        await store.set_device_token_hash(None, valve.id, "h1")
    with pytest.raises(NotFound):
        await store.create_device(uuid.uuid4(), "ghost", "h4")
    assert (await store.get_device(None, valve.id)).name == "valve"
    assert (await store.find_device_by_token_hash("h1")) == pump


async def test_devices_of_another_tenant_are_not_found(store: Store) -> None:
    a = await store.create_tenant("a")
    b = await store.create_tenant("b")
    device = await store.create_device(a.id, "pump", "hash-a")
    await store.write_points(batch(device, ("t", 1000, 1.0)))
    with pytest.raises(NotFound):
        await store.get_device(b.id, device.id)
    with pytest.raises(NotFound):
        await store.update_device(b.id, device.id, status="disabled")
    with pytest.raises(NotFound):
        await store.set_device_token_hash(b.id, device.id, "hash-b")
    with pytest.raises(NotFound):
        await store.query_telemetry(b.id, device.id, ALL_TIME)
    with pytest.raises(NotFound):
        await store.latest(b.id, device.id)
    with pytest.raises(NotFound):
        await store.delete_device(b.id, device.id)
    assert (await store.list_devices(b.id, 10, 0)).total == 0
    # Nothing changed for the owner.
    assert await store.get_device(a.id, device.id) == device
    assert await store.find_device_by_token_hash("hash-a") == device
    assert await store.query_telemetry(a.id, device.id, ALL_TIME) == {"t": [(1000, 1.0)]}
    # An unknown id answers the same way.
    with pytest.raises(NotFound):
        await store.latest(None, uuid.uuid4())


# --- telemetry writes ----------------------------------------------------------------------


async def test_writes_are_idempotent_and_newer_value_wins(store: Store, db_url: str) -> None:
    tenant = await store.create_tenant("acme")
    device = await new_device(store, tenant.id, "pump")
    await store.write_points(batch(device, ("t", 1000, 20.0), ("t", 2000, 21.0)))
    await store.write_points(batch(device, ("t", 1000, 20.0), ("t", 2000, 21.0)))
    assert await telemetry_rows(db_url) == 2
    await store.write_points(batch(device, ("t", 2000, 25.5)))
    assert await telemetry_rows(db_url) == 2
    assert await store.query_telemetry(None, device.id, ALL_TIME) == {
        "t": [(1000, 20.0), (2000, 25.5)]
    }
    assert (await store.latest(None, device.id))["t"] == Point("t", 2000, 25.5)
    # Within one batch the last of two equal (key, ts) wins as well.
    await store.write_points(batch(device, ("t", 3000, 1.0), ("t", 3000, 2.0)))
    assert (await store.query_telemetry(None, device.id, ALL_TIME))["t"][-1] == (3000, 2.0)
    await store.write_points([])
    await store.write_points([DevicePoints(device, ())])
    assert await telemetry_rows(db_url) == 3


async def test_values_keep_their_type(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    device = await new_device(store, tenant.id, "plc")
    values: dict[str, Scalar] = {
        "float": 21.5,
        "int": 42,
        "negative": -7,
        "zero_float": 0.0,
        "big": 2**62,
        "true": True,
        "false": False,
        "text": "auto",
        "empty": "",
        "unicode": "Grüße ✓",
    }
    await store.write_points(batch(device, *((k, 1000, v) for k, v in values.items())))
    stored = await store.query_telemetry(None, device.id, ALL_TIME)
    latest = await store.latest(None, device.id)
    for key, value in values.items():
        ((ts, got),) = stored[key]
        assert ts == 1000
        assert got == value and type(got) is type(value), key
        assert latest[key].value == value and type(latest[key].value) is type(value), key
    # A value changing type at the same (key, ts) is replaced whole.
    await store.write_points(batch(device, ("int", 1000, True)))
    assert (await store.query_telemetry(None, device.id, ALL_TIME))["int"] == [(1000, True)]
    assert (await store.latest(None, device.id, ["int"]))["int"].value is True


async def test_non_finite_and_huge_numbers_do_not_break_a_batch(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    device = await new_device(store, tenant.id, "plc")
    await store.write_points(
        batch(
            device,
            ("nan", 1, float("nan")),
            ("inf", 1, float("-inf")),
            ("huge", 1, 10**30),
            ("ok", 1, 1.5),
        )
    )
    stored = await store.query_telemetry(None, device.id, ALL_TIME)
    assert stored["nan"] == [(1, "NaN")]
    assert stored["inf"] == [(1, "-Infinity")]
    assert stored["huge"] == [(1, 1e30)]
    assert stored["ok"] == [(1, 1.5)]


async def test_points_of_a_deleted_device_are_skipped_and_the_rest_commits(
    store: Store, db_url: str
) -> None:
    tenant = await store.create_tenant("acme")
    kept = await new_device(store, tenant.id, "kept")
    gone = await new_device(store, tenant.id, "gone")
    await store.delete_device(None, gone.id)
    # The pipeline still holds `gone` from before the deletion: the batch must not fail.
    await store.write_points(
        [
            DevicePoints(gone, (Point("t", 1000, 1.0), Point("t", 2000, 2.0))),
            DevicePoints(kept, (Point("t", 1000, 3.0),)),
        ]
    )
    assert await store.query_telemetry(None, kept.id, ALL_TIME) == {"t": [(1000, 3.0)]}
    assert await telemetry_rows(db_url) == 1
    # A batch made only of vanished devices is a no-op too.
    await store.write_points(batch(gone, ("t", 3000, 1.0)))
    assert await telemetry_rows(db_url) == 1
    with pytest.raises(NotFound):
        await store.latest(None, gone.id)


# --- telemetry reads -----------------------------------------------------------------------


async def test_ranges_limits_order_and_keys(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    device = await new_device(store, tenant.id, "pump")
    other = await new_device(store, tenant.id, "other")
    points = [("a", 1000 + 10 * i, float(i)) for i in range(10)]
    points += [("b", 1000 + 10 * i, i) for i in range(0, 10, 2)]
    await store.write_points(batch(device, *points))
    await store.write_points(batch(other, ("a", 1010, 99.0)))

    window = TelemetryQuery(start=1020, end=1060)  # [start, end)
    got = await store.query_telemetry(None, device.id, window)
    assert got == {
        "a": [(1020, 2.0), (1030, 3.0), (1040, 4.0), (1050, 5.0)],
        "b": [(1020, 2), (1040, 4)],
    }
    got = await store.query_telemetry(
        None, device.id, TelemetryQuery(start=1020, end=1060, keys=("a",), limit=2)
    )
    assert got == {"a": [(1020, 2.0), (1030, 3.0)]}
    got = await store.query_telemetry(
        None, device.id, TelemetryQuery(start=0, end=5000, limit=3, order="desc")
    )
    assert got == {
        "a": [(1090, 9.0), (1080, 8.0), (1070, 7.0)],
        "b": [(1080, 8), (1060, 6), (1040, 4)],
    }
    # Keys without data in the range, or unknown keys, are left out.
    got = await store.query_telemetry(
        None, device.id, TelemetryQuery(start=1090, end=2000, keys=("a", "b", "zzz"))
    )
    assert got == {"a": [(1090, 9.0)]}
    assert await store.query_telemetry(None, device.id, TelemetryQuery(start=5, end=5)) == {}
    with pytest.raises(InvalidRequest):
        await store.query_telemetry(None, device.id, TelemetryQuery(start=0, end=1, limit=-1))


async def test_latest_values(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    device = await new_device(store, tenant.id, "pump")
    assert await store.latest(None, device.id) == {}
    await store.write_points(batch(device, ("t", 2000, 20.0), ("t", 1000, 10.0), ("m", 5, "on")))
    assert await store.latest(None, device.id) == {
        "t": Point("t", 2000, 20.0),
        "m": Point("m", 5, "on"),
    }
    # A late, older point is stored but does not replace the latest value.
    await store.write_points(batch(device, ("t", 1500, 15.0)))
    assert (await store.latest(None, device.id))["t"] == Point("t", 2000, 20.0)
    assert len((await store.query_telemetry(None, device.id, ALL_TIME))["t"]) == 3
    # A newer point does; the same ts with a new value does too.
    await store.write_points(batch(device, ("t", 3000, 30.0)))
    assert (await store.latest(None, device.id))["t"] == Point("t", 3000, 30.0)
    await store.write_points(batch(device, ("t", 3000, 31.0)))
    assert (await store.latest(None, device.id))["t"] == Point("t", 3000, 31.0)
    assert await store.latest(tenant.id, device.id, ["m", "nope"]) == {"m": Point("m", 5, "on")}


async def test_aggregates_match_python(store: Store) -> None:
    tenant = await store.create_tenant("acme")
    device = await new_device(store, tenant.id, "pump")
    rng = random.Random(7)
    interval = 60_000
    points: list[tuple[str, int, Scalar]] = []
    for i in range(600):
        ts = -90_000 + i * 1_700 + rng.randrange(1_000)  # some before 1970: floor, not truncate
        value: Scalar = rng.choice([rng.uniform(-50, 50), rng.randrange(-100, 100)])
        points.append(("t", ts, value))
    points.append(("t", 3 * interval + 1, True))  # a boolean: counted, not averaged
    points.append(("t", 3 * interval + 2, "fault"))  # a string: counted, not averaged
    points.append(("s", 5, "text only"))  # a bucket with no number at all
    await store.write_points(batch(device, *points))

    start, end = -60_000, 600_000
    in_range = [(ts, v) for key, ts, v in points if key == "t" and start <= ts < end]
    buckets: dict[int, list[Scalar]] = {}
    for ts, v in in_range:
        buckets.setdefault(ts - ts % interval, []).append(v)  # Python's % floors
    numeric = {
        b: [float(v) for v in vs if not isinstance(v, bool | str)] for b, vs in buckets.items()
    }
    expected: dict[str, list[tuple[int, float]]] = {
        "avg": [(b, sum(vs) / len(vs)) for b, vs in sorted(numeric.items())],
        "min": [(b, min(vs)) for b, vs in sorted(numeric.items())],
        "max": [(b, max(vs)) for b, vs in sorted(numeric.items())],
        "sum": [(b, sum(vs)) for b, vs in sorted(numeric.items())],
        "count": [(b, len(vs)) for b, vs in sorted(buckets.items())],
    }
    assert min(buckets) == -60_000 and len(buckets) == 11
    for agg, want in expected.items():
        query = TelemetryQuery(start=start, end=end, keys=("t",), agg=agg, interval_ms=interval)  # type: ignore[arg-type]
        got = (await store.query_telemetry(None, device.id, query))["t"]
        assert [b for b, _ in got] == [b for b, _ in want], agg
        for (_, g), (_, w) in zip(got, want, strict=True):
            assert g == pytest.approx(w, rel=1e-9, abs=1e-9), agg
        assert all(type(g) is (int if agg == "count" else float) for _, g in got), agg

    # Limit and order apply to buckets; every key is aggregated when none is named.
    query = TelemetryQuery(
        start=0, end=end, agg="count", interval_ms=interval, limit=2, order="desc"
    )
    got_all = await store.query_telemetry(None, device.id, query)
    assert got_all["t"] == [(b, n) for b, n in expected["count"][::-1][:2]]
    assert got_all["s"] == [(0, 1)]
    avg_s = TelemetryQuery(start=0, end=end, keys=("s",), agg="avg", interval_ms=interval)
    assert await store.query_telemetry(None, device.id, avg_s) == {}
    with pytest.raises(InvalidRequest):
        await store.query_telemetry(None, device.id, TelemetryQuery(start=0, end=1, agg="avg"))


# --- deletion ------------------------------------------------------------------------------


async def test_delete_telemetry_before(store: Store) -> None:
    a = await store.create_tenant("a")
    b = await store.create_tenant("b")
    da1, da2 = await new_device(store, a.id, "d1"), await new_device(store, a.id, "d2")
    db1 = await new_device(store, b.id, "d1")
    for device in (da1, da2, db1):
        await store.write_points(batch(device, *(("t", ts, 1.0) for ts in range(0, 100, 10))))
    assert await store.delete_telemetry_before(a.id, 50) == 10
    assert [ts for ts, _ in (await store.query_telemetry(None, da1.id, ALL_TIME))["t"]] == [
        50,
        60,
        70,
        80,
        90,
    ]
    assert len((await store.query_telemetry(None, db1.id, ALL_TIME))["t"]) == 10
    assert await store.delete_telemetry_before(a.id, 50) == 0
    # Latest values are not raw telemetry: they stay.
    assert (await store.latest(None, da2.id))["t"].ts == 90


async def test_deleting_a_device_or_tenant_deletes_what_it_owns(store: Store, db_url: str) -> None:
    a = await store.create_tenant("a")
    b = await store.create_tenant("b")
    da = await store.create_device(a.id, "pump", "hash-a")
    db = await store.create_device(b.id, "pump", "hash-b")
    da2 = await store.create_device(a.id, "valve", "hash-a2")
    await store.create_user(a.id, "alice", "h", Role.TENANT_ADMIN)
    await store.create_user(b.id, "bob", "h", Role.TENANT_ADMIN)
    for device in (da, db, da2):
        await store.write_points(batch(device, ("t", 1, 1.0), ("t", 2, 2.0)))
    assert await telemetry_rows(db_url) == 6

    await store.delete_device(None, da2.id)
    assert await telemetry_rows(db_url) == 4
    # A device created again under the same name starts empty.
    again = await store.create_device(a.id, "valve", "hash-a3")
    assert await store.query_telemetry(None, again.id, ALL_TIME) == {}
    assert await store.latest(None, again.id) == {}

    await store.delete_tenant(None, a.id)
    assert await store.find_user("alice") is None
    assert await store.find_device_by_token_hash("hash-a") is None
    with pytest.raises(NotFound):
        await store.get_device(None, da.id)
    assert await telemetry_rows(db_url) == 2
    assert (await store.list_devices(None, 10, 0)).total == 1
    assert (await store.list_users(None, 10, 0)).total == 1
    assert await store.query_telemetry(None, db.id, ALL_TIME) == {"t": [(1, 1.0), (2, 2.0)]}


async def test_concurrent_writes_of_overlapping_batches(store: Store, db_url: str) -> None:
    tenant = await store.create_tenant("acme")
    devices = [await new_device(store, tenant.id, f"d{i}") for i in range(4)]

    def make(seed: int) -> list[DevicePoints]:
        rng = random.Random(seed)
        order = devices[:]
        rng.shuffle(order)
        return [
            DevicePoints(d, tuple(Point(k, ts, float(ts)) for k in "abc" for ts in range(50)))
            for d in order
        ]

    await asyncio.gather(*(store.write_points(make(seed)) for seed in range(8)))
    assert await telemetry_rows(db_url) == 4 * 3 * 50
    latest: dict[str, Any] = await store.latest(None, devices[0].id)
    assert latest["a"] == Point("a", 49, 49.0)
