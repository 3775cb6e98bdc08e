"""The console's frame over the real server: sign-in (password through the same throttle as
/oauth/token, or an access token), the session cookie, CSRF, ``next``, sign-out, the
product access rules on console pages, error pages, and the live event stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import Api, _server_config
from tests.console_helpers import (
    PASSWORD,
    add_user,
    browser,
    join_team,
    page,
    post_form,
    sign_in,
    signed_in,
)


@pytest.fixture
async def limited_api(nursery: trio.Nursery, data_dir: Path) -> AsyncIterator[Api]:
    """A server allowing 3 failed sign-ins per address (first account lockout 10 minutes,
    so that none ends during a test)."""
    from server.app import serve

    config = _server_config(data_dir)
    config = replace(config, api=replace(
        config.api, login_max_failures_per_address=3, login_max_failures_per_user=5,
        login_first_account_lockout_seconds=600,
    ))
    handle = await nursery.start(serve, config)
    grant = await trio.to_thread.run_sync(lambda: handle.fleet.create_api_token_sync("owner"))
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=30, headers={
            "Authorization": f"Bearer {grant.access_token}"}) as client:
        yield Api(handle, client, grant.access_token)
    handle.shutdown.set()


async def test_the_sign_in_page_has_the_labelled_fields(api: Api) -> None:
    async with browser(api) as client:
        login = page(await client.get("/console/login"))
    for label, name in (("Username", "username"), ("Password", "password"),
                        ("Access token", "token")):
        assert login.control_labelled(label).name == name
    buttons = [c for c in login.controls if c.tag == "button"]
    assert "Sign in" in login.all_text and buttons
    assert login.unlabelled() == []


async def test_an_unauthenticated_page_redirects_to_sign_in_and_back(api: Api) -> None:
    await api.create_product("Widget")
    await add_user(api, "ops@example.com", "owner")
    async with browser(api) as client:
        first = await client.get("/console/?view=all&x=1")
        assert first.status_code == 303
        assert first.headers["location"] == "/console/login?next=/console/%3Fview%3Dall%26x%3D1"
        answer = await sign_in(client, username="ops@example.com", password=PASSWORD,
                               next_path="/console/%3Fview%3Dall%26x%3D1")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/console/?view=all&x=1"


async def test_password_sign_in_sets_a_strict_http_only_cookie(api: Api) -> None:
    await api.create_product("Widget")
    await add_user(api, "ops@example.com", "owner")
    async with browser(api) as client:
        answer = await sign_in(client, username="ops@example.com", password=PASSWORD)
        assert answer.status_code == 303 and answer.headers["location"] == "/console/"
        cookie = next(v for k, v in answer.headers.multi_items()
                      if k == "set-cookie" and v.startswith("ota_console="))
        flags = {part.strip().lower() for part in cookie.split(";")}
        assert "httponly" in flags and "samesite=strict" in flags and "path=/console/" in flags
        assert "secure" not in flags  # plain http here; https sets Secure
        home = await client.get("/console/")
        assert home.status_code == 200
        assert "Widget" in page(home).all_text and "ops@example.com" in home.text


async def test_token_sign_in_and_a_revoked_token_ends_the_session(api: Api) -> None:
    await api.create_product("Widget")
    token = await api.token_for("viewer")
    async with signed_in(api, token=token) as client:
        assert (await client.get("/console/")).status_code == 200
        revoked = await httpx.AsyncClient(base_url=api.handle.api_url, headers={
            "Authorization": f"Bearer {token}"}).delete("/v1/access_tokens/current")
        assert revoked.status_code == 200
        again = await client.get("/console/")
        assert again.status_code == 303
        assert again.headers["location"].startswith("/console/login?next=/console/")


async def test_wrong_password_shows_an_alert_and_counts_toward_the_lockout(
        limited_api: Api) -> None:
    api = limited_api
    await add_user(api, "ops@example.com", "owner")
    async with browser(api) as client:
        for _ in range(3):
            wrong = await sign_in(client, username="ops@example.com", password="not it at all")
            assert wrong.status_code == 401
            assert page(wrong).alerts == ["the username or password is wrong"]
            assert page(wrong).value_of("username") == "ops@example.com"
        locked = await sign_in(client, username="ops@example.com", password=PASSWORD)
        assert locked.status_code == 429
        assert "too many" in page(locked).alerts[0].lower()
        # /oauth/token shares the throttle: the console's failures locked it out too.
        oauth = await client.post("/oauth/token", data={
            "grant_type": "password", "username": "ops@example.com", "password": PASSWORD})
        assert oauth.status_code == 429
    limits = await api.client.get("/v1/sign-in-limits")
    assert limits.status_code == 200 and limits.json()["limits"], limits.text


async def test_sign_in_refuses_a_form_without_its_csrf_value(api: Api) -> None:
    await add_user(api, "ops@example.com", "owner")
    async with browser(api) as client:
        answer = await client.post("/console/login", data={
            "username": "ops@example.com", "password": PASSWORD})
        assert answer.status_code == 403
        assert "expired or came from another site" in page(answer).alerts[0]
        assert "ota_console=" not in answer.headers.get("set-cookie", "")


@pytest.mark.parametrize("target", [
    "https://evil.example/", "//evil.example/x", "/\\evil.example", "/v1/products",
    "javascript:alert(1)", "/console/../v1", "\\\\evil", "http:/console/x",
])
async def test_next_refuses_anything_but_a_local_console_path(api: Api, target: str) -> None:
    await add_user(api, "ops@example.com", "owner")
    async with browser(api) as client:
        login = await client.get("/console/login", params={"next": target})
        assert page(login).value_of("next") == "/console/"
        form = page(login)
        answer = await client.post("/console/login", data={
            "login_csrf": form.value_of("login_csrf"), "next": target,
            "username": "ops@example.com", "password": PASSWORD})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/console/"


async def test_sign_out_needs_csrf_and_revokes_the_console_token(api: Api) -> None:
    await add_user(api, "ops@example.com", "owner")
    async with signed_in(api, username="ops@example.com") as client:
        cookie = client.cookies["ota_console"]
        refused = await client.post("/console/logout", data={"csrf_token": "forged"})
        assert refused.status_code == 403 and page(refused).alerts
        assert (await client.get("/console/")).status_code == 200  # still signed in
        out = await post_form(client, "/console/logout", {}, csrf_from="/console/")
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
    token = cookie.partition(":")[2]
    async with httpx.AsyncClient(base_url=api.handle.api_url, headers={
            "Authorization": f"Bearer {token}"}) as direct:
        assert (await direct.get("/v1/access_tokens/current")).status_code == 401


async def test_sign_out_keeps_a_pasted_api_token_valid(api: Api) -> None:
    token = await api.token_for("viewer")
    async with signed_in(api, token=token) as client:
        out = await post_form(client, "/console/logout", {}, csrf_from="/console/")
        assert out.status_code == 303
        assert (await client.get("/console/")).status_code == 303  # the cookie is gone
    async with httpx.AsyncClient(base_url=api.handle.api_url, headers={
            "Authorization": f"Bearer {token}"}) as direct:
        assert (await direct.get("/v1/access_tokens/current")).status_code == 200


async def test_a_team_member_sees_only_their_products(api: Api) -> None:
    await api.create_product("Alpha")
    await api.create_product("Beta")
    await add_user(api, "alice@example.com")
    await join_team(api, "alpha", "alice@example.com", "viewer")
    async with signed_in(api, username="alice@example.com") as client:
        home = page(await client.get("/console/"))
        assert "Alpha" in home.all_text and "Beta" not in home.all_text
        hidden = await client.get("/console/products/beta/stream")
        unknown = await client.get("/console/products/gamma/stream")
        assert hidden.status_code == unknown.status_code == 404
        assert page(hidden).alerts == ["product 'beta' not found (give its id or slug)"]


async def test_unknown_pages_and_bad_paths_are_html_error_pages(api: Api) -> None:
    await add_user(api, "ops@example.com", "owner")
    async with signed_in(api, username="ops@example.com") as client:
        missing = await client.get("/console/no/such/page")
        assert missing.status_code == 404 and page(missing).alerts
        long_ref = await client.get("/console/products/" + "9" * 30 + "/stream")
        assert long_ref.status_code == 404 and page(long_ref).alerts
        wrong_method = await client.delete("/console/")
        assert wrong_method.status_code == 405 and page(wrong_method).alerts


async def test_static_assets_ship_with_the_package(api: Api) -> None:
    async with browser(api) as client:
        htmx = await client.get("/console/static/htmx.min.js")
        assert htmx.status_code == 200 and b"htmx" in htmx.content[:2000]
        assert (await client.get("/console/static/htmx.LICENSE")).status_code == 200
        assert (await client.get("/console/static/console.js")).status_code == 200


async def _read_until(lines: AsyncIterator[str], predicate: object) -> str:
    async for line in lines:
        if predicate(line):  # type: ignore[operator]
            return line
    raise AssertionError("the stream ended first")


async def test_the_stream_delivers_events_and_stops_for_a_revoked_session(api: Api) -> None:
    await api.create_product("Widget")
    await add_user(api, "ops@example.com", "owner")
    async with signed_in(api, username="ops@example.com") as client:
        with trio.fail_after(20):
            async with client.stream("GET", "/console/products/widget/stream") as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.aiter_lines()
                await _read_until(lines, lambda line: line == ":ok")
                published = await api.client.post("/v1/products/widget/events",
                                                   json={"name": "console-test", "data": "hi"})
                assert published.status_code == 200
                data = await _read_until(lines, lambda line: line.startswith("data: "))
                assert '"name":"console-test"' in data and '"data":"hi"' in data
                # Revoke the session's token behind the console's back: the stream ends.
                token = client.cookies["ota_console"].partition(":")[2]
                async with httpx.AsyncClient(base_url=api.handle.api_url, headers={
                        "Authorization": f"Bearer {token}"}) as direct:
                    assert (await direct.delete("/v1/access_tokens/current")).status_code == 200
                await _read_until(lines, lambda line: line.startswith(": access revoked"))


async def test_the_stream_needs_a_session(api: Api) -> None:
    await api.create_product("Widget")
    async with browser(api) as client:
        answer = await client.get("/console/products/widget/stream")
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/console/login?next=")
