"""10,000 confirmable CoAP POSTs through a lossy link store every point exactly once.

A proxy drops 10% of the datagrams each way. A lost request is retransmitted by the client
with the same message id; a lost response makes the client retransmit too, and the server
must answer that from aiocoap's duplicate cache instead of storing the message again.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from uuid import UUID

import aiocoap
import httpx
from aiocoap import error as coap_error
from aiocoap.numbers import TransportTuning
from aiocoap.numbers.codes import Code

from iiot.storage.base import TelemetryQuery
from tests.support import free_port, platform_env, platform_process, running_platform
from tests.udp_proxy import LossyUdpProxy

MESSAGES = 10_000
CLIENTS = 64  # aiocoap keeps one confirmable exchange open per peer (NSTART=1)
BASE_TS = 1_767_225_600_000


class _LossyLinkTuning(TransportTuning):  # type: ignore[misc]
    """Retransmit sooner than the 2 s default (loopback) and more often (10% loss each way)."""

    ACK_TIMEOUT = 0.2
    MAX_RETRANSMIT = 8


async def _send_share(proxy_port: int, token: str, indexes: range, resends: list[int]) -> None:
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        uri = f"coap://127.0.0.1:{proxy_port}/api/v1/{token}/telemetry"
        for i in indexes:
            # An explicit ts makes a re-sent message (a new exchange) land on the same row.
            payload = f'{{"ts": {BASE_TS + i}, "values": {{"seq": {i}}}}}'.encode()
            for _attempt in range(5):
                request = aiocoap.Message(
                    code=Code.POST,
                    uri=uri,
                    payload=payload,
                    content_format=50,
                    transport_tuning=_LossyLinkTuning(),
                )
                try:
                    response = await asyncio.wait_for(context.request(request).response, 60)
                except (coap_error.ConRetransmitsExceeded, TimeoutError):
                    resends.append(i)  # the client gave up: send again as a new request
                    continue
                assert response.code == Code.CHANGED, (response.code, response.payload)
                break
            else:
                raise AssertionError(f"message {i} not acknowledged after 5 attempts")
    finally:
        await context.shutdown()


async def _create_device(env: dict[str, str]) -> tuple[UUID, str]:
    """A device in the platform's database, created before the platform starts."""
    async with running_platform(env) as platform:
        services = platform.services
        tenant = await services.store.create_tenant("lossy")
        device, token = await services.registry.create_device(tenant.id, "sensor")
    return device.id, token


def _coap_messages_received(http_port: int) -> float:
    """`iiot_messages_received_total{protocol="coap"}` from the platform's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('iiot_messages_received_total{protocol="coap"}'):
            return float(line.split()[-1])
    raise AssertionError("no CoAP message counter in /metrics")


async def test_confirmable_posts_through_lossy_link_are_stored_exactly_once(
    tmp_path: Path,
) -> None:
    coap_port, http_port = free_port(socket.SOCK_DGRAM), free_port()
    env = platform_env(tmp_path, IIOT_BATCH_MAX_DELAY_MS="0")
    device_id, token = await _create_device(env)
    resends: list[int] = []
    # The platform runs in its own process, as in production, so that the clients and
    # the proxy in this process do not compete with the server for one event loop.
    served = {**env, "IIOT_COAP_PORT": str(coap_port), "IIOT_HTTP_PORT": str(http_port)}
    with platform_process(served):
        async with LossyUdpProxy(("127.0.0.1", coap_port), loss=0.1, seed=5683) as proxy:
            await asyncio.wait_for(
                asyncio.gather(
                    *(
                        _send_share(proxy.port, token, range(c, MESSAGES, CLIENTS), resends)
                        for c in range(CLIENTS)
                    )
                ),
                300,
            )
        received = await asyncio.to_thread(_coap_messages_received, http_port)
    async with running_platform(env) as platform:
        stored = await platform.services.store.query_telemetry(
            None,
            device_id,
            TelemetryQuery(
                start=BASE_TS, end=BASE_TS + MESSAGES, keys=("seq",), limit=2 * MESSAGES
            ),
        )

    rows = stored["seq"]
    assert len(rows) == MESSAGES
    assert rows == [(BASE_TS + i, i) for i in range(MESSAGES)]
    # The losses really happened both ways, and retransmissions reached the server, some of
    # them after the server's answer had been lost.
    stats = proxy.stats
    assert stats.dropped_to_server > 0 and stats.dropped_to_client > 0
    assert stats.replays_after_lost_response > 0
    # Handled exactly once per exchange: retransmissions were answered from the duplicate
    # cache; only the client's own re-sends (new exchanges) could be handled again.
    assert MESSAGES <= received <= MESSAGES + len(resends)
    assert stats.duplicate_requests_delivered > len(resends)
