"""OPC UA server (asyncua): live device values, `SetStatus`, history from the store.

Endpoint `opc.tcp://{host}:{port}/iiot/`, namespace `urn:iiot:platform`, address space
`Objects/Tenants/{tenant}/{device}/{key | Status | SetStatus}`. Users log in with platform
credentials over Basic256Sha256 (Sign or SignAndEncrypt); the `None` policy and anonymous
login exist only with `IIOT_OPCUA_ALLOW_NONE=1`. The parts live in `opcua_*` modules.
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self
from uuid import UUID

from asyncua import ua as _ua

from iiot.adapters import opcua_ids as ids
from iiot.adapters.opcua_access import CURRENT_USER, NodeOwners, TenantInternalServer
from iiot.adapters.opcua_auth import PlatformUserManager
from iiot.adapters.opcua_commands import CommandNodes
from iiot.adapters.opcua_history import StoreHistory
from iiot.adapters.opcua_live import PUBLISH_INTERVAL_S
from iiot.adapters.opcua_pki import APPLICATION_URI, Pki
from iiot.adapters.opcua_space import AddressSpaceSync, MethodCallback
from iiot.adapters.opcua_transport import PlatformServer
from iiot.bus import LiveEvent, RecordEvent
from iiot.control.rules import CommandRequest
from iiot.errors import ConfigError, NotFound, StorageUnavailable
from iiot.services import Services
from iiot.supervisor import cancel_and_wait

if TYPE_CHECKING:
    from iiot.adapters.opcua_alarms import OpcUaAlarms

__all__ = ["NAMESPACE_URI", "OpcUaServer"]

# asyncua's `ua` types are generated NewTypes that mypy cannot follow; treat them as Any.
ua: Any = _ua

log = logging.getLogger(__name__)

NAMESPACE_URI = "urn:iiot:platform"
MAX_STATUS_CHARS = 64  # as the REST API


def _mirrored(event: LiveEvent) -> bool:
    """The bus events the address space follows: every one but the records of commands,
    alarms (`opcua_alarms`), rules and webhooks, which change no node here."""
    return not isinstance(event, RecordEvent) or event.topic in ("connectivity", "attributes")


class OpcUaServer:
    """The platform's OPC UA server component."""

    name = "opcua"

    def __init__(self, services: Services) -> None:
        self._services = services
        settings = services.settings
        self._host = settings.bind_host
        self._port = settings.opcua_port
        self._allow_none = settings.opcua_allow_none
        self.pki = Pki(settings.data_dir / "pki")
        self._server: PlatformServer | None = None
        self._started = False
        self._sync: AddressSpaceSync | None = None
        self._queue: asyncio.Queue[LiveEvent] | None = None
        self._task: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._ns = -1
        self._control: CommandNodes | None = None  # SendCommand and attribute nodes
        self._alarms: OpcUaAlarms | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint URL clients connect to."""
        return f"opc.tcp://{self._host}:{self._port}/iiot/"

    def describe(self) -> str:
        """One line for the start-up log."""
        policies = "Basic256Sha256 Sign/SignAndEncrypt"
        if self._allow_none:
            policies += " + None/anonymous (IIOT_OPCUA_ALLOW_NONE=1)"
        return f"OPC UA {self.endpoint} ({policies})"

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            self._services.health.set(self.name, "down", "failed to start")
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()
        self._services.health.set(self.name, "off", "stopped")
        self._services.metrics.component_up.labels(self.name).set(0)

    async def _start(self) -> None:
        services = self._services
        _quiet_asyncua()
        await asyncio.to_thread(self.pki.ensure_server_certificate)
        owners = NodeOwners()
        users = PlatformUserManager(services, allow_anonymous=self._allow_none)
        server = PlatformServer(TenantInternalServer(users, owners), users)
        self._server = server
        server.iserver.history_manager.set_storage(StoreHistory(services.store, self._locate))
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("IIoT platform")
        server.product_uri = NAMESPACE_URI
        await server.set_application_uri(APPLICATION_URI)
        self._ns = await server.register_namespace(NAMESPACE_URI)
        owners.namespace = self._ns
        policies = [
            ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ua.SecurityPolicyType.Basic256Sha256_Sign,
        ]
        tokens: list[type] = [ua.UserNameIdentityToken]
        if self._allow_none:
            policies.append(ua.SecurityPolicyType.NoSecurity)
            tokens.append(ua.AnonymousIdentityToken)
        server.set_security_policy(policies)
        server.set_identity_tokens(tokens)
        await server.load_certificate(str(self.pki.cert_path))
        await server.load_private_key(str(self.pki.key_path))
        server.set_certificate_validator(self.pki.validate)

        # Subscribe before reading the store so no change between the two is missed.
        self._queue = services.bus.subscribe(wants=_mirrored)
        self._sync = AddressSpaceSync(
            server, self._ns, services.store, owners, self._set_status_for
        )
        await self._sync.build()
        self._control = CommandNodes(server, self._ns, services)
        await self._control.build()
        if services.alarms is not None:
            from iiot.adapters.opcua_alarms import OpcUaAlarms

            self._alarms = OpcUaAlarms(server, self._ns, services)
            await self._alarms.start()
        try:
            await server.start()
        except OSError as exc:
            raise ConfigError(
                f"IIOT_OPCUA_PORT={self._port} cannot be used on {self._host}: {exc.strerror}"
            ) from None
        self._started = True
        self._task = asyncio.create_task(self._follow(self._queue, self._sync), name="opcua-sync")
        self._publisher = asyncio.create_task(self._publish(self._sync), name="opcua-publish")
        services.health.set(self.name, "up", f"listening on {self._host}:{self._port}")
        services.metrics.component_up.labels(self.name).set(1)

    async def _stop(self) -> None:
        await cancel_and_wait(self._publisher)
        self._publisher = None
        if self._alarms is not None:
            await self._alarms.stop()
            self._alarms = None
        await cancel_and_wait(self._task)
        self._task = None
        if self._queue is not None:
            self._services.bus.unsubscribe(self._queue)
            self._queue = None
        if self._server is not None and self._started:
            await self._server.stop()
        self._started = False
        self._server = None

    async def _follow(self, queue: asyncio.Queue[LiveEvent], sync: AddressSpaceSync) -> None:
        """Apply live events to the address space until cancelled."""
        while True:
            event = await queue.get()
            try:
                await sync.apply(event)
                if self._control is not None:
                    await self._control.apply(event)
            except StorageUnavailable:
                log.warning("OPC UA: database unavailable while applying a live event; skipped")
            except Exception:  # one bad event must not stop live values for every client
                log.exception("OPC UA: cannot apply live event %r", type(event).__name__)

    async def _publish(self, sync: AddressSpaceSync) -> None:
        """Once per publishing interval, notify subscriptions of the values that changed."""
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            try:
                await sync.publish()
            except Exception:  # keep publishing: the next interval may succeed
                log.exception("OPC UA: cannot publish live values")

    def _locate(self, nodeid: ua.NodeId) -> tuple[UUID, str] | None:
        return ids.parse_telemetry_node(self._ns, nodeid)

    # --- SetStatus ---------------------------------------------------------------------
    def _set_status_for(self, device_id: UUID) -> MethodCallback:
        async def set_status(parent: ua.NodeId, *args: Any) -> ua.StatusCode | list[ua.Variant]:
            return await self._set_status(device_id, parent, args)

        return set_status

    async def _set_status(
        self, device_id: UUID, parent: ua.NodeId, args: Sequence[Any]
    ) -> ua.StatusCode | list[ua.Variant]:
        """Change a device's status for the calling user (tenant admin or sysadmin)."""
        if parent != ids.device_node(self._ns, device_id):
            return ua.StatusCode(ua.StatusCodes.BadMethodInvalid)
        user = CURRENT_USER.get()
        tenant = self._sync.device_tenant(device_id) if self._sync else None
        if tenant is None:
            return ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown)
        if user is None or not user.can_change(tenant):
            return ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)
        status = parse_status(args)
        if status is None:
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        try:
            device = await self._services.registry.update_device(None, device_id, status=status)
        except NotFound:
            return ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown)
        except StorageUnavailable:
            return ua.StatusCode(ua.StatusCodes.BadResourceUnavailable)
        # The device hears of it as a persistent one-way command (delivered when it listens).
        await self._services.commands.send(
            None,
            device,
            CommandRequest("SetStatus", {"status": status}, oneway=True, persistent=True),
            None,
        )
        log.info("OPC UA: %s set status of device %s to %r", user.name, device_id, status)
        return []


def parse_status(args: Sequence[Any]) -> str | None:
    """The one String argument of SetStatus, cleaned; None when it is not acceptable."""
    if len(args) != 1:
        return None
    arg = args[0]
    value = arg.Value if isinstance(arg, ua.Variant) else arg
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not 1 <= len(text) <= MAX_STATUS_CHARS:
        return None
    if any(unicodedata.category(c).startswith("C") for c in text):
        return None  # control characters have no place in a status shown in dashboards
    return text


def _quiet_asyncua() -> None:
    # asyncua logs every request at INFO; keep the platform's log readable.
    logger = logging.getLogger("asyncua")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
