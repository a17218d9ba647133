"""`CommandService`: creates commands, delivers them through device links, tracks states.

Delivery works only through `DeviceLinks`, whatever the protocol. Every state change is
stored first (a conditional UPDATE: states never go backwards, and of two processes racing
for one command only one wins), then published on the live bus as a
`RecordEvent("command", status, ...)`; the live bridge forwards it to the other platform
processes. A process that holds a link of the device delivers the device's QUEUED
commands, in creation order, whenever a command is queued (here or elsewhere) and
whenever a link attaches. Delivery is at least once; the command id stays the same on
every attempt, so a device can drop duplicates.

`sequential` (`IIOT_COMMANDS_SEQUENTIAL`, ThingsBoard's `ACTORS_RPC_SEQUENTIAL`): a device
has at most one command in flight (`Command.in_flight`). The claim QUEUED -> SENT then
passes only for the device's next command (none in flight, none older QUEUED), checked by
the store in the same atomic step, so it holds whichever process or link delivers; each
event that frees a device (a final state, a TIMEOUT, a one-way DELIVERED) starts the next
delivery round where a link is held. Timeouts, expiry and re-queueing: `command_sweeps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Collection
from dataclasses import replace
from typing import Any, Self
from uuid import UUID

from iiot.bus import LiveBus, RecordEvent, record_topics
from iiot.control.command_sweeps import CommandSweeps
from iiot.control.link_choice import by_preference, only_broker
from iiot.control.rules import (
    CANCELABLE,
    CLAIMABLE,
    EXPIRABLE,
    CommandRequest,
    frees_device,
    settled,
)
from iiot.control.waiters import Waiters
from iiot.errors import Conflict, NotFound
from iiot.links import DeliveryFailed, DeviceLink, DeviceLinks, OutboundCommand
from iiot.metrics import Metrics
from iiot.model import Device
from iiot.storage._common import now_ms
from iiot.storage.base import Scope, Store
from iiot.storage.control import Command, NewCommand

__all__ = ["CommandService"]

log = logging.getLogger(__name__)

_RECHECK_S = 1.0  # waiters re-read the command this often in case an event was lost
_UNCLAIMED_GRACE_S = 2.0  # split roles: how long a lightweight command may wait for a taker
_RECONNECT_GRACE_S = 1.0  # one process: the same for a device between polls or reconnecting
# Several processes: one that can reach the device only through an external broker waits
# this long before taking a command, so that a process holding a link that proves delivery
# (an HTTP poll, a CoAP observation...) takes it first: it hears the command in milliseconds.
_BROKER_GRACE_S = 0.5
_LINK_FAILED_PAUSE_S = 1.0  # doubled after each failure in a row, up to the maximum
_LINK_FAILED_PAUSE_MAX_S = 30.0


class _Outcome(enum.Enum):
    """How one delivery attempt ended."""

    IN_FLIGHT = "in flight"  # the link has it; the device is not done with it yet
    DONE = "done"  # delivered and final: one-way, or answered already
    LINK_FAILED = "link failed"  # back to QUEUED; try another link


class CommandService(CommandSweeps):
    """The rules of commands for one platform process."""

    def __init__(
        self,
        store: Store,
        bus: LiveBus,
        links: DeviceLinks,
        metrics: Metrics,
        *,
        distributed: bool,
        sequential: bool = False,
    ) -> None:
        """`distributed`: other platform processes may hold device links (split roles);
        `sequential`: at most one command in flight per device."""
        self._store = store
        self._bus = bus
        self._links = links
        self._metrics = metrics
        self._distributed = distributed
        self._sequential = sequential
        # Waiting senders by command; each hears the newest status seen on the bus.
        self._waiters = Waiters()
        self._device_locks: dict[UUID, asyncio.Lock] = {}
        self._pending_flush: set[UUID] = set()
        self._paused: dict[UUID, float] = {}  # device -> loop time until which not to retry
        self._failures: dict[UUID, int] = {}  # device -> link failures in a row
        # Commands a link is delivering now -> whether the device's answer came already.
        self._delivering: dict[UUID, bool] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: list[asyncio.Task[Any]] = []
        self._queue: asyncio.Queue[Any] | None = None

    # --- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._queue = self._bus.subscribe(wants=record_topics("command"))
        self._links.add_listener(self._on_link)
        if not self._distributed:
            await self._requeue_orphans()
        self._main = [
            asyncio.create_task(self._listen(), name="commands-listen"),
            asyncio.create_task(self._sweep_forever(), name="commands-sweep"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._links.remove_listener(self._on_link)
        if self._queue is not None:
            self._bus.unsubscribe(self._queue)
        for task in [*self._main, *self._tasks]:
            task.cancel()
        for task in [*self._main, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def describe(self) -> str:
        """One line for the start-up log."""
        if self._sequential:
            return "commands: delivery through device links, one at a time per device"
        return "commands: delivery through device links"

    async def _requeue_orphans(self) -> None:
        """Single process: SENT persistent commands lost their link with the last run."""
        for command in await self._store.control.stale_sent_commands(None, 10_000):
            await self._move(
                command,
                "QUEUED",
                ("SENT",),
                error="the platform restarted before the device confirmed receipt",
            )

    # --- senders -------------------------------------------------------------------------
    async def send(
        self, scope: Scope, device: Device, request: CommandRequest, sent_by: UUID | None
    ) -> Command:
        """Store a QUEUED command and start its delivery (here or in another process).

        A device with a link here and no delivery under way gets the command at once: it is
        stored SENT (claimed in the same statement) unless older QUEUED ones are ahead of
        it, and delivered without a round of the device's queue. The device's lock is held
        from before the statement until the delivery is done, as a round holds it: other
        commands sent meanwhile queue behind it, in order, and a link that takes one
        message (an HTTP poll) is never offered a second."""
        now = now_ms()
        request.check(now)
        new = NewCommand(
            tenant_id=device.tenant_id,
            device_id=device.id,
            method=request.method,
            params={} if request.params is None else request.params,
            oneway=request.oneway,
            persistent=request.persistent,
            timeout_ms=request.timeout_ms,
            expires_at=request.expiry(now),
            retries=request.retries,
            sent_by=sent_by,
        )
        lock = self._direct_lock(device.id)
        if lock is None:
            command = await self._store.control.create_command(scope, new, now)
        else:
            await lock.acquire()  # free: taken without a pause, before any other sender
            handed_over = False
            try:
                command = await self._store.control.create_command(scope, new, now, claim=True)
                if command.status == "SENT":
                    self._start_claimed(command, lock)
                    handed_over = True
                    return command
            finally:
                if not handed_over:
                    self._release(device.id, lock)
        self._announce(command)
        if not command.persistent and not self._links.connected(device.id):
            self._spawn(self._fail_unclaimed(command))
        return command

    def _start_claimed(self, command: Command, lock: asyncio.Lock) -> None:
        """Announce both transitions of a command claimed as it was stored, and deliver it
        (the delivery frees the device's lock)."""
        self._delivering[command.id] = False  # its QUEUED event must not start a round
        queued = replace(
            command, status="QUEUED", attempts=0, deadline=None, transitions=command.transitions[:1]
        )
        self._announce(queued)
        self._announce(command)
        self._spawn(self._deliver_claimed(command, lock))

    def _direct_lock(self, device_id: UUID) -> asyncio.Lock | None:
        """The device's lock, free, if a new command of this device is to be claimed as it
        is stored: the device has a link here, no delivery is under way, and neither one
        command at a time (the device's queue decides) nor only an external broker while
        other processes may hold a link that proves delivery."""
        if self._sequential or device_id in self._paused:
            return None
        links = self._command_links(device_id)
        if not links or (self._distributed and only_broker(links)):
            return None
        lock = self._device_locks.setdefault(device_id, asyncio.Lock())
        return None if lock.locked() else lock

    def _command_links(self, device_id: UUID, skip: Collection[int] = ()) -> list[DeviceLink]:
        """The device's links here that listen for commands, best first (`skip`: ids of
        links that failed in this round)."""
        return by_preference(
            link
            for link in self._links.links(device_id)
            if link.listens_commands and id(link) not in skip
        )

    def _release(self, device_id: UUID, lock: asyncio.Lock) -> None:
        lock.release()
        self._forget_lock(device_id, lock)

    def _forget_lock(self, device_id: UUID, lock: asyncio.Lock) -> None:
        """Drop an idle device's lock, unless a round is about to take it."""
        if not lock.locked() and device_id not in self._pending_flush:
            self._device_locks.pop(device_id, None)

    async def wait(
        self, scope: Scope, command: Command, timeout_s: float, *, fresh: bool = False
    ) -> Command:
        """Wait until the command is answered (two-way), delivered (one-way) or final;
        at the timeout an open lightweight command becomes TIMEOUT.

        `fresh`: `command` is what `send` just returned, with no await since (its events
        are handled only after the caller's next await), so it need not be read again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with self._waiters.waiting(command.id) as waiter:
            if not fresh:
                # Events before this waiter existed are not heard: start from the store.
                command = await self._store.control.get_command(scope, command.id)
            while not settled(command):
                left = deadline - loop.time()
                if left <= 0:
                    break
                woken = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, _RECHECK_S)):  # not wait_for (3.11)
                        await waiter.event.wait()
                    woken = True
                waiter.event.clear()
                # A change made here is known as it is; read the stored command when the
                # bus says another process settled it, or now and then in case an event
                # was lost. Intermediate states need no read.
                known = waiter.known() if woken else None
                if known is not None:
                    command = known
                elif not woken or waiter.settled_elsewhere:
                    command = await self._store.control.get_command(scope, command.id)
        if not settled(command) and not command.persistent:
            timed_out = await self._move(
                command, "TIMEOUT", EXPIRABLE, error="no answer within the timeout"
            )
            command = timed_out or await self._store.control.get_command(scope, command.id)
        return command

    async def cancel(self, scope: Scope, command_id: UUID) -> Command:
        """CANCELED while not yet delivered; `Conflict` after."""
        command = await self._store.control.get_command(scope, command_id)
        canceled = await self._move(command, "CANCELED", CANCELABLE)
        if canceled is None:
            current = await self._store.control.get_command(scope, command_id)
            raise Conflict(
                f"command {command_id} is {current.status}: only a command not yet "
                "delivered (QUEUED, SENT, TIMEOUT) can be canceled"
            )
        return canceled

    # --- device side ---------------------------------------------------------------------
    async def reply(self, device: Device, command_id: UUID, response: Any) -> None:
        """The device's answer: SUCCESSFUL (a reply also proves delivery), in one statement."""
        answered = await self._store.control.answer_command(
            None, command_id, device.id, response, now_ms()
        )
        if answered is not None:
            command = answered.command
            if command.id in self._delivering:
                self._delivering[command.id] = True  # its receipt needs no statement now
            if answered.delivered_now:
                self._announce(
                    replace(
                        command,
                        status="DELIVERED",
                        response=None,
                        transitions=command.transitions[:-1],
                    )
                )
            self._announce(command)
            return
        try:
            command = await self._store.control.get_command(device.tenant_id, command_id)
        except NotFound:
            raise NotFound(f"no command {command_id} for this device") from None
        if command.device_id != device.id:
            raise NotFound(f"no command {command_id} for this device")
        # Otherwise one-way, or final already: a duplicate answer or a confused device.

    # --- delivery ------------------------------------------------------------------------
    def _on_link(self, device: Device, link: DeviceLink, attached: bool) -> None:
        if attached and link.listens_commands:
            self._paused.pop(device.id, None)  # a new link: try at once
            self._failures.pop(device.id, None)
            self._schedule_flush(device.id)

    def _schedule_flush(self, device_id: UUID) -> None:
        if device_id in self._pending_flush:
            return  # a flush is about to run and will see every QUEUED command
        self._pending_flush.add(device_id)
        self._spawn(self._flush(device_id))

    async def _flush(self, device_id: UUID) -> None:
        # A link that just failed is not hammered: commands re-queued by its failure wait.
        pause = self._paused.get(device_id)
        if pause is not None:
            left = pause - asyncio.get_running_loop().time()
            if left > 0:
                await asyncio.sleep(left)
            self._paused.pop(device_id, None)
        if self._distributed and only_broker(self._links.links(device_id)):
            await asyncio.sleep(_BROKER_GRACE_S)
        await self._flush_now(device_id)

    async def _flush_now(self, device_id: UUID) -> None:
        """Deliver the device's QUEUED commands in creation order through its links here."""
        lock = self._device_locks.setdefault(device_id, asyncio.Lock())
        async with lock:
            self._pending_flush.discard(device_id)
            failed: set[int] = set()
            while True:
                links = self._command_links(device_id, failed)
                if not links:
                    break
                claimed = await self._store.control.claim_next_command(
                    None, device_id, now_ms(), only_if_next=self._sequential
                )
                if claimed is None:
                    break
                self._announce(claimed.command)
                link = links[0]
                outcome = await self._deliver(claimed.command, link)
                if outcome is _Outcome.LINK_FAILED:
                    failed.add(id(link))
                    self._link_failed(device_id)
                    continue  # the command is QUEUED again: another link may take it
                self._failures.pop(device_id, None)
                if self._sequential and outcome is not _Outcome.DONE:
                    break  # one at a time: the event that frees the device starts the next
                if not claimed.more:
                    break
        self._forget_lock(device_id, lock)

    def _link_failed(self, device_id: UUID) -> None:
        """Pause the device's deliveries, longer after each failure in a row."""
        failures = self._failures.get(device_id, 0) + 1
        self._failures[device_id] = failures
        pause = min(_LINK_FAILED_PAUSE_S * 2 ** min(failures - 1, 10), _LINK_FAILED_PAUSE_MAX_S)
        self._paused[device_id] = asyncio.get_running_loop().time() + pause

    async def _deliver_claimed(self, sent: Command, lock: asyncio.Lock) -> None:
        """Deliver a command claimed as it was stored (`send`), then free the device's lock
        that `send` took."""
        device_id = sent.device_id
        try:
            links = self._command_links(device_id)
            if links:
                outcome: _Outcome | None = await self._deliver(sent, links[0])
            else:  # the link went while the command was stored: wait for the next one
                self._delivering.pop(sent.id, None)
                await self._move(
                    sent, "QUEUED", ("SENT",), error="the device's link closed", add_attempts=-1
                )
                if not sent.persistent:
                    self._spawn(self._fail_unclaimed(sent))
                outcome = None
        finally:
            self._release(device_id, lock)
        if outcome is _Outcome.LINK_FAILED:
            self._link_failed(device_id)
            self._schedule_flush(device_id)  # QUEUED again: the device's other links
        elif outcome is not None:
            self._failures.pop(device_id, None)

    async def _deliver(self, sent: Command, link: DeviceLink) -> _Outcome:
        """One attempt through one link of a command just claimed (SENT)."""
        outbound = OutboundCommand(sent.id, sent.method, sent.params, sent.oneway)
        self._delivering.setdefault(sent.id, False)
        try:
            confirmed = await link.deliver_command(outbound)
        except Exception as exc:  # a broken adapter must not lose the command either
            if isinstance(exc, DeliveryFailed):
                log.info("command %s not delivered over %s: %s", sent.id, link.protocol, exc)
            else:
                log.exception("link %s failed delivering command %s", link.protocol, sent.id)
            # The device never had it: the attempt does not count against its retries.
            await self._move(
                sent, "QUEUED", ("SENT",), error=f"delivery failed: {exc}", add_attempts=-1
            )
            return _Outcome.LINK_FAILED
        finally:
            answered = self._delivering.pop(sent.id, False)
        if answered:
            return _Outcome.DONE  # the answer came first and recorded DELIVERED with it
        if confirmed:
            deadline = None if sent.oneway else now_ms() + sent.timeout_ms
            delivered = await self._move(sent, "DELIVERED", ("SENT",), deadline=deadline)
            if delivered is not None and delivered.final:
                return _Outcome.DONE
        return _Outcome.IN_FLIGHT

    async def _fail_unclaimed(self, command: Command) -> None:
        """A lightweight command for a device not connected here is FAILED unless a link
        takes it soon: a device between two long polls or reconnecting (or, with split
        roles, connected to another process) is not offline."""
        await asyncio.sleep(_UNCLAIMED_GRACE_S if self._distributed else _RECONNECT_GRACE_S)
        if self._sequential:
            busy = await self._store.control.command_in_flight(None, command.device_id)
            if busy is not None:
                return  # waiting its turn behind another command; its timeout still applies
        await self._move(
            command,
            "FAILED",
            CLAIMABLE,
            error="the device is not connected"
            + (" to any platform process" if self._distributed else ""),
        )

    # --- state changes and events --------------------------------------------------------
    async def _move(
        self,
        command: Command,
        to: str,
        allowed_from: tuple[str, ...],
        *,
        deadline: int | None = None,
        error: str | None = None,
        add_attempts: int = 0,
    ) -> Command | None:
        """Move the command if it is in one of `allowed_from`; announce the change."""
        moved = await self._store.control.transition_command(
            None,
            command.id,
            to,
            allowed_from,
            now_ms(),
            deadline=deadline,
            error=error,
            add_attempts=add_attempts,
        )
        if moved is not None:
            self._announce(moved)
        return moved

    def _announce(self, command: Command) -> None:
        self._metrics.command_transitions.labels(command.status).inc()
        self._waiters.changed_here(command)
        self._bus.publish(
            RecordEvent(
                "command", command.status, command.tenant_id, command.device_id, command.rest()
            )
        )

    async def _listen(self) -> None:
        """Bus events (local and from other processes): wake waiters, deliver queued ones."""
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            if not isinstance(event, RecordEvent) or event.topic != "command":
                continue
            try:
                command_id = UUID(str(event.data["id"]))
            except (KeyError, ValueError):
                continue
            self._waiters.heard(command_id, event.data)
            if event.kind == "QUEUED" and command_id in self._delivering:
                continue  # claimed as it was stored, a link here has it: no round to start
            device_id = event.device_id
            wanted = event.kind == "QUEUED" or (
                self._sequential and frees_device(event.kind, event.data)
            )
            if wanted and device_id and self._links.connected(device_id):
                self._schedule_flush(device_id)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("command task failed: %s", task.exception())
