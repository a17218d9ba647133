"""`WebhookSender`: delivers the webhook outbox, signed, with exponential backoff.

Events are written to the outbox in the database in the same transaction as the change
they report, so a crash between the change and its delivery loses nothing: the next
start sends it. Each attempt is logged (`GET /api/webhooks/{id}/deliveries`). A
delivery is claimed for a lease, so several platform processes never send it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from typing import Final, Self
from uuid import UUID

import httpx

from iiot.alarms.model import OutboxItem, event_body
from iiot.bus import LiveEvent, RecordEvent, record_topics
from iiot.errors import IIoTError
from iiot.services import Services
from iiot.supervisor import cancel_and_wait

__all__ = [
    "COMMAND_DONE",
    "EVENTS",
    "MAX_AGE_MS",
    "WEBHOOK_TOPIC",
    "WebhookSender",
    "backoff_ms",
    "sign",
]

log = logging.getLogger(__name__)

EVENTS = (
    "alarm.raised",
    "alarm.updated",
    "alarm.acked",
    "alarm.cleared",
    "command.completed",
)
# Command states after which nothing more happens to a command.
COMMAND_DONE = frozenset({"SUCCESSFUL", "FAILED", "TIMEOUT", "EXPIRED", "CANCELED"})
MAX_AGE_MS = 24 * 3600 * 1000  # retried for up to 24 h, then abandoned
_FIRST_RETRY_MS = 1000
_MAX_RETRY_MS = 3600 * 1000
_TIMEOUT_S = 10.0
_LEASE_MS = 30_000  # longer than one attempt can take
_POLL_S = 1.0  # other processes' events are found this often
_BATCH = 50


def sign(secret: str, body: bytes) -> str:
    """The `X-IIoT-Signature` header value: sha256=<hex HMAC-SHA256 of the body>."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def backoff_ms(attempts: int) -> int:
    """The wait after `attempts` failed attempts: 1 s, 2 s, 4 s ... at most 1 h."""
    return int(min(_FIRST_RETRY_MS * 2 ** max(attempts - 1, 0), _MAX_RETRY_MS))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# The live bus topic saying a webhook was made or deleted (in any process).
WEBHOOK_TOPIC: Final = "webhook"
# How often the tenants with a command.completed webhook are read again, and at most how
# many webhooks are read for it (beyond that every command event is enqueued, as before).
_HOOKS_REREAD_S = 2.0
_HOOKS_READ_LIMIT = 1000


class WebhookSender:
    """Sends due outbox items; woken at once by local alarm changes."""

    name = "webhooks"

    def __init__(self, services: Services) -> None:
        """Nothing runs before `__aenter__`."""
        if services.alarms is None:
            raise RuntimeError("the webhook sender needs services.alarms")
        self._services = services
        self._alarms = services.alarms
        self._wake = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._events_task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[LiveEvent] | None = None
        # Tenants with a webhook for command.completed (None: not known, enqueue for all),
        # and when they were read (event loop time).
        self._command_hook_tenants: set[UUID] | None = None
        self._command_hooks_read_at = float("-inf")

    async def __aenter__(self) -> Self:
        """Start sending."""
        self._client = httpx.AsyncClient(timeout=_TIMEOUT_S, follow_redirects=False)
        self._alarms.listen(self._on_alarm)
        self._queue = self._services.bus.subscribe(wants=record_topics(WEBHOOK_TOPIC, "command"))
        self._task = asyncio.create_task(self._run(), name="webhook-sender")
        self._events_task = asyncio.create_task(self._follow_commands(), name="webhook-commands")
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop; what is not delivered stays in the outbox for the next start."""
        self._alarms.unlisten(self._on_alarm)
        for task in (self._task, self._events_task):
            await cancel_and_wait(task)
        if self._queue is not None:
            self._services.bus.unsubscribe(self._queue)
        if self._client is not None:
            await self._client.aclose()

    def describe(self) -> str:
        """One line for the start-up log."""
        return "webhook sender (outbox in the database)"

    def _on_alarm(self, event: RecordEvent) -> None:
        self._wake.set()

    async def _wants_command_events(self, tenant_id: UUID) -> bool:
        """Whether the tenant has a webhook for command.completed; the webhooks are read
        again at most every `_HOOKS_REREAD_S` (one made in another process counts then)."""
        now = asyncio.get_running_loop().time()
        if now - self._command_hooks_read_at >= _HOOKS_REREAD_S:
            self._command_hooks_read_at = now
            try:
                page = await self._alarms.store.list_webhooks(None, _HOOKS_READ_LIMIT, 0)
            except IIoTError:
                self._command_hook_tenants = None
            else:
                self._command_hook_tenants = (
                    None
                    if page.total > len(page.items)
                    else {w.tenant_id for w in page.items if "command.completed" in w.events}
                )
        tenants = self._command_hook_tenants
        return tenants is None or tenant_id in tenants  # None: not known, so every tenant

    async def _follow_commands(self) -> None:
        """Queue `command.completed` for commands that reached a final state."""
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            if not isinstance(event, RecordEvent):
                continue
            if event.topic == WEBHOOK_TOPIC:
                self._command_hooks_read_at = float("-inf")  # read them again when needed
                continue
            if event.topic != "command":
                continue
            if event.kind.upper() not in COMMAND_DONE:
                continue
            if not await self._wants_command_events(event.tenant_id):
                continue  # no statement per command for tenants without such a webhook
            command_id = str(event.data.get("id", ""))
            event_id = f"command.completed:{command_id}"  # once, whichever process saw it
            body = event_body(
                event_id, "command.completed", _now_ms(), event.tenant_id, dict(event.data)
            )
            try:
                if await self._alarms.store.enqueue_event(
                    event.tenant_id, "command.completed", event_id, body
                ):
                    self._wake.set()
            except IIoTError as exc:
                log.warning("command.completed of %s not queued: %s", command_id, exc)

    async def _run(self) -> None:
        while True:
            try:
                items = await self._alarms.store.claim_outbox(_now_ms(), _BATCH, _LEASE_MS)
            except IIoTError as exc:
                log.warning("webhook outbox unavailable: %s", exc)
                items = []
            if items:
                await asyncio.gather(*(self._deliver(item) for item in items))
                continue
            self._wake.clear()
            wait = _POLL_S
            with contextlib.suppress(IIoTError):
                due = await self._alarms.store.next_outbox_due()
                if due is not None:
                    wait = min(wait, max(0.0, (due - _now_ms()) / 1000))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):  # not wait_for: see cancel_and_wait
                    await self._wake.wait()

    async def _deliver(self, item: OutboxItem) -> None:
        assert self._client is not None
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            answer = await self._client.post(
                item.url,
                content=item.body,
                headers={
                    "Content-Type": "application/json",
                    "X-IIoT-Event": item.event,
                    "X-IIoT-Delivery": item.event_id,
                    "X-IIoT-Signature": sign(item.secret, item.body),
                },
            )
            status = answer.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except Exception as exc:  # any failure (network, a URL httpx refuses) is retried
            error = f"{type(exc).__name__}: {exc}"[:500]
        now = _now_ms()
        duration = int((time.monotonic() - started) * 1000)
        if error is None:
            next_at, outcome = None, "delivered"
        else:
            next_at = now + backoff_ms(item.attempts + 1)
            outcome = "retrying"
            if next_at - item.created_at > MAX_AGE_MS:
                next_at, outcome = None, "abandoned"
                log.warning("webhook event %s to %s abandoned after 24 h", item.event_id, item.url)
        try:
            await self._alarms.store.finish_attempt(
                item, now, status, error, duration, next_at, outcome
            )
        except IIoTError as exc:  # the lease runs out and the item is tried again
            log.warning("webhook attempt not recorded: %s", exc)
