"""Users on SQLite: a `SqliteStore` mixin (the store provides `_call`, `_read_call`, `_db`)."""

from __future__ import annotations

import sqlite3
from typing import Any, TypeVar
from uuid import UUID, uuid4

from iiot.errors import Conflict, NotFound
from iiot.model import Role, User
from iiot.storage import _common
from iiot.storage.base import Page, Scope
from iiot.storage.sqlite_sql import SqlitePart, _blob, _transaction, _uuid

__all__ = ["SqliteUsers"]

T = TypeVar("T")

_USER_COLS = "id, username, role, tenant_id, password_hash, created_at, token_version"


def _user(row: Any) -> User:
    return User(
        id=UUID(bytes=row[0]),
        username=row[1],
        role=Role(row[2]),
        tenant_id=_uuid(row[3]),
        password_hash=row[4],
        created_at=row[5],
        token_version=row[6],
    )


class SqliteUsers(SqlitePart):
    """The user methods of `SqliteStore`."""

    # --- users -------------------------------------------------------------------------
    async def create_user(
        self, tenant_id: UUID | None, username: str, password_hash: str, role: Role
    ) -> User:
        """Create a user; usernames are unique across the platform (`Conflict`)."""
        role = Role(role)
        _common.check_user_tenant(role, tenant_id)

        def run() -> User:
            user = User(uuid4(), username, role, tenant_id, password_hash, _common.now_ms())
            try:
                self._db.execute(
                    "INSERT INTO users (id, username, password_hash, role, tenant_id, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        user.id.bytes,
                        username,
                        password_hash,
                        role.value,
                        _blob(tenant_id),
                        user.created_at,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                if "FOREIGN KEY" in str(exc):
                    raise NotFound(f"tenant {tenant_id} not found") from exc
                raise Conflict(f"a user named {username!r} already exists") from exc
            return user

        return await self._call(run)

    def _user_row(self, scope: Scope, user_id: UUID) -> User:
        sql = f"SELECT {_USER_COLS} FROM users WHERE id = ?"
        args: tuple[Any, ...] = (user_id.bytes,)
        if scope is not None:
            sql += " AND tenant_id = ?"
            args += (scope.bytes,)
        row = self._db.execute(sql, args).fetchone()
        if row is None:
            raise NotFound(f"user {user_id} not found")
        return _user(row)

    async def get_user(self, scope: Scope, user_id: UUID) -> User:
        """One user visible in the scope."""
        return await self._call(self._user_row, scope, user_id)

    async def find_user(self, username: str) -> User | None:
        """The user with this username, for login (not scoped)."""

        def run() -> User | None:
            row = self._db.execute(
                f"SELECT {_USER_COLS} FROM users WHERE username = ?", (username,)
            ).fetchone()
            return None if row is None else _user(row)

        return await self._call(run)

    async def count_users(self) -> int:
        """How many users exist (to create the first administrator)."""
        row = await self._call(lambda: self._db.execute("SELECT count(*) FROM users").fetchone())
        return int(row[0])

    async def list_users(self, scope: Scope, limit: int, offset: int) -> Page[User]:
        """Users visible in the scope, by username."""
        _common.check_page(limit, offset)

        def run() -> Page[User]:
            where, args = ("", ()) if scope is None else ("WHERE tenant_id = ?", (scope.bytes,))
            total = self._db.execute(f"SELECT count(*) FROM users {where}", args).fetchone()
            rows = self._db.execute(
                f"SELECT {_USER_COLS} FROM users {where} ORDER BY username LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            return Page([_user(r) for r in rows], total[0])

        return await self._read_call(run)

    async def update_user(
        self,
        scope: Scope,
        user_id: UUID,
        *,
        password_hash: str | None = None,
        role: Role | None = None,
    ) -> User:
        """Change a user's password hash or role."""

        def run() -> User:
            with _transaction(self._db):
                current = self._user_row(scope, user_id)
                new_role = current.role if role is None else Role(role)
                _common.check_user_tenant(new_role, current.tenant_id)
                # Tokens issued before a new password or role stop working.
                bump = int(password_hash is not None or new_role != current.role)
                self._db.execute(
                    "UPDATE users SET password_hash = ?, role = ?,"
                    " token_version = token_version + ? WHERE id = ?",
                    (
                        password_hash or current.password_hash,
                        new_role.value,
                        bump,
                        user_id.bytes,
                    ),
                )
                return self._user_row(scope, user_id)

        return await self._call(run)

    async def delete_user(self, scope: Scope, user_id: UUID) -> None:
        """Delete a user."""

        def run() -> None:
            with _transaction(self._db):
                self._user_row(scope, user_id)
                self._db.execute("DELETE FROM users WHERE id = ?", (user_id.bytes,))

        await self._call(run)
