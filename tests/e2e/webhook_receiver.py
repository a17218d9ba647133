"""A real HTTP server receiving webhooks: answers 500 a given number of times per event."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Receiver", "receiver"]


@dataclass
class Receiver:
    """What arrived: every attempt, and the bodies answered 200 (with their signatures)."""

    port: int
    secret: str
    fail_first: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0

    def verify(self, body: bytes, header: str) -> bool:
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, header)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            delivery = headers.get("x-iiot-delivery", "")
            seen = self.attempts.get(delivery, 0) + 1
            self.attempts[delivery] = seen
            if not self.verify(body, headers.get("x-iiot-signature", "")):
                self.bad_signatures += 1
            status = 500 if seen <= self.fail_first else 200
            if status == 200:
                self.accepted.append(json.loads(body))
            reason = b"OK" if status == 200 else b"Internal Server Error"
            writer.write(
                b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                % (status, reason)
            )
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def receiver(port: int, secret: str, fail_first: int = 0) -> AsyncIterator[Receiver]:
    """A receiver listening on 127.0.0.1:port until the block ends."""
    state = Receiver(port, secret, fail_first)
    server = await asyncio.start_server(state.handle, "127.0.0.1", port, reuse_address=True)
    async with server:
        yield state
