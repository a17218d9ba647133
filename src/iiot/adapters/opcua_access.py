"""Per-tenant access control for OPC UA sessions.

asyncua's permission rules only see the service type, not the nodes, so every external
session is a `TenantSession`: each request item naming another tenant's node gets
`BadUserAccessDenied`, and Browse/TranslateBrowsePaths leave other tenants' nodes out.
Platform node ids carry their owner (`tenant:{id}`, `device:{id}:...`), so the check is a
dictionary lookup per item.
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

from asyncua import ua as _ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.user_managers import UserManager

from iiot.adapters.opcua_auth import PlatformUser, PlatformUserManager

__all__ = ["CURRENT_USER", "NodeOwners", "TenantInternalServer", "TenantSession"]

# asyncua's `ua` types are generated NewTypes that mypy cannot follow; treat them as Any.
ua: Any = _ua

T = TypeVar("T")
R = TypeVar("R")

# The user of the session whose Call request is being served (method callbacks get no session).
CURRENT_USER: contextvars.ContextVar[PlatformUser | None] = contextvars.ContextVar(
    "opcua_current_user", default=None
)

# Owner of a platform node whose device is unknown: matches no tenant, so only
# all-tenant users pass (the node does not exist anyway).
_NOBODY = UUID(int=0)
_ANONYMOUS = User(role=UserRole.Anonymous)
_UUID_LEN = 36


class NodeOwners:
    """Which tenant owns a node of the platform namespace (kept up to date by the sync)."""

    def __init__(self) -> None:
        self.namespace = -1  # set once the namespace is registered
        self.device_tenants: dict[UUID, UUID] = {}

    def tenant_of(self, nodeid: ua.NodeId) -> UUID | None:
        """The owning tenant; None for nodes of no tenant (standard nodes, `Tenants`)."""
        if nodeid.NamespaceIndex != self.namespace or not isinstance(nodeid.Identifier, str):
            return None
        ident = nodeid.Identifier
        if ident.startswith("tenant:"):
            return _parse_uuid(ident[7 : 7 + _UUID_LEN]) or _NOBODY
        if ident.startswith("device:"):
            device_id = _parse_uuid(ident[7 : 7 + _UUID_LEN])
            if device_id is None:
                return _NOBODY
            return self.device_tenants.get(device_id, _NOBODY)
        return None


def _parse_uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


def _denied() -> ua.StatusCode:
    return ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)


class TenantSession(InternalSession):
    """An external client's session that only sees its user's tenant."""

    owners: NodeOwners

    def _platform_user(self) -> PlatformUser | None:
        user = self.user
        return user if isinstance(user, PlatformUser) else None

    def visible(self, nodeid: ua.NodeId) -> bool:
        """Whether this session's user may see the node."""
        tenant = self.owners.tenant_of(nodeid)
        if tenant is None:
            return True
        user = self._platform_user()
        return user is not None and user.can_see(tenant)

    async def _filtered(
        self,
        items: Sequence[T],
        nodeids: Callable[[T], Sequence[ua.NodeId]],
        serve: Callable[[list[T]], Awaitable[list[R]]],
        refuse: Callable[[], R],
    ) -> list[R]:
        """Serve the visible items, answer the others with `refuse()`, in request order."""
        user = self._platform_user()
        manager = self.iserver.user_manager
        if user is not None and isinstance(manager, PlatformUserManager):
            await manager.refresh(user)  # a deleted or demoted user loses rights at once
        mask = [all(self.visible(n) for n in nodeids(item)) for item in items]
        if all(mask):
            return await serve(list(items))
        allowed = [item for item, ok in zip(items, mask, strict=True) if ok]
        served = iter(await serve(allowed) if allowed else [])
        return [next(served) if ok else refuse() for ok in mask]

    async def read(self, params: ua.ReadParameters) -> list[ua.DataValue]:
        """Read, refusing other tenants' nodes."""

        async def serve(items: list[ua.ReadValueId]) -> list[ua.DataValue]:
            sub = copy.copy(params)
            sub.NodesToRead = items
            return await InternalSession.read(self, sub)

        return await self._filtered(
            params.NodesToRead,
            lambda item: (item.NodeId,),
            serve,
            lambda: ua.DataValue(StatusCode=_denied()),
        )

    async def write(self, params: ua.WriteParameters) -> list[ua.StatusCode]:
        """Write, refusing other tenants' nodes (platform nodes are read-only anyway)."""

        async def serve(items: list[ua.WriteValue]) -> list[ua.StatusCode]:
            sub = copy.copy(params)
            sub.NodesToWrite = items
            return await InternalSession.write(self, sub)

        return await self._filtered(
            params.NodesToWrite, lambda item: (item.NodeId,), serve, _denied
        )

    async def history_read(self, params: ua.HistoryReadParameters) -> list[ua.HistoryReadResult]:
        """HistoryRead, refusing other tenants' nodes."""

        async def serve(items: list[ua.HistoryReadValueId]) -> list[ua.HistoryReadResult]:
            sub = copy.copy(params)
            sub.NodesToRead = items
            return await InternalSession.history_read(self, sub)

        return await self._filtered(
            params.NodesToRead,
            lambda item: (item.NodeId,),
            serve,
            lambda: ua.HistoryReadResult(StatusCode=_denied()),
        )

    async def call(self, params: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        """Call methods of the user's own tenant; callbacks see the user in `CURRENT_USER`."""

        async def serve(items: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
            token = CURRENT_USER.set(self._platform_user())
            try:
                return await InternalSession.call(self, items)
            finally:
                CURRENT_USER.reset(token)

        return await self._filtered(
            params,
            lambda item: (item.ObjectId, item.MethodId),
            serve,
            lambda: ua.CallMethodResult(StatusCode=_denied()),
        )

    async def create_monitored_items(
        self, params: ua.CreateMonitoredItemsParameters
    ) -> list[ua.MonitoredItemCreateResult]:
        """Subscribe to nodes of the user's own tenant only."""

        async def serve(items: list[ua.MonitoredItemCreateRequest]) -> list[Any]:
            sub = copy.copy(params)
            sub.ItemsToCreate = items
            return await InternalSession.create_monitored_items(self, sub)

        return await self._filtered(
            params.ItemsToCreate,
            lambda item: (item.ItemToMonitor.NodeId,),
            serve,
            lambda: ua.MonitoredItemCreateResult(StatusCode=_denied()),
        )

    async def browse(self, params: ua.BrowseParameters) -> list[ua.BrowseResult]:
        """Browse, refusing other tenants' nodes and leaving them out of references."""

        async def serve(items: list[ua.BrowseDescription]) -> list[ua.BrowseResult]:
            sub = copy.copy(params)
            sub.NodesToBrowse = items
            results = await InternalSession.browse(self, sub)
            for result in results:
                result.References = [r for r in result.References if self.visible(r.NodeId)]
            return results

        return await self._filtered(
            params.NodesToBrowse,
            lambda item: (item.NodeId,),
            serve,
            lambda: ua.BrowseResult(StatusCode=_denied()),
        )

    async def translate_browsepaths_to_nodeids(
        self, params: list[ua.BrowsePath]
    ) -> list[ua.BrowsePathResult]:
        """Resolve browse paths; other tenants' nodes do not match."""

        async def serve(items: list[ua.BrowsePath]) -> list[ua.BrowsePathResult]:
            results = await InternalSession.translate_browsepaths_to_nodeids(self, items)
            for result in results:
                if not result.Targets:
                    continue
                result.Targets = [t for t in result.Targets if self.visible(t.TargetId)]
                if not result.Targets:
                    result.StatusCode = ua.StatusCode(ua.StatusCodes.BadNoMatch)
            return results

        return await self._filtered(
            params,
            lambda item: (item.StartingNode,),
            serve,
            lambda: ua.BrowsePathResult(StatusCode=_denied()),
        )


class TenantInternalServer(InternalServer):
    """asyncua's internal server whose external sessions are `TenantSession`s."""

    def __init__(self, user_manager: UserManager, owners: NodeOwners) -> None:
        super().__init__(user_manager=user_manager)
        self.owners = owners

    def create_session(
        self, name: str, user: User = _ANONYMOUS, external: bool = False
    ) -> InternalSession:
        """A session; external ones are tenant-checked."""
        if not external:
            return super().create_session(name, user=user, external=external)
        session = TenantSession(
            self, self.aspace, self.subscription_service, name, user=user, external=external
        )
        session.owners = self.owners
        return session
