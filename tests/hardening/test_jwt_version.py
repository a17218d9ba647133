"""Access tokens end with the account's rights (item 10): a password change, a role change
and the user's deletion each make the tokens issued before unusable."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.api_helpers import api_platform


async def test_tokens_die_with_account_changes_on_sqlite(tmp_path: Path) -> None:
    await _tokens_die_with_account_changes(tmp_path, {})


async def test_tokens_die_with_account_changes_on_postgres(tmp_path: Path, pg_url: str) -> None:
    await _tokens_die_with_account_changes(tmp_path, {"IIOT_DATABASE_URL": pg_url})


async def _tokens_die_with_account_changes(tmp_path: Path, env: dict[str, str]) -> None:
    async with api_platform(tmp_path, **env) as api:
        tenant = await api.tenant("acme")
        user, old = await api.user("ops", "tenant_admin", tenant["id"])
        assert (await api.client.get("/api/devices", headers=old)).status_code == 200

        # Password change: tokens from before stop working; a new login works.
        await api.ok(
            "PATCH",
            f"/api/users/{user['id']}",
            json={"password": "new-password-1"},
            headers=api.admin,
        )
        answer = await api.client.get("/api/devices", headers=old)
        assert answer.status_code == 401, answer.text
        assert "log in again" in answer.json()["detail"]
        fresh = await api.login("ops", "new-password-1")
        assert (await api.client.get("/api/devices", headers=fresh)).status_code == 200

        # Role change (demotion): the token of the old role stops working.
        await api.ok(
            "PATCH", f"/api/users/{user['id']}", json={"role": "tenant_user"}, headers=api.admin
        )
        assert (await api.client.get("/api/devices", headers=fresh)).status_code == 401
        demoted = await api.login("ops", "new-password-1")
        assert (await api.client.get("/api/devices", headers=demoted)).status_code == 200

        # Deletion: the token of a deleted user fails.
        await api.ok("DELETE", f"/api/users/{user['id']}", 204, headers=api.admin)
        assert (await api.client.get("/api/devices", headers=demoted)).status_code == 401
