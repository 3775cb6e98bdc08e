"""Refresh tokens expire, and every token answers for its account as it is now (issue 13,
finding 12): refreshing re-checks the user (exists, not disabled) or the OAuth client and
takes the current role; disabling an account stops its tokens at once.

The server's clock is moved forward by swapping the fleet's clock function (the same hook
the service takes at construction), not by waiting.
"""

from __future__ import annotations

import base64
import threading

import sqlalchemy as sa
import trio

from server.fleet.auth import token_hash
from server.store import TokenRecord
from server.store import schema as t
from tests.conftest import Api

PASSWORD = "correct horse battery"
DAY_MS = 24 * 3600 * 1000
#: The default refresh-token lifetime (``server.fleet.auth.DEFAULT_REFRESH_TOKEN_SECONDS``).
DEFAULT_REFRESH_TOKEN_SECONDS = 90 * 24 * 3600


async def _password(api: Api, username: str) -> dict[str, object]:
    response = await api.client.post("/oauth/token", data={
        "grant_type": "password", "username": username, "password": PASSWORD,
        "expires_in": "3600"})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def _refresh(api: Api, refresh_token: object) -> tuple[int, dict[str, object]]:
    response = await api.client.post("/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": str(refresh_token)})
    return response.status_code, response.json()


def _shift_clock(api: Api) -> list[int]:
    """Make the fleet's clock run ``shift[0]`` milliseconds ahead of the real one."""
    fleet = api.handle.fleet
    real = fleet.clock
    shift = [0]
    fleet.clock = lambda: real() + shift[0]
    return shift


async def test_refresh_tokens_expire(api: Api) -> None:
    await trio.to_thread.run_sync(
        lambda: api.handle.fleet.create_user_sync("ops@example.com", PASSWORD, "developer"))
    shift = _shift_clock(api)
    first = await _password(api, "ops@example.com")
    shift[0] = DEFAULT_REFRESH_TOKEN_SECONDS * 1000 - DAY_MS  # a day before it expires
    status, second = await _refresh(api, first["refresh_token"])
    assert status == 200, second
    shift[0] += DEFAULT_REFRESH_TOKEN_SECONDS * 1000 + 1  # the new one's whole lifetime later
    status, refused = await _refresh(api, second["refresh_token"])
    assert status == 400 and refused["error"] == "invalid_grant"
    assert "expired" in str(refused["error_description"])


async def test_refresh_tokens_stored_without_a_lifetime_expire_too(api: Api) -> None:
    fleet = api.handle.fleet
    await trio.to_thread.run_sync(
        lambda: fleet.create_user_sync("ops@example.com", PASSWORD, "developer"))
    with api.store.read() as tx:
        user = tx.get_user("ops@example.com")
    assert user is not None
    now = fleet.clock()
    for name, age_days in (("old-refresh", 91), ("young-refresh", 1)):
        with api.store.write() as tx:  # as a server before this change stored them
            tx.insert_token(TokenRecord(token_hash(name), "refresh", "developer",
                                        user.username, user.id, None, None,
                                        now - age_days * DAY_MS, None, None))
    status, body = await _refresh(api, "old-refresh")
    assert status == 400 and "expired" in str(body["error_description"])
    status, body = await _refresh(api, "young-refresh")
    assert status == 200, body


async def test_refreshing_takes_the_current_role_and_refuses_disabled_users(api: Api) -> None:
    fleet = api.handle.fleet
    await trio.to_thread.run_sync(
        lambda: fleet.create_user_sync("ops@example.com", PASSWORD, "developer"))
    product = await api.create_product("Widget")
    grant = await _password(api, "ops@example.com")
    headers = {"Authorization": f"Bearer {grant['access_token']}"}
    edit = {"name": "Renamed"}
    assert (await api.client.put(f"/v1/products/{product['slug']}", json=edit,
                                 headers=headers)).status_code == 200

    await trio.to_thread.run_sync(lambda: fleet.update_user_sync("ops@example.com",
                                                                 role="viewer"))
    # The access token already issued acts with the role the user has now...
    refused = await api.client.put(f"/v1/products/{product['slug']}", json=edit,
                                   headers=headers)
    assert refused.status_code == 403 and "viewer role" in refused.json()["error"]
    # ... and so does a refreshed one.
    status, body = await _refresh(api, grant["refresh_token"])
    assert status == 200 and body["role"] == "viewer", body

    await trio.to_thread.run_sync(lambda: fleet.update_user_sync("ops@example.com",
                                                                 disabled=True))
    current = {"Authorization": f"Bearer {body['access_token']}"}
    stopped = await api.client.get("/v1/products", headers=current)
    assert stopped.status_code == 401
    status, refused_refresh = await _refresh(api, body["refresh_token"])
    assert status == 400 and refused_refresh["error"] == "invalid_grant"
    signed = await api.client.post("/oauth/token", data={
        "grant_type": "password", "username": "ops@example.com", "password": PASSWORD})
    assert signed.status_code == 400 and "disabled" in signed.json()["error_description"]

    await trio.to_thread.run_sync(lambda: fleet.update_user_sync("ops@example.com",
                                                                 disabled=False))
    # Enabled again: old tokens stay revoked, a new sign-in works.
    assert (await api.client.get("/v1/products", headers=current)).status_code == 401
    await _password(api, "ops@example.com")


async def test_tokens_of_a_deleted_oauth_client_stop_working(api: Api) -> None:
    fleet = api.handle.fleet
    client_id, secret = await trio.to_thread.run_sync(
        lambda: fleet.create_client_sync("CI", "developer"))
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    response = await api.client.post("/oauth/token", data={"grant_type": "client_credentials"},
                                     headers={"Authorization": f"Basic {basic}"})
    assert response.status_code == 200
    token = response.json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert (await api.client.get("/v1/products", headers=headers)).status_code == 200
    with api.store.write() as tx:
        tx.conn.execute(sa.delete(t.oauth_clients).where(t.oauth_clients.c.client_id
                                                         == client_id))
    stopped = await api.client.get("/v1/products", headers=headers)
    assert stopped.status_code == 401 and "no longer exists" in stopped.json()["error"]


async def test_a_made_up_refresh_token_waits_for_no_writer(api: Api) -> None:
    """While another writer holds the store (SQLite has one at a time), an invalid refresh
    token is still answered: it is refused after a read, without queueing for the write."""
    store = api.handle.store
    holding, release = threading.Event(), threading.Event()

    def hold_the_writer() -> None:
        with store.write():
            holding.set()
            release.wait(120)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, hold_the_writer)
        try:
            await trio.to_thread.run_sync(holding.wait)
            with trio.fail_after(60):  # on a failure: it waited for the writer
                status, body = await _refresh(api, "0" * 40)
        finally:
            release.set()
    assert status == 400 and "invalid or revoked" in str(body["error_description"]), body
