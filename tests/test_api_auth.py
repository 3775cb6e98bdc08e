"""Tokens over real HTTP: OAuth grants, bearer and query tokens, expiry, revocation."""

from __future__ import annotations

import base64

import httpx
import trio

from server.fleet.auth import hash_secret, verify_secret


async def _anon(api) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api.handle.api_url, timeout=20)


async def test_password_grant_form_and_json(api) -> None:
    fleet = api.handle.fleet
    await trio.to_thread.run_sync(
        lambda: fleet.create_user_sync("ops@example.com", "correct horse", "developer")
    )
    async with await _anon(api) as anon:
        # particle-cli style: form body with HTTP Basic client auth particle:particle.
        response = await anon.post(
            "/oauth/token",
            data={
                "grant_type": "password",
                "username": "ops@example.com",
                "password": "correct horse",
                "expires_in": "3600",
            },
            auth=("particle", "particle"),
        )
        assert response.status_code == 200, response.text
        grant = response.json()
        assert grant["token_type"] == "bearer" and grant["expires_in"] == 3600
        assert len(grant["access_token"]) == 40 and grant["refresh_token"]
        assert grant["role"] == "developer"
        me = await anon.get(
            "/v1/access_tokens/current",
            headers={"Authorization": f"Bearer {grant['access_token']}"},
        )
        assert me.json() == {"ok": True, "subject": "ops@example.com", "role": "developer"}

        response = await anon.post(
            "/oauth/token",
            json={
                "grant_type": "password",
                "username": "ops@example.com",
                "password": "correct horse",
            },
        )
        assert response.status_code == 200 and response.json()["expires_in"] == 90 * 24 * 3600

        for bad in (
            {"grant_type": "password", "username": "ops@example.com", "password": "wrong"},
            {"grant_type": "password", "username": "nobody", "password": "correct horse"},
        ):
            response = await anon.post("/oauth/token", data=bad)
            assert response.status_code == 400
            assert response.json()["error"] == "invalid_grant"
        response = await anon.post("/oauth/token", data={"grant_type": "magic"})
        assert response.json()["error"] == "unsupported_grant_type"
        response = await anon.post(
            "/oauth/token", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and response.json()["error"] == "invalid_request"

        # Refresh: a new pair; the old refresh token no longer works.
        response = await anon.post(
            "/oauth/token",
            data={"grant_type": "refresh_token", "refresh_token": grant["refresh_token"]},
        )
        assert response.status_code == 200, response.text
        response = await anon.post(
            "/oauth/token",
            data={"grant_type": "refresh_token", "refresh_token": grant["refresh_token"]},
        )
        assert response.status_code == 400
        old = await anon.get("/v1/products", params={"access_token": grant["access_token"]})
        assert old.status_code == 401 and "revoked" in old.json()["error"]


async def test_client_credentials(api) -> None:
    fleet = api.handle.fleet
    client_id, secret = await trio.to_thread.run_sync(
        lambda: fleet.create_client_sync("CI pipeline", "developer")
    )
    async with await _anon(api) as anon:
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        response = await anon.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {basic}"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["role"] == "developer" and "refresh_token" not in response.json()
        response = await anon.post(
            "/oauth/token",
            json={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": secret,
            },
        )
        assert response.status_code == 200
        response = await anon.post(
            "/oauth/token",
            json={"grant_type": "client_credentials", "client_id": client_id, "client_secret": "x"},
        )
        assert response.status_code == 401 and response.json()["error"] == "invalid_client"


async def test_query_token_revocation_and_bad_headers(api) -> None:
    token = await api.token_for("viewer")
    async with await _anon(api) as anon:
        assert (await anon.get("/v1/products", params={"access_token": token})).status_code == 200
        response = await anon.get("/v1/products", headers={"Authorization": f"Basic {token}"})
        assert response.status_code == 401 and "Bearer" in response.json()["error"]
        assert response.headers["www-authenticate"].startswith("Bearer")
        revoked = await anon.delete(
            "/v1/access_tokens/current", headers={"Authorization": f"Bearer {token}"}
        )
        assert revoked.status_code == 200 and revoked.json() == {"ok": True}
        response = await anon.get("/v1/products", params={"access_token": token})
        assert response.status_code == 401 and "revoked" in response.json()["error"]
        response = await anon.get("/v1/products", params={"access_token": "x" * 500})
        assert response.status_code == 401


async def test_only_hashes_are_stored(api) -> None:
    token = await api.token_for("developer")
    await trio.to_thread.run_sync(
        lambda: api.handle.fleet.create_user_sync("someone", "s3cret-pass", "viewer")
    )
    with api.store.read() as tx:
        dump = repr(tx.dump_tables())
        user = tx.get_user("someone")
    assert token not in dump and api.token not in dump and "s3cret-pass" not in dump
    assert user is not None and user.password_hash.startswith("scrypt$16384$8$1$")
    assert verify_secret("s3cret-pass", user.password_hash)
    assert not verify_secret("s3cret-pasS", user.password_hash)
    assert not verify_secret("x", "not-a-hash") and verify_secret("y", hash_secret("y"))


async def test_products_need_admin_role(api) -> None:
    async with await api.client_for("developer") as developer:
        response = await developer.post("/v1/products", json={"name": "x", "platform_id": 13})
        assert response.status_code == 403 and "administrator" in response.json()["error"]
    for body, message in (
        ({"name": "x", "platform_id": 9999}, "unknown platform id 9999"),
        ({"name": "", "platform_id": 13}, "product name is required"),
        ({"name": "x", "platform_id": "boron"}, "must be an integer"),
    ):
        response = await api.client.post("/v1/products", json=body)
        assert response.status_code == 400 and message in response.json()["error"], body
    one = await api.create_product("Same Name")
    two = await api.create_product("Same Name")
    assert (one["slug"], two["slug"]) == ("same-name", "same-name-2")
    got = await api.client.get(f"/v1/products/{two['id']}")
    assert got.json()["product"]["slug"] == "same-name-2"
