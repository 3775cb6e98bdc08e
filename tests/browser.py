"""A real browser for the console's tests, benchmark and screenshots: Debian's ``chromium``
driven by Playwright for Python (its sync API), headless.

Playwright is pointed at the system browser (``executable_path``); it never downloads one
(``playwright install`` is not needed, and not possible on machines without the internet).
scripts/system-deps.sh installs the ``chromium`` package; where it is absent the browser tests
skip, saying so. ``OTA_TEST_CHROMIUM`` names another Chromium binary.

The tests that use it are plain (non-async) functions: Playwright's sync API runs its own
event loop in the calling thread, which must not be inside trio (pytest-trio's ``trio_mode``
runs only ``async def`` tests in trio). The server they drive runs in a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.ota_server_process import REPO, ServerProcess, free_device_port, start_ota_server

if TYPE_CHECKING:  # Playwright is imported only by the tests that launch a browser
    from playwright.sync_api import Browser, Page

#: Environment variable naming the Chromium binary (default: ``chromium`` on PATH).
CHROMIUM_VARIABLE = "OTA_TEST_CHROMIUM"
#: The browser window of the tests and screenshots (a laptop's screen).
VIEWPORT = {"width": 1280, "height": 800}


def chromium_path() -> str | None:
    """The Chromium binary to drive: ``$OTA_TEST_CHROMIUM``, else Debian's ``chromium`` on
    PATH; None when there is none."""
    named = os.environ.get(CHROMIUM_VARIABLE)
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("chromium")


def chromium_args() -> list[str]:
    """Command-line switches: Chromium refuses to run as root inside its sandbox (CI and the
    dev machines run as root), and /dev/shm may be small in containers."""
    args = ["--disable-dev-shm-usage"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")
    return args


class NoChromiumError(RuntimeError):
    """No Chromium binary to drive (install Debian's ``chromium`` or set OTA_TEST_CHROMIUM)."""


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium (the system's) under Playwright, closed at the end."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if path is None:
        raise NoChromiumError(
            "no Chromium found: install Debian's chromium package (scripts/system-deps.sh) "
            f"or set {CHROMIUM_VARIABLE} to a Chromium binary"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=path, headless=True, args=chromium_args()
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless system Chromium for a test module (Playwright's driver and event loop
    live only while the browser tests of one module run); the test skips, saying why, when
    no Chromium is installed."""
    if chromium_path() is None:
        pytest.skip(
            "no Chromium browser: install Debian's chromium (scripts/system-deps.sh does) "
            f"or set {CHROMIUM_VARIABLE}"
        )
    from playwright.sync_api import expect

    expect.set_options(timeout=PATIENCE_MS)  # conditions, not sleeps: wait generously
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (no cookies) and page of :data:`VIEWPORT` for one test."""
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    try:
        yield context.new_page()
    finally:
        context.close()


# --- A console fleet: a real ``ota server`` process and emulated devices for the browser ---

#: The operator the browser signs in as (an installation owner).
OPERATOR = "ops@example.com"
OPERATOR_PASSWORD = "correct horse battery staple"
BORON = 13
#: How long a browser assertion waits for the page to change (a step takes about a second
#: on an idle machine; this is reached only on a failure, or on a machine far too busy).
PATIENCE_MS = 45_000
#: The console fleet's server closes a device session silent this long (seconds).
IDLE_TIMEOUT = 4.0


def app_image(product_id: int, version: int, *, size: int = 24_000) -> bytes:
    """A Boron application module of ``product_id`` embedding product version ``version``
    (a deterministic body: nothing random)."""
    from otacore.module import build_module
    from otacore.platforms import ModuleFunction

    body = hashlib.shake_256(f"console app v{version}".encode()).digest(size)
    return build_module(body, platform_id=BORON, function=ModuleFunction.USER_PART, version=6,
                        product_id=product_id, product_version=version)


@dataclass
class ConsoleFleet:
    """A running ``ota server`` (its own process) with a product, an owner account, an owner
    API token for setup and checks, and optionally emulated devices in a process of their own
    (``ota device emulate``)."""

    root: Path
    server: ServerProcess
    product_id: int
    device_ids: list[str]
    token: str
    emulator: subprocess.Popen[bytes] | None = None
    #: The emulated devices' keep-alive (seconds); below the server's ``--idle-timeout``.
    keepalive: float = 30.0

    @property
    def api_url(self) -> str:
        return self.server.api_url

    def console(self, path: str = "") -> str:
        """The console's URL of ``path`` (e.g. ``/products/1/devices``)."""
        return f"{self.server.api_url}/console{path}"

    def image(self, version: int) -> Path:
        """A file holding :func:`app_image` of ``version`` (written once)."""
        path = self.root / f"app-v{version}.bin"
        if not path.exists():
            path.write_bytes(app_image(self.product_id, version))
        return path

    def api(self) -> httpx.Client:
        """A REST client with the owner token (close it after use)."""
        return httpx.Client(base_url=self.api_url, timeout=20,
                            headers={"Authorization": f"Bearer {self.token}"})

    def devices(self) -> list[dict[str, Any]]:
        """Every device of the product as the REST API lists them (all its pages)."""
        listed: list[dict[str, Any]] = []
        with self.api() as api:
            page, pages = 1, 1
            while page <= pages:
                response = api.get(f"/v1/products/{self.product_id}/devices",
                                   params={"per_page": 100, "page": page})
                response.raise_for_status()
                body = response.json()
                listed += body["devices"]
                pages = int(body["meta"]["total_pages"])
                page += 1
        return listed

    def wait_devices(self, check: Callable[[list[dict[str, Any]]], bool],
                     timeout: float = PATIENCE_MS / 1000) -> list[dict[str, Any]]:
        """Poll the REST device list until ``check`` holds (AssertionError after ``timeout``
        seconds, with the last list and the emulator's log)."""
        deadline = time.monotonic() + timeout
        while True:
            listed = self.devices()
            if check(listed):
                return listed
            if self.emulator is not None and self.emulator.poll() is not None:
                raise AssertionError(f"the emulator exited: {self.emulator_log()}")
            if time.monotonic() > deadline:
                shown = [{key: d.get(key) for key in ("id", "online", "firmware_version",
                                                      "desired_firmware_version")}
                         for d in listed if d["id"] in self.device_ids]
                raise AssertionError(f"devices never matched: {shown}\n{self.emulator_log()}")
            time.sleep(0.2)  # polling a condition, not asserting after a sleep

    def emulator_log(self) -> str:
        path = self.root / "emulate.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def start_emulator(self, version: int = 1, transport: str = "both") -> None:
        """Run every provisioned device as an emulated device (persistent flash under the
        fleet's directory) starting on application ``version``."""
        argv = [sys.executable, "-m", "server.cli.main", "device", "emulate",
                "--creds", str(self.root / "creds"), "--transport", transport,
                "--state", str(self.root / "flash"), "--firmware", str(self.image(version)),
                "--server", f"127.0.0.1:{self.server.tls[1]}", "--no-fsync",
                "--keepalive", str(self.keepalive)]  # fmt: skip
        with (self.root / "emulate.log").open("ab") as log:
            self.emulator = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=log)


    def stop_emulator(self) -> None:
        """Stop the emulated devices (Ctrl-C) and wait until the server lists every device
        offline."""
        emulator = self.emulator
        assert emulator is not None, "no emulator runs"
        if emulator.poll() is None:
            emulator.send_signal(signal.SIGINT)
            try:
                emulator.wait(20)
            except subprocess.TimeoutExpired:
                emulator.kill()
                emulator.wait()
        self.emulator = None
        self.wait_devices(lambda devices: not any(d["online"] for d in devices))


def prepare_installation(root: Path, *, devices: int, product_name: str = "Sensors",
                         db_url: str | None = None) -> tuple[int, list[str], str]:
    """A fresh installation under ``root/data`` (its store: the SQLite file there, or the
    empty database ``db_url``): a Boron product with ``devices`` provisioned devices
    (certificates in ``root/creds``; none: only the product), the owner account
    :data:`OPERATOR` and an owner API token. Returns (product id, device ids, token)."""
    from server.cli.device_store_cmd import create_provisioned_product
    from server.events import EventBus
    from server.fleet import SYSTEM_ACTOR, Fleet
    from server.identity import ProvisionedDevice
    from server.store.installation import Installation

    data = root / "data"
    made: list[ProvisionedDevice] = []
    if devices:
        product_id, made = create_provisioned_product(data, root / "creds", product_name,
                                                      BORON, devices, db_url=db_url)
    store = Installation(data, db_url).open_store()
    try:
        fleet = Fleet(store, EventBus())
        if not devices:  # a product whose devices come from elsewhere (bench seeding)
            product_id = fleet.create_product_sync(SYSTEM_ACTOR, product_name, BORON).id
        fleet.create_user_sync(OPERATOR, OPERATOR_PASSWORD, "owner")
        token = fleet.create_api_token_sync("owner", label="browser test setup").access_token
    finally:
        store.close()
    return product_id, sorted(d.device_id for d in made), token


@contextmanager
def console_fleet(root: Path, *, devices: int = 4, server_args: Sequence[str] = (),
                  before_start: Callable[[Path, int], None] | None = None,
                  ) -> Iterator[ConsoleFleet]:
    """:func:`prepare_installation`, then ``before_start(data directory, product id)`` if
    given (more rows for the store, while no server holds it), then ``ota server`` on it
    (free ports, one for both device transports); stopped (and the emulator, if started)
    at the end.

    The server closes a device session silent for :data:`IDLE_TIMEOUT` seconds (the
    emulated devices ping every second): a stopped emulator's DTLS devices, which send no
    close_notify, are offline a few seconds later instead of two minutes."""
    product_id, device_ids, token = prepare_installation(root, devices=devices)
    if before_start is not None:
        before_start(root / "data", product_id)
    server = start_ota_server(root / "data", root / "server.log", "--device-port",
                              str(free_device_port()), "--idle-timeout", str(IDLE_TIMEOUT),
                              *server_args)
    fleet = ConsoleFleet(root, server, product_id, device_ids, token, keepalive=1.0)
    try:
        yield fleet
    finally:
        if fleet.emulator is not None and fleet.emulator.poll() is None:
            fleet.emulator.kill()
            fleet.emulator.wait()
        server.stop()
