"""A release driven from the console reaches real emulated devices (TLS 1.3 and DTLS 1.2 on
real sockets), and the live release view counts it: the stream carries the events the view
listens to, and the re-fetched fragment shows every device updated, the bytes sent against
full images, and a latency point per device; the REST progress agrees."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from tests.console_helpers import page, post_form
from tests.test_ota_e2e_kit import STEP, SYSTEM_5003, app, ota_rig, running, updated_to


@asynccontextmanager
async def _signed_in(base_url: str, token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        login = page(await client.get("/console/login"))
        answer = await client.post("/console/login", data={
            "login_csrf": login.value_of("login_csrf"), "next": login.value_of("next"),
            "username": "", "password": "", "token": token})
        assert answer.status_code == 303, answer.text
        yield client


async def _event_names(lines: AsyncIterator[str], wanted: set[str], seen: list[str]) -> None:
    """Read the stream until every name in ``wanted`` came by (names noted in ``seen``)."""
    async for line in lines:
        if line.startswith("data: "):
            seen.append(json.loads(line[6:])["name"])
            if wanted <= set(seen):
                return


async def test_a_console_release_reaches_devices_and_the_view_counts_it(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    async with ota_rig(nursery, tmp_path, count=2) as rig:
        a, b = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        v2 = app(2)
        product = (await rig.api.get(f"/v1/products/{rig.product}")).json()["product"]
        base = f"/console/products/{product['slug']}/firmware"
        async with _signed_in(rig.kit.handle.api_url, rig.kit.token) as client:
            token = page(await client.get(base)).value_of("csrf_token")
            uploaded = await client.post(base, data={"csrf_token": token, "version": "2",
                                                     "title": "two"},
                                         files={"file": ("app.bin", v2, "a/b")})
            assert uploaded.status_code == 303, uploaded.text
            url = f"{base}/2"
            fragment_url = url + "/release-view"
            assert f'hx-get="{fragment_url}"' in (await client.get(url)).text
            listened = "spark/flash/status spark/status particle/product/firmware/released"
            assert listened in (await client.get(url)).text
            fleet = rig.fleet([(a, "tcp"), (b, "udp")])
            async with running(fleet):
                for device in (a, b):
                    await fleet.wait_until(updated_to(device, 1), timeout=STEP)
                seen: list[str] = []
                with trio.fail_after(STEP * 2):
                    async with client.stream(
                            "GET", f"/console/products/{product['slug']}/stream") as stream:
                        lines = stream.aiter_lines()
                        released = await post_form(
                            client, url + "/release",
                            {"release_to": "product", "intelligent": "on", "force": "on"},
                            csrf_from=url)
                        assert released.status_code == 303, released.text
                        # The events the page re-fetches its view on come over its stream.
                        await _event_names(lines, {"particle/product/firmware/released",
                                                   "spark/flash/status"}, seen)
                        for device in (a, b):
                            await fleet.wait_until(updated_to(device, 2), timeout=STEP)
                        await rig.events.wait_for("spark/flash/status", a, "success")
                        await rig.events.wait_for("spark/flash/status", b, "success")
                        await rig.wait_device(a, lambda d: d["firmware_version"] == 2)
                        await rig.wait_device(b, lambda d: d["firmware_version"] == 2)
            view = page(await client.get(fragment_url))
            assert view.testids["release-state"] == "All updated"
            assert (view.testids["release-target-count"], view.testids["release-updated-count"],
                    view.testids["release-failed-count"]) == ("2", "2", "0")
            assert "2 of 2 targeted devices updated" in (await client.get(fragment_url)).text
            assert "full images to all 2 targeted devices" in view.all_text.lower()
        progress = (await rig.api.get(
            f"/v1/products/{rig.product}/firmware/2/progress")).json()
        assert (progress["state"], progress["target"], progress["updated"],
                progress["failed"]) == ("All updated", 2, 2, 0)
        assert progress["latency"]["count"] == 2
        assert progress["latency"]["p50_ms"] is not None and progress["latency"]["p50_ms"] >= 0
        sent = progress["bytes"]
        assert sent["full_images_for_target"] == 2 * len(v2)
        assert sent["full_transfers"] + sent["compressed_transfers"] + sent[
            "delta_transfers"] == 2
        assert 0 < sent["sent"] <= sent["full_images"] == 2 * len(v2)
        assert progress["releases"][0]["scope"] == "product"
        assert progress["releases"][0]["intelligent"] is True


async def test_a_rolled_back_update_shows_as_a_failure_with_its_reason(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    from otacore.device import make_test_marker

    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        bad = app(2, marker=make_test_marker(selftest_fail_after=0.3))
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, bad)
        await rig.release(2, product_default=True)
        product = (await rig.api.get(f"/v1/products/{rig.product}")).json()["product"]
        fleet = rig.fleet([(device_id, "udp")])
        async with running(fleet):
            await rig.events.wait_for("spark/flash/status", device_id, "failed")
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
        async with _signed_in(rig.kit.handle.api_url, rig.kit.token) as client:
            answer = await client.get(
                f"/console/products/{product['slug']}/firmware/2/release-view")
            view = page(answer)
        assert view.testids["release-state"] == "Finished with failures"
        assert (view.testids["release-target-count"], view.testids["release-updated-count"],
                view.testids["release-failed-count"]) == ("1", "0", "1")
        assert f">{device_id}</a>" in answer.text and "rolled_back" in view.all_text
        progress = (await rig.api.get(
            f"/v1/products/{rig.product}/firmware/2/progress")).json()
        [failed] = progress["failed_devices"]
        assert failed["id"] == device_id and failed["reason"].startswith("rolled_back")
        assert progress["latency"]["count"] == 0
