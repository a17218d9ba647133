"""A lossy UDP proxy for tests: drops a share of datagrams each way, and counts CoAP traffic.

Each client address gets its own upstream socket, so the server sees one remote per client
(as it would without the proxy). The drop decisions come from a seeded random generator so
that a failing run can be repeated.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Self, cast

__all__ = ["LossyUdpProxy", "ProxyStats"]

Address = tuple[str, int]

_COAP_ACK = 2


def coap_header(datagram: bytes) -> tuple[int, int, int] | None:
    """(type, code, message id) of a CoAP datagram, or None if it is too short to be one."""
    if len(datagram) < 4 or datagram[0] >> 6 != 1:
        return None
    return (datagram[0] >> 4) & 0x3, datagram[1], int.from_bytes(datagram[2:4], "big")


@dataclass
class ProxyStats:
    """What the proxy saw, to show that a test exercised the losses it meant to."""

    to_server: int = 0
    to_client: int = 0
    dropped_to_server: int = 0
    dropped_to_client: int = 0
    # Requests whose message id had already reached the server (retransmissions delivered).
    duplicate_requests_delivered: int = 0
    # Retransmitted requests delivered after the server's piggybacked response had been dropped:
    # the server must answer these from its cache instead of storing again.
    replays_after_lost_response: int = 0
    _delivered: set[tuple[Address, int]] = field(default_factory=set, repr=False)
    _lost_responses: set[tuple[Address, int]] = field(default_factory=set, repr=False)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, proxy: LossyUdpProxy, client: Address) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.proxy.from_server(data, self.client)


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, proxy: LossyUdpProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.proxy.from_client(data, addr)


class LossyUdpProxy:
    """Listens on 127.0.0.1:`port` and forwards to `target`, dropping `loss` of each direction."""

    def __init__(self, target: Address, loss: float = 0.1, seed: int = 1) -> None:
        self.target = target
        self.loss = loss
        self.stats = ProxyStats()
        self._random = random.Random(seed)
        self._listener: asyncio.DatagramTransport | None = None
        self._upstreams: dict[Address, _Upstream] = {}
        self._pending: dict[Address, list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Listener(self), local_addr=("127.0.0.1", 0)
        )
        self._listener = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for upstream in self._upstreams.values():
            if upstream.transport is not None:
                upstream.transport.close()
        if self._listener is not None:
            self._listener.close()

    def _drop(self) -> bool:
        return self._random.random() < self.loss

    def from_client(self, data: bytes, client: Address) -> None:
        """Forward a client's datagram to the server (or drop it)."""
        if self._drop():
            self.stats.dropped_to_server += 1
            return
        self.stats.to_server += 1
        header = coap_header(data)
        if header is not None and 1 <= header[1] <= 31:  # a request
            key = (client, header[2])
            if key in self.stats._delivered:
                self.stats.duplicate_requests_delivered += 1
                if key in self.stats._lost_responses:
                    self.stats.replays_after_lost_response += 1
            self.stats._delivered.add(key)
        upstream = self._upstreams.get(client)
        if upstream is not None and upstream.transport is not None:
            upstream.transport.sendto(data)
            return
        # First datagram from this client: open its upstream socket, queue until it is ready.
        self._pending.setdefault(client, []).append(data)
        if client not in self._upstreams:
            self._upstreams[client] = _Upstream(self, client)
            task = asyncio.get_running_loop().create_task(self._connect(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, client: Address) -> None:
        upstream = self._upstreams[client]
        await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: upstream, remote_addr=self.target
        )
        assert upstream.transport is not None
        for data in self._pending.pop(client, []):
            upstream.transport.sendto(data)

    def from_server(self, data: bytes, client: Address) -> None:
        """Forward the server's datagram to the client (or drop it)."""
        header = coap_header(data)
        if self._drop():
            self.stats.dropped_to_client += 1
            if header is not None and header[0] == _COAP_ACK and header[1] != 0:
                self.stats._lost_responses.add((client, header[2]))
            return
        self.stats.to_client += 1
        if self._listener is not None:
            self._listener.sendto(data, client)
