"""What a protocol adapter is: an async context manager built from `Services`.

An adapter only translates: protocol message -> `Ingestor.ingest...` -> answer the peer once
the points are committed. Adapters never import storage implementations or the API.
"""

from __future__ import annotations

from typing import Protocol, Self

from iiot.services import Services

__all__ = ["Component"]


class Component(Protocol):
    """A long-lived part of the platform started and stopped by the composition root."""

    name: str

    def __init__(self, services: Services) -> None: ...

    async def __aenter__(self) -> Self:
        """Start listening (or connecting); report state on `services.health`."""
        ...

    async def __aexit__(self, *exc: object) -> None:
        """Stop and release every socket and task."""
        ...

    def describe(self) -> str:
        """One line for the start-up log, e.g. `MQTT 0.0.0.0:1883 (embedded broker)`."""
        ...
