"""Which of a device's links a command goes through."""

from __future__ import annotations

from collections.abc import Iterable

from iiot.links import DeviceLink

__all__ = ["by_preference", "only_broker"]


def by_preference(links: Iterable[DeviceLink]) -> list[DeviceLink]:
    """Links that can prove delivery first (an external broker cannot), newest first: the
    device's latest connection is the one most likely alive."""
    ordered = list(links)
    ordered.reverse()
    ordered.sort(key=lambda link: not getattr(link, "confirms_delivery", True))
    return ordered


def only_broker(links: Iterable[DeviceLink]) -> bool:
    """Whether the device listens for commands here, but on no link that can prove delivery
    (only through an external broker)."""
    proofs = [getattr(link, "confirms_delivery", True) for link in links if link.listens_commands]
    return bool(proofs) and not any(proofs)
