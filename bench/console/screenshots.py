"""Regenerate the README's screenshots of the operators' console (1280x800, headless system
Chromium): ``docs/console-devices.png`` (the device list), ``docs/console-release.png`` (a
release's live view, mid-release) and ``docs/console-device.png`` (a device page).

A real ``ota server`` on a temporary data directory holds a product of 500 devices: 12
provisioned ones (named, in groups) that run as emulated devices on real sockets (TLS 1.3
and DTLS 1.2), and 488 seeded rows (bench/console/seed.py: regions, a canary group, a few
development and locked devices, updates in flight, 45% of them already on v2). v1 is the
product's release; the operator signs in and releases v2 to the whole product as an
immediate update from its firmware page; the emulated devices take it, and the offline
devices will at their next connection: mid-release.

Run from the repository root::

    .venv/bin/python -m bench.console.screenshots [--out-dir docs] [--seed N]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import httpx

from bench.console.seed import CANARY_GROUP, REGIONS, SeedPlan, seed_devices
from server.store.installation import Installation
from tests.browser import (
    OPERATOR,
    OPERATOR_PASSWORD,
    VIEWPORT,
    ConsoleFleet,
    chromium,
    console_fleet,
)

REAL_DEVICES = 12
SEEDED_DEVICES = 488
SHOTS = ("console-devices.png", "console-release.png", "console-device.png")


def _release(api: httpx.Client, product: int, version: int, **flags: bool) -> None:
    response = api.put(f"/v1/products/{product}/firmware/release",
                       json={"version": version, "product_default": True, "force": True,
                             **flags})
    response.raise_for_status()


def _upload(api: httpx.Client, fleet: ConsoleFleet, version: int, title: str) -> None:
    response = api.post(
        f"/v1/products/{fleet.product_id}/firmware",
        data={"version": str(version), "title": title,
              "description": f"{title}: sensor sampling and power management"},
        files={"binary": (f"app-v{version}.bin", fleet.image(version).read_bytes(),
                          "application/octet-stream")},
    )
    response.raise_for_status()


def take_screenshots(root: Path, out_dir: Path, seed: int) -> list[Path]:
    """Run the fleet mid-release and save the three screenshots in ``out_dir``."""

    def seed_rows(data: Path, product: int) -> None:
        store = Installation(data, None).open_store()
        try:
            seed_devices(store, product, SeedPlan(count=SEEDED_DEVICES, seed=seed,
                                                  updated_share=0.45),
                         now=int(time.time() * 1000))
        finally:
            store.close()

    with console_fleet(root, devices=REAL_DEVICES, before_start=seed_rows) as fleet, \
            chromium() as browser, fleet.api() as api:
        _upload(api, fleet, 1, "Field release 1")
        _upload(api, fleet, 2, "Field release 2")
        _release(api, fleet.product_id, 1)
        for n, device_id in enumerate(fleet.device_ids):  # regions, as the seeded ones
            groups = [REGIONS[n % len(REGIONS)], *([CANARY_GROUP] if n < 2 else [])]
            response = api.put(f"/v1/products/{fleet.product_id}/devices/{device_id}",
                               json={"groups": groups, "name": f"pump-{n + 1:02d}"})
            response.raise_for_status()
        fleet.start_emulator(version=1)
        real = set(fleet.device_ids)
        fleet.wait_devices(lambda ds: all(d["online"] and d["firmware_version"] == 1
                                          for d in ds if d["id"] in real))
        context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
        page = context.new_page()
        page.goto(fleet.console("/login"))  # the operator, by password
        page.get_by_label("Username").fill(OPERATOR)
        page.get_by_label("Password").fill(OPERATOR_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/console/login" not in url)
        product = fleet.product_id
        # v2 to the whole product, immediate, from its firmware page.
        page.goto(fleet.console(f"/products/{product}/firmware/2"))
        page.get_by_label("Release to").select_option(label="Product")
        page.get_by_label("Immediate update").check()
        unproven = page.get_by_label("Release even if no device has reported running it")
        if unproven.count():  # no device ran v2 yet (Particle asks for one first)
            unproven.check()
        with page.expect_navigation():
            page.get_by_role("button", name="Release", exact=True).click()
        fleet.wait_devices(lambda ds: all(d["online"] and d["firmware_version"] == 2
                                          for d in ds if d["id"] in real))
        out_dir.mkdir(parents=True, exist_ok=True)
        shots = [
            (SHOTS[0], f"/products/{product}/devices"),
            (SHOTS[1], f"/products/{product}/firmware/2"),
            (SHOTS[2], f"/products/{product}/devices/{fleet.device_ids[0]}"),
        ]
        saved = []
        for name, path in shots:
            loaded = page.goto(fleet.console(path), wait_until="load")
            if loaded is None or loaded.status != 200:
                raise RuntimeError(f"{path} answered {loaded and loaded.status}")
            page.wait_for_timeout(800)  # a picture, not a check: the live view paints
            if name == SHOTS[1] and page.locator("#release-view").count():
                # The release's progress at the top of the window.
                page.locator("#release-view").evaluate(
                    "el => window.scrollTo(0, el.getBoundingClientRect().top"
                    " + window.scrollY - 16)")
            page.screenshot(path=str(out_dir / name))
            saved.append(out_dir / name)
        context.close()
    return saved


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.console.screenshots``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    parser.add_argument("--seed", type=int, default=None, help="seed of the seeded devices")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"seed {seed}")
    with tempfile.TemporaryDirectory(prefix="ota-console-shots-") as tmp:
        for path in take_screenshots(Path(tmp), args.out_dir, seed):
            print(f"saved {path}")


if __name__ == "__main__":
    main()
