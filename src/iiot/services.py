"""What every component is handed by the composition root (no globals anywhere)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from iiot.bus import LiveBus
from iiot.config import Settings
from iiot.control.attributes import AttributeService
from iiot.control.commands import CommandService
from iiot.device_identity import DeviceIdentity
from iiot.ingest import Ingestor
from iiot.links import DeviceInbox, DeviceLinks, UnsupportedInbox
from iiot.metrics import Metrics
from iiot.pipeline import Pipeline
from iiot.presence import Presence
from iiot.registry import DeviceRegistry
from iiot.storage.base import Store

if TYPE_CHECKING:
    from iiot.alarms.service import AlarmService

__all__ = ["Health", "HealthBoard", "Services"]

State = Literal["up", "down", "off"]


@dataclass(slots=True)
class Health:
    """A component's readiness: up, down (with why) or off (with why)."""

    state: State
    detail: str = ""


@dataclass(slots=True)
class HealthBoard:
    """Readiness of every component, reported by the components themselves."""

    components: dict[str, Health] = field(default_factory=dict)
    # True while the platform is still starting its components: readiness waits for all of
    # them (the API answers before the components started after it have registered).
    starting: bool = False

    def set(self, name: str, state: State, detail: str = "") -> None:
        """Record a component's state."""
        self.components[name] = Health(state, detail)


@dataclass(slots=True)
class Services:
    """The platform's shared parts, built once by `app.Platform`."""

    settings: Settings
    store: Store
    bus: LiveBus
    metrics: Metrics
    registry: DeviceRegistry
    pipeline: Pipeline
    ingestor: Ingestor
    commands: CommandService
    attributes: AttributeService
    health: HealthBoard
    # Certificate logins and gateway children (`device_identity.py`).
    identity: DeviceIdentity
    # The way back to devices: adapters attach links; services push and receive through them.
    links: DeviceLinks = field(default_factory=DeviceLinks)
    inbox: DeviceInbox = field(default_factory=UnsupportedInbox)
    # Messages seen per device, written in batches by the presence tracker.
    presence: Presence = field(default_factory=Presence)
    # Alarms and rules (set by the composition root; None only in bare test setups).
    alarms: AlarmService | None = None
