"""Users on PostgreSQL: a `PostgresStore` mixin (the store provides `_run`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID, uuid4

import asyncpg

from iiot.errors import Conflict, NotFound
from iiot.model import Role, User
from iiot.storage import _common
from iiot.storage.base import Page, Scope
from iiot.storage.postgres_pool import scoped_page

__all__ = ["PostgresUsers"]

T = TypeVar("T")

_USER_COLS = "id, username, role, tenant_id, password_hash, created_at, token_version"


def _user(row: Any) -> User:
    return User(
        id=row["id"],
        username=row["username"],
        role=Role(row["role"]),
        tenant_id=row["tenant_id"],
        password_hash=row["password_hash"],
        created_at=row["created_at"],
        token_version=row["token_version"],
    )


class PostgresUsers:
    """The user methods of `PostgresStore`."""

    async def _run(
        self, op: Callable[[Any], Awaitable[T]], *, retry: bool = True, read: bool = False
    ) -> T:
        raise NotImplementedError

    # --- users -------------------------------------------------------------------------
    async def create_user(
        self, tenant_id: UUID | None, username: str, password_hash: str, role: Role
    ) -> User:
        """Create a user; usernames are unique across the platform (`Conflict`)."""
        role = Role(role)
        _common.check_user_tenant(role, tenant_id)

        async def op(conn: Any) -> User:
            try:
                row = await conn.fetchrow(
                    "INSERT INTO users (id, username, password_hash, role, tenant_id, created_at)"
                    f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_USER_COLS}",
                    uuid4(),
                    username,
                    password_hash,
                    role.value,
                    tenant_id,
                    _common.now_ms(),
                )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"a user named {username!r} already exists") from exc
            except asyncpg.ForeignKeyViolationError as exc:
                raise NotFound(f"tenant {tenant_id} not found") from exc
            return _user(row)

        return await self._run(op, retry=False)

    async def get_user(self, scope: Scope, user_id: UUID) -> User:
        """One user visible in the scope."""

        async def op(conn: Any) -> User:
            row = await conn.fetchrow(
                f"SELECT {_USER_COLS} FROM users WHERE id = $1"
                " AND ($2::uuid IS NULL OR tenant_id = $2)",
                user_id,
                scope,
            )
            if row is None:
                raise NotFound(f"user {user_id} not found")
            return _user(row)

        return await self._run(op)

    async def find_user(self, username: str) -> User | None:
        """The user with this username, for login (not scoped)."""

        async def op(conn: Any) -> User | None:
            row = await conn.fetchrow(
                f"SELECT {_USER_COLS} FROM users WHERE username = $1", username
            )
            return None if row is None else _user(row)

        return await self._run(op)

    async def count_users(self) -> int:
        """How many users exist (to create the first administrator)."""

        async def op(conn: Any) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM users"))

        return await self._run(op)

    async def list_users(self, scope: Scope, limit: int, offset: int) -> Page[User]:
        """Users visible in the scope, by username."""
        _common.check_page(limit, offset)

        async def op(conn: Any) -> Page[User]:
            rows, total = await scoped_page(
                conn, "users", _USER_COLS, "tenant_id", "username", scope, (limit, offset)
            )
            return Page([_user(r) for r in rows], total)

        return await self._run(op, read=True)

    async def update_user(
        self,
        scope: Scope,
        user_id: UUID,
        *,
        password_hash: str | None = None,
        role: Role | None = None,
    ) -> User:
        """Change a user's password hash or role."""

        async def op(conn: Any) -> User:
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"SELECT {_USER_COLS} FROM users WHERE id = $1"
                    " AND ($2::uuid IS NULL OR tenant_id = $2) FOR UPDATE",
                    user_id,
                    scope,
                )
                if row is None:
                    raise NotFound(f"user {user_id} not found")
                if role is not None:
                    _common.check_user_tenant(Role(role), row["tenant_id"])
                row = await conn.fetchrow(
                    "UPDATE users SET password_hash = coalesce($2, password_hash),"
                    " role = coalesce($3, role),"
                    # Tokens issued before a new password or role stop working.
                    " token_version = token_version"
                    "  + CASE WHEN $2 IS NOT NULL OR ($3 IS NOT NULL AND $3 <> role)"
                    "    THEN 1 ELSE 0 END"
                    f" WHERE id = $1 RETURNING {_USER_COLS}",
                    user_id,
                    password_hash,
                    None if role is None else Role(role).value,
                )
                return _user(row)

        return await self._run(op)

    async def delete_user(self, scope: Scope, user_id: UUID) -> None:
        """Delete a user."""

        async def op(conn: Any) -> None:
            status = await conn.execute(
                "DELETE FROM users WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
                user_id,
                scope,
            )
            if status == "DELETE 0":
                raise NotFound(f"user {user_id} not found")

        await self._run(op, retry=False)
