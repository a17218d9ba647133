"""The ingest pipeline: ack after commit, batching, backpressure, outage and recovery.

A small in-memory writer stands in for the store here (the store itself is covered by the
contract suite against SQLite and PostgreSQL); it can be told to fail like a database that
is down, or to hold a write until released.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest

from iiot.bus import LiveBus, TelemetryEvent
from iiot.errors import InvalidRequest, StorageUnavailable
from iiot.metrics import Metrics
from iiot.model import Device, DevicePoints, Point
from iiot.pipeline import Pipeline, PipelineSettings

DEVICE = Device(uuid.uuid4(), uuid.uuid4(), "press-1", "active")


def points(n: int, start: int = 0) -> DevicePoints:
    return DevicePoints(DEVICE, tuple(Point("p", start + i, i) for i in range(n)))


class MemoryWriter:
    def __init__(self) -> None:
        self.batches: list[list[DevicePoints]] = []
        self.failures_left = 0
        self.gate: asyncio.Event | None = None
        self.refuse = False
        self.crash = False

    async def write_points(self, batch: Sequence[DevicePoints]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.failures_left > 0:
            self.failures_left -= 1
            raise StorageUnavailable("database is down")
        if self.refuse:
            raise InvalidRequest("refused for good")
        if self.crash:
            raise RuntimeError("a bug in the store")
        self.batches.append(list(batch))

    @property
    def stored(self) -> list[int]:
        return [p.ts for batch in self.batches for item in batch for p in item.points]


def pipeline(writer: MemoryWriter, bus: LiveBus | None = None, **kw: float) -> Pipeline:
    settings = PipelineSettings(**{"max_delay_s": 0.01, "commit_timeout_s": 5.0, **kw})
    return Pipeline(writer, bus or LiveBus(), Metrics(), settings)  # type: ignore[arg-type]


async def test_submit_returns_only_after_commit_and_publishes_on_bus() -> None:
    writer, bus = MemoryWriter(), LiveBus()
    events = bus.subscribe()
    writer.gate = asyncio.Event()
    async with pipeline(writer, bus) as pipe:
        task = asyncio.create_task(pipe.submit(points(3), "test"))
        await asyncio.sleep(0.05)
        assert not task.done(), "acknowledged before the write committed"
        writer.gate.set()
        await asyncio.wait_for(task, 5)
    assert writer.stored == [0, 1, 2]
    event = events.get_nowait()
    assert isinstance(event, TelemetryEvent)
    assert [p.ts for p in event.batch[0].points] == [0, 1, 2]


async def test_concurrent_messages_share_batches_up_to_the_size_limit() -> None:
    writer = MemoryWriter()
    async with pipeline(writer, max_batch_points=100, max_delay_s=0.05) as pipe:
        await asyncio.gather(*(pipe.submit(points(10, i * 10), "test") for i in range(50)))
    assert sorted(writer.stored) == list(range(500))
    assert all(sum(len(i.points) for i in b) <= 100 for b in writer.batches)
    assert len(writer.batches) < 50, "messages were not batched together"


async def test_outage_holds_points_and_resumes_without_loss() -> None:
    writer = MemoryWriter()
    writer.failures_left = 3
    async with pipeline(writer) as pipe:
        await asyncio.wait_for(pipe.submit(points(5), "test"), 10)
        assert pipe.storage_ok
    assert writer.stored == [0, 1, 2, 3, 4]


async def test_commit_timeout_withdraws_points_not_yet_written() -> None:
    writer = MemoryWriter()
    writer.gate = asyncio.Event()
    async with pipeline(writer, commit_timeout_s=0.2, max_batch_points=5, writers=1) as pipe:
        first = asyncio.create_task(pipe.submit(points(5), "test"))  # taken by the writer
        await asyncio.sleep(0.05)
        with pytest.raises(StorageUnavailable):
            await pipe.submit(points(5, 100), "test")  # still queued: withdrawn
        assert pipe.queued_points == 5
        with pytest.raises(StorageUnavailable):
            await first
        writer.gate.set()
    assert writer.stored == [0, 1, 2, 3, 4], "the withdrawn message must not be written"


class OrderedGates(MemoryWriter):
    """Holds each batch until its own gate (by first ts) opens: commits out of order."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[int, asyncio.Event] = {}

    async def write_points(self, batch: Sequence[DevicePoints]) -> None:
        await self.gates.setdefault(batch[0].points[0].ts, asyncio.Event()).wait()
        self.batches.append(list(batch))


async def test_senders_hear_in_arrival_order_when_a_later_batch_commits_first() -> None:
    writer, bus = OrderedGates(), LiveBus()
    events = bus.subscribe()
    async with pipeline(writer, bus, max_batch_points=5, max_delay_s=0, writers=2) as pipe:
        first = asyncio.create_task(pipe.submit(points(5, 0), "test"))
        second = asyncio.create_task(pipe.submit(points(5, 100), "test"))
        await asyncio.sleep(0.05)
        writer.gates.setdefault(100, asyncio.Event()).set()  # the second batch commits
        await asyncio.sleep(0.05)
        assert writer.stored == [100, 101, 102, 103, 104]
        assert not second.done(), "told before the older batch committed"
        assert events.empty()
        writer.gates.setdefault(0, asyncio.Event()).set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
    published = [events.get_nowait(), events.get_nowait()]
    assert [e.batch[0].points[0].ts for e in published if isinstance(e, TelemetryEvent)] == [
        0,
        100,
    ]


async def test_full_queue_makes_producers_wait_instead_of_dropping() -> None:
    writer = MemoryWriter()
    writer.gate = asyncio.Event()
    async with pipeline(writer, queue_max_points=10, max_batch_points=10) as pipe:
        tasks = [asyncio.create_task(pipe.submit(points(5, i * 5), "test")) for i in range(4)]
        await asyncio.sleep(0.1)
        assert pipe.queued_points <= 10, "queue grew past its bound"
        writer.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert sorted(writer.stored) == list(range(20))


async def test_a_batch_refused_for_good_fails_its_senders_and_the_pipeline_goes_on() -> None:
    writer = MemoryWriter()
    async with pipeline(writer) as pipe:
        writer.refuse = True
        with pytest.raises(InvalidRequest):
            await pipe.submit(points(2), "test")
        writer.refuse = False
        await pipe.submit(points(2, 10), "test")
    assert writer.stored == [10, 11]


async def test_close_flushes_what_was_accepted() -> None:
    writer = MemoryWriter()
    pipe = pipeline(writer, max_delay_s=1.0)
    await pipe.__aenter__()
    tasks = [asyncio.create_task(pipe.submit(points(1, i), "test")) for i in range(10)]
    await asyncio.sleep(0.01)
    await pipe.close()
    await asyncio.gather(*tasks)
    assert sorted(writer.stored) == list(range(10))


async def test_group_commit_writes_at_once_and_groups_what_arrives_during_a_write() -> None:
    writer = MemoryWriter()
    writer.gate = asyncio.Event()
    async with pipeline(writer, max_delay_s=0.0) as pipe:
        first = asyncio.create_task(pipe.submit(points(1), "test"))
        await asyncio.sleep(0.05)  # the idle writer took it at once, alone
        later = [asyncio.create_task(pipe.submit(points(1, 10 + i), "test")) for i in range(20)]
        await asyncio.sleep(0.05)
        assert not first.done() and not any(t.done() for t in later)
        writer.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 5)
    assert [len(batch) for batch in writer.batches] == [1, 20]


async def test_try_enqueue_gives_a_future_that_completes_on_commit() -> None:
    writer = MemoryWriter()
    writer.gate = asyncio.Event()
    async with pipeline(writer) as pipe:
        future = pipe.try_enqueue(points(2), "test")
        assert future is not None
        await asyncio.sleep(0.05)
        assert not future.done(), "completed before the write committed"
        writer.gate.set()
        await asyncio.wait_for(future, 5)
    assert writer.stored == [0, 1]


async def test_try_enqueue_refuses_without_waiting_when_the_queue_is_full() -> None:
    writer = MemoryWriter()
    writer.gate = asyncio.Event()
    async with pipeline(writer, queue_max_points=5, max_batch_points=5) as pipe:
        first = pipe.try_enqueue(points(5), "test")
        assert first is not None
        assert pipe.try_enqueue(points(1, 100), "test") is None
        writer.gate.set()
        await asyncio.wait_for(first, 5)
    assert writer.stored == [0, 1, 2, 3, 4]


async def test_enqueue_calls_back_after_commit_in_arrival_order() -> None:
    writer = MemoryWriter()
    writer.gate = asyncio.Event()
    heard: list[tuple[int, BaseException | None]] = []
    async with pipeline(writer, max_batch_points=4, max_delay_s=0, writers=2) as pipe:
        for i in range(6):
            assert pipe.enqueue(points(2, i * 10), "test", lambda e, i=i: heard.append((i, e)))
        await asyncio.sleep(0.05)
        assert heard == [], "called back before the write committed"
        writer.gate.set()
        for _ in range(100):
            if len(heard) == 6:
                break
            await asyncio.sleep(0.01)
    assert heard == [(i, None) for i in range(6)]
    assert sorted(writer.stored) == sorted(i * 10 + j for i in range(6) for j in range(2))


async def test_enqueue_refuses_when_full_and_reports_failures_to_the_callback() -> None:
    writer = MemoryWriter()
    writer.gate = asyncio.Event()
    heard: list[BaseException | None] = []

    def broken(error: BaseException | None) -> None:
        raise RuntimeError("a sender's bug")

    async with pipeline(
        writer, queue_max_points=5, max_batch_points=5, commit_timeout_s=0.2, writers=1
    ) as pipe:
        assert pipe.enqueue(points(3), "test", broken)
        assert pipe.enqueue(points(2, 100), "test", heard.append)
        assert not pipe.enqueue(points(1, 200), "test", heard.append), "queue over its bound"
        await asyncio.sleep(0.5)  # the commit timeout passes with the write held
        assert len(heard) == 1 and isinstance(heard[0], StorageUnavailable)
        writer.gate.set()
        await pipe.submit(points(1, 300), "test")  # the writer survived the broken callback
    assert 300 in writer.stored and 200 not in writer.stored


async def test_an_unexpected_store_error_fails_the_batch_but_not_the_writer() -> None:
    writer = MemoryWriter()
    async with pipeline(writer) as pipe:
        writer.crash = True
        with pytest.raises(StorageUnavailable, match="unexpected storage error"):
            await asyncio.wait_for(pipe.submit(points(2), "test"), 5)
        writer.crash = False
        await asyncio.wait_for(pipe.submit(points(2, 10), "test"), 5)
    assert writer.stored == [10, 11]


class PoisonWriter(MemoryWriter):
    """Refuses any batch holding a point with a poison key, as a database refuses a value."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.attempts = 0

    async def write_points(self, batch: Sequence[DevicePoints]) -> None:
        self.attempts += 1
        if any(p.key == "poison" for item in batch for p in item.points):
            raise self.error
        await super().write_points(batch)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (InvalidRequest("value refused"), InvalidRequest),
        (RuntimeError("a bug the data triggers"), StorageUnavailable),
    ],
)
async def test_a_bad_message_is_isolated_and_the_rest_of_its_batch_commits(
    error: Exception, expected: type[Exception]
) -> None:
    writer, bus = PoisonWriter(error), LiveBus()
    events = bus.subscribe()
    heard: dict[int, BaseException | None] = {}
    bad = DevicePoints(DEVICE, (Point("poison", 999, 1),))
    async with pipeline(writer, bus, max_batch_points=100, max_delay_s=0.05, writers=1) as pipe:
        for i in range(20):
            item = bad if i == 7 else points(1, i)
            assert pipe.enqueue(item, "test", lambda e, i=i: heard.__setitem__(i, e))
        for _ in range(200):
            if len(heard) == 20:
                break
            await asyncio.sleep(0.01)
    assert isinstance(heard.pop(7), expected)
    assert heard == {i: None for i in range(20) if i != 7}
    assert sorted(writer.stored) == [i for i in range(20) if i != 7]
    published = []
    while not events.empty():
        event = events.get_nowait()
        assert isinstance(event, TelemetryEvent)
        published.extend(p.ts for item in event.batch for p in item.points)
    assert sorted(published) == [i for i in range(20) if i != 7]


async def test_a_transient_failure_retries_the_whole_batch_unsplit() -> None:
    writer = MemoryWriter()
    writer.failures_left = 2
    async with pipeline(writer, max_batch_points=100, max_delay_s=0.05, writers=1) as pipe:
        await asyncio.gather(*(pipe.submit(points(1, i), "test") for i in range(10)))
    assert len(writer.batches) == 1 and sorted(writer.stored) == list(range(10))
