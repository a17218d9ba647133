"""The alarm components a platform process runs next to its protocol adapters."""

from __future__ import annotations

from iiot.adapters.base import Component
from iiot.services import Services

__all__ = ["alarm_components"]


def alarm_components(services: Services) -> list[Component]:
    """The rule engine, and the AMQP alarm publisher when AMQP is on."""
    from iiot.alarms.engine import AlarmEngine

    components: list[Component] = [AlarmEngine(services)]
    if services.settings.amqp_url:
        from iiot.alarms.amqp_publisher import AlarmAmqpPublisher

        components.append(AlarmAmqpPublisher(services))
    return components
