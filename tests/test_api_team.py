"""Product teams and API users over the real API (issue 13, finding 11): Particle's request
and answer shapes, what a member or an API user may do, nobody granting more than they hold,
and stores and tokens from before teams existed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import trio

from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.store import Store
from tests.conftest import Api
from tests.pre_alembic import drop_tables_after_baseline

PASSWORD = "correct horse battery"


async def _user(api: Api, name: str, role: str = "none") -> None:
    await trio.to_thread.run_sync(
        lambda: api.handle.fleet.create_user_sync(name, PASSWORD, role))


async def _sign_in(api: Api, name: str) -> httpx.AsyncClient:
    response = await api.client.post("/oauth/token", data={
        "grant_type": "password", "username": name, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return _bearer(api, response.json()["access_token"])


def _bearer(api: Api, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api.handle.api_url, timeout=20,
                             headers={"Authorization": f"Bearer {token}"})


async def _products(api: Api, *names: str) -> list[str]:
    slugs = []
    for name in names:
        product = await api.create_product(name)
        assert (await api.upload(product["slug"], 1)).status_code == 201
        slugs.append(product["slug"])
    return slugs


async def test_invite_list_and_remove_in_particles_shapes(api: Api, make_firmware) -> None:
    alpha, beta = await _products(api, "Alpha", "Beta")
    await _user(api, "alice@example.com")
    invited = await api.client.post(f"/v1/products/{alpha}/team",
                                    json={"username": "alice@example.com", "role": "developer"})
    assert invited.status_code == 200 and invited.json()["ok"] is True, invited.text
    team = await api.client.get(f"/v1/products/{alpha}/team")
    assert team.status_code == 200
    body = team.json()
    assert body["ok"] is True
    assert [(m["username"], m["role"], m["is_programmatic"]) for m in body["team"]] == [
        ("alice@example.com", {"id": "developer", "name": "Developer"}, False)]
    again = await api.client.post(f"/v1/products/{alpha}/team",
                                  json={"username": "alice@example.com"})
    assert again.status_code == 409 and "already on the team" in again.json()["error"]
    unknown = await api.client.post(f"/v1/products/{alpha}/team", json={"username": "zed"})
    assert unknown.status_code == 404 and "ota admin user zed" in unknown.json()["error"]

    async with await _sign_in(api, "alice@example.com") as alice:
        products = (await alice.get("/v1/products")).json()["products"]
        assert [p["slug"] for p in products] == [alpha]
        assert (await alice.get(f"/v1/products/{alpha}/firmware")).status_code == 200
        uploaded = await alice.post(f"/v1/products/{alpha}/firmware",
                                    data={"version": "2", "title": "by alice"},
                                    files={"binary": ("f.bin", make_firmware(2))})
        assert uploaded.status_code == 201, uploaded.text
        elsewhere = await alice.post(f"/v1/products/{beta}/firmware",
                                     data={"version": "2", "title": "by alice"},
                                     files={"binary": ("f.bin", make_firmware(2))})
        assert elsewhere.status_code == 404
        missing = await alice.get(f"/v1/products/{beta}")
        nothing = await alice.get("/v1/products/no-such-product")
        assert missing.status_code == nothing.status_code == 404
        assert missing.json()["error"] == nothing.json()["error"].replace("no-such-product", beta)
        # A developer may release but not manage the team.
        refused = await alice.post(f"/v1/products/{alpha}/team", json={"username": "x"})
        assert refused.status_code == 403 and "teams.users:invite" in refused.json()["error"]

        removed = await api.client.delete(f"/v1/products/{alpha}/team/alice@example.com")
        assert removed.status_code == 204
        # Her token is checked against her memberships as they are now.
        assert (await alice.get(f"/v1/products/{alpha}/firmware")).status_code == 404
        assert (await alice.get("/v1/products")).status_code == 403
    assert (await api.client.get(f"/v1/products/{alpha}/team")).json()["team"] == []


async def test_role_changes_and_team_administrators(api: Api) -> None:
    (alpha,) = await _products(api, "Alpha")
    await _user(api, "lead@example.com")
    await _user(api, "dev@example.com")
    assert (await api.client.post(f"/v1/products/{alpha}/team", json={
        "username": "lead@example.com", "role": "administrator"})).status_code == 200
    async with await _sign_in(api, "lead@example.com") as lead:
        invited = await lead.post(f"/v1/products/{alpha}/team",
                                  json={"username": "dev@example.com", "role": "viewer"})
        assert invited.status_code == 200, invited.text
        async with await _sign_in(api, "dev@example.com") as dev:
            release = {"version": 1, "product_default": True, "force": True}
            refused = await dev.put(f"/v1/products/{alpha}/firmware/release", json=release)
            assert refused.status_code == 403 and "firmware:release" in refused.json()["error"]
            promoted = await lead.put(f"/v1/products/{alpha}/team/dev@example.com",
                                      json={"role": "developer"})
            assert promoted.status_code == 200
            assert promoted.json()["updated"]["role"]["id"] == "developer"
            released = await dev.put(f"/v1/products/{alpha}/firmware/release", json=release)
            assert released.status_code == 200, released.text
            # A team administrator administers its product, not the installation.
            assert (await lead.post("/v1/products", json={"name": "x", "platform_id": 13})
                    ).status_code == 403
            bad = await lead.put(f"/v1/products/{alpha}/team/dev@example.com",
                                 json={"role": "owner"})
            assert bad.status_code == 400 and "administrator, developer" in bad.json()["error"]


async def test_api_users_in_particles_shape_and_scopes(api: Api) -> None:
    alpha, beta = await _products(api, "Alpha", "Beta")
    created = await api.client.post(f"/v1/products/{alpha}/team", json={
        "friendly_name": "CI pipeline", "scopes": ["devices:list", "firmware:get"]})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["ok"] is True
    user: dict[str, Any] = body["created"]
    assert user["is_programmatic"] is True and user["username"].startswith("ci-pipeline+")
    assert user["username"].endswith("@api.otacloud") and len(user["tokens"]) == 1
    assert sorted(user["scopes"]) == ["devices:list", "firmware:get"]
    token = user["tokens"][0]["token"]
    async with _bearer(api, token) as bot:
        assert (await bot.get(f"/v1/products/{alpha}/devices")).status_code == 200
        assert (await bot.get(f"/v1/products/{alpha}/firmware/1")).status_code == 200
        refused = await bot.get(f"/v1/products/{alpha}/firmware")
        assert refused.status_code == 403
        assert "firmware:list" in refused.json()["error"]
        assert (await bot.get(f"/v1/products/{beta}/devices")).status_code == 404
        assert (await bot.get("/v1/products")).status_code == 403
        assert (await bot.post(f"/v1/products/{alpha}/team", json={
            "friendly_name": "x", "scopes": ["devices:list"]})).status_code == 403
    listed = (await api.client.get(f"/v1/products/{alpha}/team")).json()["team"]
    assert [(m["username"], m["is_programmatic"], m["friendly_name"]) for m in listed] == [
        (user["username"], True, "CI pipeline")]
    # An API user cannot sign in with a password.
    signed = await api.client.post("/oauth/token", data={
        "grant_type": "password", "username": user["username"], "password": "!"})
    assert signed.status_code == 400
    # New scopes, new token: the old one stops working (Particle: no scope creep).
    updated = await api.client.put(f"/v1/products/{alpha}/team/{user['username']}",
                                   json={"scopes": ["firmware:list"]})
    assert updated.status_code == 200, updated.text
    new_token = updated.json()["updated"]["tokens"][0]["token"]
    async with _bearer(api, token) as old, _bearer(api, new_token) as new:
        assert (await old.get(f"/v1/products/{alpha}/firmware")).status_code == 401
        assert (await new.get(f"/v1/products/{alpha}/firmware")).status_code == 200
        assert (await new.get(f"/v1/products/{alpha}/devices")).status_code == 403
        deleted = await api.client.delete(f"/v1/products/{alpha}/team/{user['username']}")
        assert deleted.status_code == 204
        assert (await new.get(f"/v1/products/{alpha}/firmware")).status_code == 401
    for bad, message in (({"friendly_name": "x", "scopes": ["devices:fly"]}, "unknown scope"),
                         ({"friendly_name": "x", "scopes": []}, "non-empty list"),
                         ({"friendly_name": "", "scopes": ["devices:list"]}, "required"),
                         ({}, "give {username")):
        response = await api.client.post(f"/v1/products/{alpha}/team", json=bad)
        assert response.status_code == 400 and message in response.json()["error"], bad


async def test_nobody_grants_more_than_they_hold(api: Api) -> None:
    (alpha,) = await _products(api, "Alpha")
    created = await api.client.post(f"/v1/products/{alpha}/team", json={
        "friendly_name": "provisioner", "scopes": ["teams.users:invite", "devices:list",
                                                    "teams.users:remove"]})
    token = created.json()["created"]["tokens"][0]["token"]
    await _user(api, "eve@example.com")
    async with _bearer(api, token) as bot:
        ok = await bot.post(f"/v1/products/{alpha}/team", json={
            "friendly_name": "reader", "scopes": ["devices:list"]})
        assert ok.status_code == 201, ok.text
        more = await bot.post(f"/v1/products/{alpha}/team", json={
            "friendly_name": "writer", "scopes": ["devices:list", "firmware:create"]})
        assert more.status_code == 403 and "firmware:create" in more.json()["error"]
        viewer = await bot.post(f"/v1/products/{alpha}/team", json={
            "username": "eve@example.com", "role": "viewer"})
        assert viewer.status_code == 403  # a viewer reads firmware; the bot may not
        assert (await api.client.post(f"/v1/products/{alpha}/team", json={
            "username": "eve@example.com", "role": "administrator"})).status_code == 200
        removed = await bot.delete(f"/v1/products/{alpha}/team/eve@example.com")
        assert removed.status_code == 403
        reader = ok.json()["created"]["username"]
        assert (await bot.delete(f"/v1/products/{alpha}/team/{reader}")).status_code == 204


async def test_installation_roles_of_existing_tokens_still_reach_every_product(
    api: Api,
) -> None:
    alpha, beta = await _products(api, "Alpha", "Beta")
    async with await api.client_for("developer") as developer, \
            await api.client_for("viewer") as viewer:
        listed = (await viewer.get("/v1/products")).json()["products"]
        assert sorted(p["slug"] for p in listed) == sorted([alpha, beta])
        for slug in (alpha, beta):
            assert (await viewer.get(f"/v1/products/{slug}/firmware")).status_code == 200
            assert (await api.upload(slug, 2)).status_code == 201
            edited = await developer.put(f"/v1/products/{slug}/firmware/2",
                                         json={"title": "by the developer"})
            assert edited.status_code == 200
        refused = await viewer.put(f"/v1/products/{alpha}/firmware/2", json={"title": "x"})
        assert refused.status_code == 403 and "viewer role" in refused.json()["error"]


def test_a_store_from_before_teams_opens_and_its_tokens_work(data_dir: Path) -> None:
    store = Store.open_dir(data_dir, pool_size=1)
    fleet = Fleet(store, EventBus())
    product = fleet.create_product_sync(SYSTEM_ACTOR, "Old", 13)
    grant = fleet.create_api_token_sync("developer")
    fleet.create_user_sync("old@example.com", PASSWORD, "viewer")
    with store.write() as tx:  # as a store written before product teams existed
        tx.conn.execute(sa.text("DROP TABLE product_members"))
        tx.conn.execute(sa.text("DROP TABLE api_users"))
        tx.conn.execute(sa.text("DROP TABLE alembic_version"))  # and from before Alembic
        drop_tables_after_baseline(tx.conn)
    store.close()

    reopened = Store.open_dir(data_dir, pool_size=1)
    try:
        with reopened.read() as tx:
            names = set(sa.inspect(tx.conn).get_table_names())
        assert {"product_members", "api_users"} <= names

        async def check() -> None:
            fleet = Fleet(reopened, EventBus())
            actor = await fleet.authenticate(grant.access_token)
            assert actor.role.value == "developer" and "firmware:create" in actor.scopes_on(
                product.id)
            viewer = await fleet.password_grant("old@example.com", PASSWORD)
            reader = await fleet.authenticate(viewer.access_token)
            assert reader.scopes_on(product.id) and "firmware:create" not in \
                reader.scopes_on(product.id)

        trio.run(check)
    finally:
        reopened.close()


async def test_an_open_event_stream_ends_when_its_reader_leaves_the_team(api: Api) -> None:
    (alpha,) = await _products(api, "Alpha")
    await _user(api, "watcher@example.com")
    assert (await api.client.post(f"/v1/products/{alpha}/team", json={
        "username": "watcher@example.com"})).status_code == 200
    async with await _sign_in(api, "watcher@example.com") as watcher, \
            watcher.stream("GET", f"/v1/products/{alpha}/events") as stream:
        assert stream.status_code == 200
        lines = stream.aiter_lines()
        assert await lines.__anext__() == ":ok"
        removed = await api.client.delete(f"/v1/products/{alpha}/team/watcher@example.com")
        assert removed.status_code == 204
        seen = []
        with trio.fail_after(30):  # re-checked at every keep-alive (0.3 s in tests)
            async for line in lines:
                seen.append(line)
        assert ": access revoked: sign in again" in seen


async def test_team_members_see_device_os_of_their_own_platforms_only(api: Api) -> None:
    from otacore.module import build_module
    from otacore.platforms import ModuleFunction

    (boron_product,) = await _products(api, "Boron Thing")  # platform 13
    for platform in (13, 12):  # Boron, Argon
        module = build_module(b"\x11" * 3000, platform_id=platform,
                              function=ModuleFunction.SYSTEM_PART, index=1, version=5003)
        uploaded = await api.client.post("/v1/device-os",
                                         files={"binary": ("system.bin", module)})
        assert uploaded.status_code == 201, uploaded.text
    await _user(api, "member@example.com")
    assert (await api.client.post(f"/v1/products/{boron_product}/team", json={
        "username": "member@example.com"})).status_code == 200
    async with await _sign_in(api, "member@example.com") as member:
        listed = await member.get("/v1/device-os")
        assert listed.status_code == 200
        assert [m["platform_id"] for m in listed.json()] == [13]
        refused = await member.post("/v1/device-os", files={"binary": ("x.bin", b"x")})
        assert refused.status_code == 403 and "owner, administrator" in refused.json()["error"]
    everything = await api.client.get("/v1/device-os")
    assert sorted(m["platform_id"] for m in everything.json()) == [12, 13]
