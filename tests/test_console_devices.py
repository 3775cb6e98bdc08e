"""The console's device list, device page and groups page over the real server and a real
SQLite store: filters and paging, the device actions (each through ``Fleet.update_device``
as the REST API does), roles, product teams, labels, and groups CRUD.
"""

from __future__ import annotations

import re

import trio

from tests.conftest import Api
from tests.console_helpers import Page, add_user, join_team, page, post_form, signed_in

D = [f"{n:024x}" for n in range(1, 8)]


async def _fleet(api: Api) -> None:
    """Product "widget": firmware 1-3; seven devices; groups beta (D0-D2) and lab (D3);
    D0-D1 report version 2, D2 version 1, D3 version 3; D4 development; D5 locked to 1;
    D0 and D3 online (their hellos), D1 and D2 offline again; firmware 2 released to the
    product."""
    await api.create_product("Widget")
    for version in (1, 2, 3):
        assert (await api.upload("widget", version)).status_code == 201
    for device_id in D:
        answer = await api.client.post("/v1/products/widget/devices", json={"id": device_id})
        assert answer.status_code == 200, answer.text
    for name in ("beta", "lab"):
        answer = await api.client.post("/v1/products/widget/groups", json={"name": name})
        assert answer.status_code == 201, answer.text
    for device_id, changes in (
        (D[0], {"groups": ["beta"]}), (D[1], {"groups": ["beta"]}),
        (D[2], {"groups": ["beta"]}), (D[3], {"groups": ["lab"]}),
        (D[4], {"development": True}), (D[5], {"desired_firmware_version": 1}),
    ):
        answer = await api.client.put(f"/v1/products/widget/devices/{device_id}", json=changes)
        assert answer.status_code == 200, answer.text
    for device_id, version in ((D[0], 2), (D[1], 2), (D[2], 1), (D[3], 3)):
        await api.report_running(device_id, version)
    for device_id in (D[1], D[2]):  # the hello marked them online: their sessions end
        await api.handle.fleet.device_offline(device_id)
    answer = await api.client.put("/v1/products/widget/firmware/release",
                                  json={"version": 2, "product_default": True})
    assert answer.status_code == 200, answer.text


def _listed(listing: Page) -> list[str]:
    """Device ids of the list's rows (each row's id links to its page)."""
    return [m.group(1) for href, _ in listing.links
            if (m := re.fullmatch(r"/console/products/widget/devices/([0-9a-f]{24})", href))]


async def _online(api: Api) -> set[str]:
    with api.store.read() as tx:
        return {d.id for d in tx.list_devices(tx.get_product("widget").id, online=True)[0]}


async def test_filters_select_the_right_devices(api: Api) -> None:
    await _fleet(api)
    await add_user(api, "ops@example.com", "owner")
    online = await _online(api)
    async with signed_in(api, username="ops@example.com") as client:
        async def listed(query: str) -> list[str]:
            answer = await client.get(f"/console/products/widget/devices?{query}")
            assert answer.status_code == 200, answer.text
            return _listed(page(answer))

        assert await listed("") == D
        assert await listed("group=beta") == D[:3]
        assert await listed("version=2") == D[:2]
        assert await listed("development=yes") == [D[4]]
        assert await listed("locked=yes") == [D[5]]
        assert await listed("locked=no&group=beta&version=1") == [D[2]]
        assert await listed("online=yes") == sorted(online)
        assert await listed("online=no") == sorted(set(D) - online)
        # Released version 2 to the product: D0, D1 run it; D2 (v1), D3 (v3) must move;
        # D4 is a development device; D5 is locked to 1 and does not report it.
        assert await listed("status=up_to_date") == D[:2]
        assert await listed("status=no_target") == [D[4]]
        assert await listed("status=pending") == [D[2], D[3], D[5], D[6]]
        assert await listed(f"q={D[3][-6:]}") == [D[3]]


async def test_paging_links_keep_the_filters(api: Api) -> None:
    await _fleet(api)
    await add_user(api, "ops@example.com", "viewer")
    async with signed_in(api, username="ops@example.com") as client:
        first = page(await client.get("/console/products/widget/devices?per_page=2&locked=no"))
        assert _listed(first) == D[:2]
        links = dict((text, href) for href, text in first.links)
        assert "Previous" not in links
        second_url = links["Next"]
        assert "locked=no" in second_url and "per_page=2" in second_url
        second = page(await client.get(second_url))
        assert _listed(second) == D[2:4]
        seen = _listed(first) + _listed(second)
        url = dict((text, href) for href, text in second.links).get("Next")
        while url:
            more = page(await client.get(url))
            seen += _listed(more)
            url = dict((text, href) for href, text in more.links).get("Next")
        assert seen == [d for d in D if d != D[5]]
        assert "Previous" in dict((text, href) for href, text in second.links)


async def test_the_rows_are_a_live_fragment(api: Api) -> None:
    """The list re-fetches its rows (``?fragment=results``, with the same filters) on the
    product's events: the fragment is the rows alone and shows what changed."""
    await _fleet(api)
    await add_user(api, "ops@example.com", "owner")
    async with signed_in(api, username="ops@example.com") as client:
        full = await client.get("/console/products/widget/devices?group=beta&online=no")
        source = re.search(r'<div id="device-results" hx-get="([^"]+)"', full.text)
        assert source is not None
        url = source.group(1).replace("&amp;", "&")
        assert "fragment=results" in url and "group=beta" in url and "online=no" in url
        fragment = await client.get(url)
        assert fragment.status_code == 200 and "<html" not in fragment.text
        assert _listed(page(fragment)) == [D[1], D[2]]
        await api.handle.fleet.device_online(D[1])
        assert _listed(page(await client.get(url))) == [D[2]]


async def test_bad_filters_are_400_pages_with_the_reason(api: Api) -> None:
    await _fleet(api)
    await add_user(api, "ops@example.com", "owner")
    async with signed_in(api, username="ops@example.com") as client:
        for query, reason in (("status=sideways", "update status must be one of"),
                              ("version=70000", "version must be a whole number"),
                              ("online=maybe", "online must be yes, no"),
                              ("page=0", "page must be"),
                              ("per_page=100000", "per_page must be")):
            answer = await client.get(f"/console/products/widget/devices?{query}")
            assert answer.status_code == 400, query
            assert reason in page(answer).alerts[0], (query, page(answer).alerts)


async def test_the_device_page_shows_state_and_target(api: Api) -> None:
    await _fleet(api)
    await add_user(api, "ops@example.com", "viewer")
    async with signed_in(api, username="ops@example.com") as client:
        device = page(await client.get(f"/console/products/widget/devices/{D[2]}"))
        assert device.testids["device-firmware-version"] == "1"
        assert device.testids["device-target"].startswith("version 2: the product's default")
        assert device.testids["device-update-status"] == "Pending"
        locked = page(await client.get(f"/console/products/widget/devices/{D[5]}"))
        assert locked.testids["device-target"].startswith("version 1: locked")
        # A viewer sees no action buttons.
        assert "Lock" not in [c.attrs.get("type") for c in device.controls]
        fragment = await client.get(f"/console/products/widget/devices/{D[2]}?fragment=status")
        assert fragment.status_code == 200 and "<html" not in fragment.text
        assert 'data-testid="device-firmware-version"' in fragment.text
        # Pending: re-fetched on its events and every 5 s; up to date: on its events only.
        assert 'hx-trigger="ota-event from:body throttle:300ms, every 5s"' in fragment.text
        current = await client.get(f"/console/products/widget/devices/{D[0]}?fragment=status")
        assert 'hx-trigger="ota-event from:body throttle:300ms"' in current.text


async def test_lock_with_flash_now_unlock_and_the_other_actions(api: Api) -> None:
    await _fleet(api)
    await add_user(api, "dev@example.com")
    await join_team(api, "widget", "dev@example.com", "developer")
    url = f"/console/products/widget/devices/{D[2]}"
    async with signed_in(api, username="dev@example.com") as client:
        device = page(await client.get(url))
        assert device.control_labelled("Lock to version").name == "version"
        assert device.control_labelled("Flash now").attrs["type"] == "checkbox"
        locked = await post_form(client, f"{url}/lock", {"version": "3", "flash": "on"},
                                 csrf_from=url)
        assert locked.status_code == 303 and locked.headers["location"] == f"{url}?done=flashing"
        shown = page(await client.get(locked.headers["location"]))
        assert "flashing it was requested" in shown.all_text
        state = (await api.client.get(f"/v1/products/widget/devices/{D[2]}")).json()
        assert state["desired_firmware_version"] == 3 and state["flash_requested"] is True
        assert state["pending_flash"]["version"] == 3
        await post_form(client, f"{url}/unlock", {}, csrf_from=url)
        await post_form(client, f"{url}/development", {"development": "yes"}, csrf_from=url)
        await post_form(client, f"{url}/forced", {"forced": "yes"}, csrf_from=url)
        await post_form(client, f"{url}/groups/add", {"group": "lab"}, csrf_from=url)
        await post_form(client, f"{url}/groups/remove", {"group": "beta"}, csrf_from=url)
        state = (await api.client.get(f"/v1/products/widget/devices/{D[2]}")).json()
        assert state["desired_firmware_version"] is None and state["development"] is True
        assert state["firmware_updates_forced"] is True and state["groups"] == ["lab"]
        # The actions are audited as the user and shown in the device's activity.
        history = page(await client.get(url))
        assert "dev@example.com" in history.all_text and "device.update" in history.all_text


async def test_refused_actions_show_the_reason_on_the_page(api: Api) -> None:
    await _fleet(api)
    await add_user(api, "ops@example.com", "owner")
    url = f"/console/products/widget/devices/{D[2]}"
    async with signed_in(api, username="ops@example.com") as client:
        missing = await post_form(client, f"{url}/lock", {"version": "9"}, csrf_from=url)
        assert missing.status_code == 404
        assert "no firmware version 9" in page(missing).alerts[0]
        assert page(missing).testids["device-firmware-version"] == "1"  # the page, again
        bad = await post_form(client, f"{url}/lock", {"version": "x1"}, csrf_from=url)
        assert bad.status_code == 400 and "must be a number" in page(bad).alerts[0]
        twice = await post_form(client, f"{url}/groups/add", {"group": "beta"}, csrf_from=url)
        assert twice.status_code == 400 and "already" in page(twice).alerts[0]
        forged = await client.post(f"{url}/unlock", data={"csrf_token": "nope"})
        assert forged.status_code == 403 and "security token" in page(forged).alerts[0]


async def test_a_viewer_cannot_lock_and_another_team_cannot_see(api: Api) -> None:
    await _fleet(api)
    await api.create_product("Other")
    await add_user(api, "viewer@example.com")
    await join_team(api, "widget", "viewer@example.com", "viewer")
    await add_user(api, "stranger@example.com")
    await join_team(api, "other", "stranger@example.com", "developer")
    url = f"/console/products/widget/devices/{D[2]}"
    async with signed_in(api, username="viewer@example.com") as client:
        refused = await post_form(client, f"{url}/lock", {"version": "3"}, csrf_from=url)
        assert refused.status_code == 403 and page(refused).alerts
    state = (await api.client.get(f"/v1/products/widget/devices/{D[2]}")).json()
    assert state["desired_firmware_version"] is None
    async with signed_in(api, username="stranger@example.com") as client:
        for path in (url, "/console/products/widget/devices", "/console/products/widget/groups"):
            answer = await client.get(path)
            assert answer.status_code == 404, path
            assert page(answer).alerts == ["product 'widget' not found (give its id or slug)"]
        # Its own product's page for a device of another product: 404 too.
        answer = await client.get(f"/console/products/other/devices/{D[2]}")
        assert answer.status_code == 404


async def test_every_control_has_a_label(api: Api) -> None:
    await _fleet(api)
    await add_user(api, "ops@example.com", "owner")
    async with signed_in(api, username="ops@example.com") as client:
        for path in ("/console/", "/console/products/widget/devices",
                     f"/console/products/widget/devices/{D[0]}",
                     "/console/products/widget/groups"):
            shown = page(await client.get(path))
            assert shown.unlabelled() == [], (path, shown.unlabelled())
            buttons = [c for c in shown.controls if c.tag == "button"]
            assert buttons, path
        listing = page(await client.get("/console/products/widget/devices"))
        for label in ("Group", "Version", "Online", "Development", "Locked", "Update status"):
            listing.control_labelled(label)
        assert "Filter" in listing.all_text


async def test_groups_crud(api: Api) -> None:
    await _fleet(api)
    await add_user(api, "ops@example.com", "owner")
    groups = "/console/products/widget/groups"
    async with signed_in(api, username="ops@example.com") as client:
        listing = page(await client.get(groups))
        assert "/console/products/widget/devices?group=beta" in [h for h, _ in listing.links]
        created = await post_form(client, groups, {"name": "field", "description": "outdoor",
                                                   "color": "#12ab34"})
        assert created.status_code == 303
        refused = await post_form(client, groups, {"name": "field", "description": "",
                                                   "color": ""})
        assert refused.status_code == 409 and "already has a group" in page(refused).alerts[0]
        kept = next(c for c in page(refused).controls if c.attrs.get("id") == "new-name")
        assert kept.attrs["value"] == "field"  # the form keeps what was typed
        bad_color = await post_form(client, groups, {"name": "x", "description": "",
                                                     "color": "red"})
        assert bad_color.status_code == 400 and "#rrggbb" in page(bad_color).alerts[0]
        edited = await post_form(client, f"{groups}/field/edit",
                                 {"name": "field2", "description": "moved", "color": ""},
                                 csrf_from=groups)
        assert edited.status_code == 303
        body = (await api.client.get("/v1/products/widget/groups/field2")).json()["group"]
        assert body["description"] == "moved"
        deleted = await post_form(client, f"{groups}/beta/delete", {}, csrf_from=groups)
        assert deleted.status_code == 303
        names = [g["name"] for g in
                 (await api.client.get("/v1/products/widget/groups")).json()["groups"]]
        assert names == ["field2", "lab"]
        device = (await api.client.get(f"/v1/products/widget/devices/{D[0]}")).json()
        assert device["groups"] == []
        counts = page(await client.get(groups)).all_text
        assert "lab" in counts


async def test_rest_list_takes_the_new_filters(api: Api) -> None:
    await _fleet(api)
    answer = await api.client.get("/v1/products/widget/devices", params={
        "update_status": "up_to_date", "firmware_version": "2", "locked": "false"})
    assert answer.status_code == 200, answer.text
    assert [d["id"] for d in answer.json()["devices"]] == D[:2]
    assert answer.json()["devices"][0]["update_status"] == "up_to_date"
    bad = await api.client.get("/v1/products/widget/devices", params={"update_status": "x"})
    assert bad.status_code == 400 and "update status" in bad.json()["error"]
    bad = await api.client.get("/v1/products/widget/devices", params={"online": "perhaps"})
    assert bad.status_code == 400


async def test_the_device_page_follows_the_device_live(api: Api) -> None:
    """The status fragment the page re-fetches on the device's events shows what changed."""
    await _fleet(api)
    await add_user(api, "ops@example.com", "owner")
    url = f"/console/products/widget/devices/{D[2]}"
    async with signed_in(api, username="ops@example.com") as client:
        with trio.fail_after(20):
            async with client.stream("GET", f"/console/products/widget/stream?device={D[2]}"
                                     ) as stream:
                lines = stream.aiter_lines()
                async for line in lines:
                    if line == ":ok":
                        break
                await api.report_running(D[2], 2)
                async for line in lines:
                    if line.startswith("data: ") and D[2] in line:
                        break
        fragment = page(await client.get(f"{url}?fragment=status"))
        assert fragment.testids["device-firmware-version"] == "2"
        assert fragment.testids["device-update-status"] == "Up to date"
        other = await client.get(f"/console/products/widget/stream?device={'e' * 24}")
        assert other.status_code == 404



async def test_progress_and_a_failure_with_its_reason(api: Api) -> None:
    """A transfer in flight shows its progress; a failed update is a filterable status with
    the device's reason on the list and the device page."""
    await _fleet(api)
    await add_user(api, "ops@example.com", "viewer")
    fleet = api.handle.fleet
    url = f"/console/products/widget/devices/{D[2]}"
    await fleet.record_flash_status(D[2], "started")
    await fleet.record_update_progress(D[2], sha256="ab" * 32, version=2, transfer="delta",
                                       bytes_done=3072, bytes_total=12288)
    async with signed_in(api, username="ops@example.com") as client:
        fragment = page(await client.get(f"{url}?fragment=status"))
        assert fragment.testids["device-update-status"] == "Updating"
        assert "3.0 KiB of 12.0 KiB (25%)" in fragment.testids["device-update"]
        assert "delta transfer" in fragment.testids["device-update"]
        before = page(await client.get(url)).testids["device-updates"]
        assert "No update of this device has ended yet" in before
        updating = page(await client.get("/console/products/widget/devices?status=updating"))
        assert _listed(updating) == [D[2]]
        await fleet.record_flash_status(D[2], "failed", error="the image's CRC is wrong")
        failed = page(await client.get("/console/products/widget/devices?status=failed"))
        assert _listed(failed) == [D[2]]
        assert "the image's CRC is wrong" in failed.all_text
        device = page(await client.get(url))
        assert device.testids["device-update-status"] == "Failed"
        assert device.testids["device-update"] == "none"
        assert "failed at" in device.all_text and "the image's CRC is wrong" in device.all_text
        # The update history lists how each update ended, with the device's reason.
        ended = device.testids["device-updates"]
        assert "a release delta" in ended and "Failedthe image's CRC is wrong" in ended, ended
        assert "No update of this device has ended yet" not in ended
    # The REST device carries the same.
    body = (await api.client.get(f"/v1/products/widget/devices/{D[2]}")).json()
    assert body["update_status"] == "failed"
    assert body["last_update"]["status"] == "failed"
    assert body["last_update"]["error"] == "the image's CRC is wrong"


async def test_the_product_force_updates_switch(api: Api) -> None:
    await _fleet(api)
    await add_user(api, "dev@example.com")
    await join_team(api, "widget", "dev@example.com", "developer")
    await add_user(api, "viewer@example.com")
    await join_team(api, "widget", "viewer@example.com", "viewer")
    devices = "/console/products/widget/devices"
    async with signed_in(api, username="dev@example.com") as client:
        shown = page(await client.get(devices))
        assert "Force updates for the product" in shown.all_text
        answer = await post_form(client, "/console/products/widget/forced", {"forced": "yes"},
                                 csrf_from=devices)
        assert answer.status_code == 303
        assert "Stop forcing updates for the product" in page(await client.get(devices)).all_text
    product = (await api.client.get("/v1/products/widget")).json()["product"]
    assert product["firmware_updates_forced"] is True
    async with signed_in(api, username="viewer@example.com") as client:
        shown = page(await client.get(devices))
        assert "Force updates for the product" not in shown.all_text
        assert "Stop forcing" not in shown.all_text
        refused = await post_form(client, "/console/products/widget/forced", {"forced": "no"},
                                  csrf_from=devices)
        assert refused.status_code == 403
