"""The console's firmware pages over the real server: the list and the upload form (the
module checks' refusal shown inline with the values kept), CSRF, the size limit, the access
rules, the release form changing what devices are offered, and bad input never a 500."""

from __future__ import annotations

import random

import httpx
import pytest

from tests.conftest import TEST_UPLOAD_LIMIT, Api, _make_firmware
from tests.console_helpers import add_user, join_team, page, post_form, signed_in

D1 = "0123456789abcdef01234567"
D2 = "89abcdef0123456789abcdef"


async def _csrf(client: httpx.AsyncClient, url: str) -> str:
    answer = await client.get(url)
    assert answer.status_code == 200, answer.text
    return page(answer).value_of("csrf_token")


async def _upload(client: httpx.AsyncClient, slug: str, *, version: str, image: bytes,
                  title: str = "first", description: str = "", csrf: str | None = None
                  ) -> httpx.Response:
    url = f"/console/products/{slug}/firmware"
    token = csrf if csrf is not None else await _csrf(client, url)
    return await client.post(url, data={"csrf_token": token, "version": version,
                                        "title": title, "description": description},
                             files={"file": ("app.bin", image, "application/octet-stream")})


async def test_upload_ok_then_listed_and_shown(api: Api) -> None:
    product = await api.create_product("Widget")
    async with signed_in(api, token=api.token) as client:
        listing = page(await client.get(f"/console/products/{product['slug']}/firmware"))
        for label, name in (("Firmware file", "file"), ("Version", "version"),
                            ("Title", "title"), ("Description", "description")):
            assert listing.control_labelled(label).name == name
        assert listing.unlabelled() == []
        answer = await _upload(client, product["slug"], version="2", image=_make_firmware(2),
                               title="Second", description="fixes")
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"].endswith(
            f"/console/products/{product['slug']}/firmware/2?uploaded=1")
        shown = page(await client.get(answer.headers["location"]))
        assert "Version 2 was uploaded." in shown.all_text
        assert "Second" in shown.all_text and "fixes" in shown.all_text
        assert shown.testids["release-state"] == "Not released"
        assert shown.unlabelled() == []
        listed = page(await client.get(f"/console/products/{product['slug']}/firmware"))
        assert any(text == "Version 2" for _, text in listed.links)
    rest = (await api.client.get(f"/v1/products/{product['slug']}/firmware/2")).json()
    assert (rest["title"], rest["description"], rest["uploaded_by"]["username"]) == (
        "Second", "fixes", "test owner")


async def test_a_wrong_version_upload_is_refused_inline_with_the_values_kept(api: Api) -> None:
    product = await api.create_product("Widget")
    async with signed_in(api, token=api.token) as client:
        answer = await _upload(client, product["slug"], version="3", image=_make_firmware(2),
                               title="Mislabelled <b>", description="keep me")
        assert answer.status_code == 400
        shown = page(answer)
        [alert] = shown.alerts
        assert "embedded product version is 2 but the upload says version 3" in alert
        assert shown.control_labelled("Version").attrs["value"] == "3"
        assert shown.control_labelled("Title").attrs["value"] == "Mislabelled <b>"
        assert "keep me" in shown.all_text
        # Not a module at all, and no file: each refusal names its reason.
        answer = await _upload(client, product["slug"], version="2", image=b"not a module")
        assert answer.status_code == 400
        assert "not a valid firmware module" in page(answer).alerts[0]
        url = f"/console/products/{product['slug']}/firmware"
        answer = await client.post(url, data={"csrf_token": await _csrf(client, url),
                                              "version": "2", "title": "x"},
                                   files={"other": ("a", b"", "text/plain")})
        assert answer.status_code == 400
        assert "choose the firmware file" in page(answer).alerts[0]
    assert (await api.client.get(f"/v1/products/{product['slug']}/firmware")).json() == []


async def test_upload_needs_the_csrf_token_and_keeps_to_the_size_limit(api: Api) -> None:
    product = await api.create_product("Widget")
    async with signed_in(api, token=api.token) as client:
        answer = await _upload(client, product["slug"], version="2", image=_make_firmware(2),
                               csrf="forged")
        assert answer.status_code == 403
        assert "security token" in page(answer).alerts[0]
        big = b"\0" * (TEST_UPLOAD_LIMIT + 10)
        answer = await _upload(client, product["slug"], version="2", image=big)
        assert answer.status_code == 413
        assert page(answer).alerts
    assert (await api.client.get(f"/v1/products/{product['slug']}/firmware")).json() == []


async def test_release_through_the_console_changes_what_devices_are_offered(api: Api) -> None:
    product = await api.create_product("Widget")
    slug = product["slug"]
    for device in (D1, D2):
        assert (await api.client.post(f"/v1/products/{slug}/devices",
                                      json={"id": device})).status_code == 200
    assert (await api.client.post(f"/v1/products/{slug}/groups",
                                  json={"name": "beta"})).status_code == 201
    assert (await api.client.put(f"/v1/products/{slug}/devices/{D2}",
                                 json={"groups": ["beta"]})).status_code == 200
    for version in (2, 3):
        assert (await api.upload(slug, version)).status_code == 201

    def target(device: str) -> object:
        return api.client.get(f"/v1/products/{slug}/devices/{device}")

    async with signed_in(api, token=api.token) as client:
        url = f"/console/products/{slug}/firmware/2"
        form = page(await client.get(url))
        assert form.control_labelled("Release to").name == "release_to"
        assert form.control_labelled("Groups").name == "groups"
        assert form.control_labelled("Immediate update").attrs["type"] == "checkbox"
        # Never seen running: refused with the reason, on the page.
        answer = await post_form(client, url + "/release", {"release_to": "product"},
                                 csrf_from=url)
        assert answer.status_code == 400
        assert "has not been reported running" in page(answer).alerts[0]
        answer = await post_form(client, url + "/release",
                                 {"release_to": "product", "force": "on"}, csrf_from=url)
        assert answer.status_code == 303, answer.text
        shown = page(await client.get(answer.headers["location"]))
        assert shown.testids["release-target-count"] == "2"
        assert shown.testids["release-updated-count"] == "0"
        assert shown.testids["release-state"] == "In progress"
        # v3 to group beta, immediate: D2 follows it, D1 keeps the product default.
        url3 = f"/console/products/{slug}/firmware/3"
        answer = await post_form(client, url3 + "/release",
                                 {"release_to": "groups", "groups": "beta",
                                  "intelligent": "on", "force": "on"}, csrf_from=url3)
        assert answer.status_code == 303, answer.text
        d1, d2 = (await target(D1)).json(), (await target(D2)).json()
        assert (d1["targeted_firmware_release_version"], d1["target_reason"]) == (
            2, "product_default")
        assert (d2["targeted_firmware_release_version"], d2["target_reason"]) == (
            3, "group_release")
        assert page(await client.get(url)).testids["release-target-count"] == "1"
        # An unknown group: refused, the form's values kept.
        answer = await post_form(client, url3 + "/release",
                                 {"release_to": "groups", "groups": "nope", "force": "on"},
                                 csrf_from=url3)
        assert answer.status_code == 400
        shown = page(answer)
        assert "group 'nope' does not exist" in shown.alerts[0]
        assert shown.control_labelled("Groups").attrs["value"] == "nope"
        # Withdrawn: D2 falls back to the product default.
        answer = await post_form(client, url3 + "/withdraw", {}, csrf_from=url3)
        assert answer.status_code == 303
        assert (await target(D2)).json()["targeted_firmware_release_version"] == 2
        # A released version cannot be deleted (the button is not even offered); the
        # withdrawn one can.
        assert not any("/delete" in c.attrs.get("formaction", "") for c in form.controls)
        answer = await post_form(client, url + "/delete", {}, csrf_from=url)
        assert answer.status_code == 409
        assert "is released" in page(answer).alerts[0]
        assert "Delete version 3" in page(await client.get(url3)).all_text
        answer = await post_form(client, url3 + "/delete", {}, csrf_from=url3)
        assert answer.status_code == 303
        listed = page(await client.get(answer.headers["location"]))
        assert "Version 3 was deleted." in listed.all_text
        assert not any(text == "Version 3" for _, text in listed.links)
    audit = (await api.client.get(f"/v1/products/{slug}/audit?action=firmware.release")).json()
    assert [e["actor"] for e in audit["entries"]] == ["test owner"] * 3


async def test_access_rules_of_the_firmware_pages(api: Api) -> None:
    product = await api.create_product("Widget")
    slug = product["slug"]
    assert (await api.upload(slug, 2)).status_code == 201
    await add_user(api, "vera@example.com")
    await join_team(api, slug, "vera@example.com", "viewer")
    await add_user(api, "nobody@example.com")
    async with signed_in(api, username="vera@example.com") as viewer:
        listing = page(await viewer.get(f"/console/products/{slug}/firmware"))
        assert "Version 2" in listing.all_text
        answer = await _upload(viewer, slug, version="3", image=_make_firmware(3))
        assert answer.status_code == 403
        # Refused before its body was read: the answer closes the connection (RFC 9112
        # 9.6), or a browser reusing it would wait for an answer that never comes.
        assert answer.headers["connection"] == "close"
        shown = page(await viewer.get(f"/console/products/{slug}/firmware/2"))
        assert shown.testids["release-state"] == "Not released"
        assert not any(c.attrs.get("name") == "release_to" for c in shown.controls)
        answer = await viewer.post(f"/console/products/{slug}/firmware/2/release",
                                   data={"csrf_token": shown.value_of("csrf_token"),
                                         "release_to": "product", "force": "on"})
        assert answer.status_code == 403
    async with signed_in(api, username="nobody@example.com") as stranger:
        for path in ("firmware", "firmware/2", "firmware/2/release-view", "rollouts", "audit",
                     "events"):
            assert (await stranger.get(f"/console/products/{slug}/{path}")).status_code == 404
    firmware = (await api.client.get(f"/v1/products/{slug}/firmware/2")).json()
    assert firmware["product_default"] is False


@pytest.mark.parametrize("seed", [17, 4242])
async def test_fuzzed_paths_forms_and_queries_get_4xx_never_500(api: Api, seed: int) -> None:
    print(f"seed {seed}")
    rng = random.Random(seed)
    product = await api.create_product("Widget")
    slug = product["slug"]
    assert (await api.upload(slug, 2)).status_code == 201
    nasty = ["", "-1", "65536", "1e9", "9" * 60, "%00", "\u202e", "a" * 3000, "2.5", " 2",
             "true", "[]", "{}", "../2", "\udcff".encode("utf-8", "surrogatepass").hex()]
    async with signed_in(api, token=api.token) as client:
        csrf = await _csrf(client, f"/console/products/{slug}/firmware")
        for _ in range(40):
            value = rng.choice(nasty)
            other = rng.choice(nasty)
            requests = [
                client.get(f"/console/products/{slug}/firmware/{value}"),
                client.get(f"/console/products/{slug}/firmware/{value}/release-view"),
                client.get(f"/console/products/{slug}/rollouts/{value}"),
                client.get(f"/console/products/{slug}/rollouts", params={"version": value}),
                client.get(f"/console/products/{slug}/audit",
                           params={"before": value, "action": other, "actor": value}),
                client.get(f"/console/products/{slug}/events",
                           params={"prefix": value, "device": other}),
                client.post(f"/console/products/{slug}/firmware/2/release",
                            data={"csrf_token": csrf, "release_to": value, "groups": other,
                                  "intelligent": value}),
                client.post(f"/console/products/{slug}/firmware/{value}/withdraw",
                            data={"csrf_token": csrf}),
                client.post(f"/console/products/{slug}/rollouts",
                            data={"csrf_token": csrf, "version": value, "phases": other,
                                  "phase_wait": value, "max_failure_percent": other}),
                client.post(f"/console/products/{slug}/rollouts/{value}/pause",
                            data={"csrf_token": csrf, "reason": other}),
                client.post(f"/console/products/{slug}/firmware",
                            data={"csrf_token": csrf, "version": value, "title": other},
                            files={"file": ("x.bin", value.encode(errors="replace"), "a/b")}),
            ]
            for request in requests:
                answer = await request
                assert answer.status_code < 500, (answer.request.url, answer.text[:300])
        # Repeated fields where one is expected.
        answer = await client.post(f"/console/products/{slug}/firmware/2/release",
                                   content=f"csrf_token={csrf}&release_to=product&release_to="
                                           "groups&force=on&force=on",
                                   headers={"content-type": "application/x-www-form-urlencoded"})
        assert 400 <= answer.status_code < 500
    firmware = (await api.client.get(f"/v1/products/{slug}/firmware/2")).json()
    assert firmware["product_default"] is False  # nothing fuzzed released it
