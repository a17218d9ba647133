"""Telemetry retention: removes each tenant's raw points older than its `retention_days`.

Runs inside the platform (roles `all` and `ingest`) every `IIOT_RETENTION_INTERVAL_S`
seconds. The store deletes in small batches, each its own short transaction, so neither
ingestion nor readers wait behind it. Latest values are kept: a device that stopped
sending still shows its last value.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Self

from prometheus_client import Counter, Gauge

from iiot.errors import IIoTError
from iiot.services import Services
from iiot.supervisor import cancel_and_wait

__all__ = ["RetentionJob"]

log = logging.getLogger(__name__)

_DAY_MS = 86_400_000
# The first run waits a little so that start-up (migrations, protocols) goes first.
_FIRST_RUN_MAX_DELAY_S = 30.0


class RetentionJob:
    """Applies every tenant's telemetry retention on a schedule."""

    name = "retention"

    def __init__(self, services: Services) -> None:
        self._services = services
        self._interval = services.settings.retention_interval_s
        self._task: asyncio.Task[None] | None = None
        registry = services.metrics.registry
        self.deleted_points = Counter(
            "iiot_retention_deleted_points",
            "Telemetry points removed by retention",
            registry=registry,
        )
        self.last_success = Gauge(
            "iiot_retention_last_success_timestamp_seconds",
            "Unix time of the last complete retention run",
            registry=registry,
        )

    def describe(self) -> str:
        """Start-up log line."""
        return f"retention: every {self._interval} s, per tenant's retention_days"

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._loop(), name="retention")
        self._services.health.set(self.name, "up", f"every {self._interval} s")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self._services.health.set(self.name, "off", "stopped")

    async def run_once(self) -> int:
        """Apply every tenant's retention now; returns the number of points removed."""
        store = self._services.store
        now_ms = time.time_ns() // 1_000_000
        removed = 0
        offset = 0
        while True:
            page = await store.list_tenants(None, 500, offset)
            for tenant in page.items:
                if not tenant.retention_days:
                    continue
                cutoff = now_ms - tenant.retention_days * _DAY_MS
                deleted = await store.delete_telemetry_before(tenant.id, cutoff)
                if deleted:
                    log.info(
                        "retention: removed %d points of tenant %r older than %d days",
                        deleted,
                        tenant.name,
                        tenant.retention_days,
                    )
                removed += deleted
                self.deleted_points.inc(deleted)
            offset += len(page.items)
            if not page.items or offset >= page.total:
                break
        self.last_success.set(time.time())
        return removed

    async def _loop(self) -> None:
        await asyncio.sleep(min(self._interval, _FIRST_RUN_MAX_DELAY_S))
        failing = False
        while True:
            try:
                await self.run_once()
            except IIoTError as exc:  # database down: try again at the next run
                if not failing:
                    log.error("retention run failed (retrying every %d s): %s", self._interval, exc)
                failing = True
                self._services.health.set(self.name, "up", f"last run failed: {exc}")
            except Exception as exc:  # a scheduled job must outlive one bad run; logged in full
                if not failing:
                    log.exception("retention run failed (retrying every %d s)", self._interval)
                failing = True
                self._services.health.set(self.name, "up", f"last run failed: {exc}")
            else:
                if failing:
                    log.warning("retention runs again")
                failing = False
                self._services.health.set(self.name, "up", f"every {self._interval} s")
            await asyncio.sleep(self._interval)
