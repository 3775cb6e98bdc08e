"""The console over real sockets with an emulated device: an operator locks the device with
"Flash now" on its page, the device takes the image, and the page's status fragment (what
the page re-fetches on the device's events) shows the new version; the device's events
arrive on the console's stream meanwhile.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import trio

from tests.console_helpers import page, sign_in
from tests.test_ota_e2e_kit import STEP, SYSTEM_5003, app, ota_rig, running, updated_to


async def test_flash_now_from_the_device_page(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        for version in (2, 3):
            await rig.upload(version, app(version))
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, "udp")])
        url = f"/console/products/{rig.product}/devices/{device_id}"
        async with running(fleet), httpx.AsyncClient(
                base_url=rig.kit.handle.api_url, timeout=STEP) as client:
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            assert (await sign_in(client, token=rig.kit.token)).status_code == 303
            shown = page(await client.get(url))
            assert shown.testids["device-online"] == "Online"
            csrf = shown.value_of("csrf_token")
            seen: list[str] = []

            async def watch(task_status: trio.TaskStatus[None]) -> None:
                stream_url = f"/console/products/{rig.product}/stream?device={device_id}"
                async with client.stream("GET", stream_url) as stream:
                    lines = stream.aiter_lines()
                    async for line in lines:
                        if line == ":ok":
                            break
                    task_status.started()
                    async for line in lines:
                        if line.startswith("data: "):
                            seen.append(line)

            async with trio.open_nursery() as watchers:
                await watchers.start(watch)
                locked = await client.post(f"{url}/lock", data={
                    "csrf_token": csrf, "version": "3", "flash": "on"})
                assert locked.status_code == 303, locked.text
                await fleet.wait_until(updated_to(device_id, 3), timeout=STEP)
                with trio.fail_after(STEP):  # the device's next hello reports version 3
                    while True:
                        fragment = page(await client.get(f"{url}?fragment=status"))
                        if fragment.testids["device-firmware-version"] == "3":
                            break
                        await trio.sleep(0.05)
                with trio.fail_after(STEP):
                    while not any('"success ' in line for line in seen):
                        await trio.sleep(0.05)
                watchers.cancel_scope.cancel()
            assert fragment.testids["device-target"].startswith("version 3: locked")
            assert all(f'"device_id":"{device_id}"' in line for line in seen)
            assert any(re.search(r'"name":"spark/flash/status","data":"started ', line)
                       for line in seen)
