"""asyncua's TCP server with one addition: passwords are checked before session activation.

asyncua activates sessions synchronously, so the bcrypt check (slow on purpose) cannot run
inside its user manager without stalling every other client. `AuthProcessor` decodes the
ActivateSession request first, awaits the check in a thread, then lets asyncua continue,
whose user manager (`PlatformUserManager.get_user`) then only looks the verdict up.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

from asyncua import ua as _ua
from asyncua.common.connection import TransportLimits
from asyncua.common.utils import Buffer
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import struct_from_binary

from iiot.adapters.opcua_auth import PlatformUserManager

__all__ = ["PlatformServer"]

# asyncua's `ua` types are generated NewTypes that mypy cannot follow; treat them as Any.
ua: Any = _ua

log = logging.getLogger(__name__)

_ACTIVATE = ua.NodeId(ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary)


class AuthProcessor(UaProcessor):
    """asyncua's request processor, pre-verifying user names and passwords."""

    users: PlatformUserManager

    async def _process_message(self, typeid: Any, requesthdr: Any, seqhdr: Any, body: Any) -> Any:
        if typeid == _ACTIVATE:
            await self._preverify(requesthdr, body)
        return await super()._process_message(typeid, requesthdr, seqhdr, body)  # type: ignore[no-untyped-call]

    async def _preverify(self, requesthdr: Any, body: Buffer) -> None:
        try:
            params = struct_from_binary(ua.ActivateSessionParameters, body.copy())
        except (ua.UaError, struct.error, ValueError):
            return  # asyncua answers the malformed request itself
        token = params.UserIdentityToken
        if not isinstance(token, ua.UserNameIdentityToken):
            return
        session = self.session or self.iserver.lookup_external_session(
            requesthdr.AuthenticationToken
        )
        if session is None or session.nonce is None:
            return
        try:
            username, password = self.iserver.decrypt_user_token(session, token)
        except (ua.UaError, struct.error, ValueError, UnicodeDecodeError):
            return  # asyncua refuses the undecipherable token itself
        peer = self.name
        address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
        await self.users.preverify(username or "", password or "", address)


class _Protocol(OPCUAProtocol):
    users: PlatformUserManager

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.processor is None:
            return  # refused (too many connections)
        # The message loop task created above has not run yet, so swapping is safe.
        processor = AuthProcessor(self.iserver, self.transport, self.limits)
        processor.users = self.users
        processor.set_policies(self.policies)  # type: ignore[no-untyped-call]
        self.processor = processor


class _BinaryServer(BinaryServer):
    def __init__(
        self,
        iserver: InternalServer,
        hostname: str,
        port: int,
        limits: TransportLimits,
        users: PlatformUserManager,
    ) -> None:
        super().__init__(iserver, hostname, port, limits)
        self.users = users

    def _make_protocol(self) -> OPCUAProtocol:
        protocol = _Protocol(
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )
        protocol.users = self.users
        return protocol


class PlatformServer(Server):
    """asyncua `Server` whose connections pre-verify passwords (see module doc)."""

    def __init__(self, iserver: InternalServer, users: PlatformUserManager) -> None:
        super().__init__(iserver=iserver)
        self.users = users

    async def start(self) -> None:
        """Listen (the same steps as `Server.start`, with our transport).

        asyncio's `create_server` sets SO_REUSEADDR on POSIX, so a restart binds the port
        again at once even with connections in TIME_WAIT.
        """
        await self._setup_server_nodes()
        await self.iserver.start()
        host, port = self._get_bind_socket_info()
        self.bserver = _BinaryServer(self.iserver, host or "", port or 0, self.limits, self.users)
        self.bserver.set_policies(self._policies)
        try:
            await self.bserver.start()
        except OSError:
            await self.iserver.stop()
            raise
