"""The operator flow README.md shows, run as a new user runs it: the real ``ota`` command
in subprocesses, against a real ``ota server`` process, on a fresh data directory.

Each command is taken from the README's ``ota`` block (the test fails if the README stops
showing it), its placeholders filled in (DIR, P, N, CREDS, FLASH, KEYID, OLD, NEW, ...).
The server listens on free ports, so the emulated devices get ``--server`` (documented in
the README's "Emulated devices"), and ``--until-version`` ends their run once they took the
release. The flow: bootstrap token, product, provisioning, firmware uploads, emulated
devices on both transports, the safe release flow (release v1, canary lock with flash now,
immediate release of v2), the event stream, a key rotation and withdrawal that devices
learn at their next Hello (v3 signed with the new key reaches them), revocation, deltas.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.ota_server_process import free_device_port

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
#: The console script beside this Python (what `pip install` made), as the README calls it.
OTA = [str(Path(sys.executable).parent / "ota")]
if not Path(OTA[0]).is_file():
    OTA = [sys.executable, "-m", "server.cli.main"]
PATIENCE = 60.0  # a step takes about a second; this is reached only on a failure


def shown(command: str) -> list[str]:
    """The words of a command exactly as README.md shows it (AssertionError if it does not)."""
    assert command in README, f"README.md no longer shows {command!r}"
    return command.split()


def fill(words: list[str], values: Mapping[str, str]) -> list[str]:
    """The README's placeholders (upper-case words, app.bin, ...) replaced by values."""
    return [values.get(word, word) for word in words]


class Shell:
    """Runs ``ota`` commands in a working directory with the operator's environment."""

    def __init__(self, cwd: Path, nursery: trio.Nursery) -> None:
        self.cwd = cwd
        self.nursery = nursery
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")}
        self.env["COLUMNS"] = "200"
        self.started: list[trio.Process] = []

    async def ota(self, words: list[str], *, expect: int = 0) -> str:
        """Run ``ota WORDS...`` (the first word, "ota", is the console script) to its end:
        its stdout, or its stderr when it is expected to fail."""
        assert words[0] == "ota", words
        with trio.fail_after(PATIENCE):
            done = await trio.run_process(
                OTA + words[1:], cwd=self.cwd, env=self.env, capture_stdout=True,
                capture_stderr=True, check=False,
            )  # fmt: skip
        out, err = done.stdout.decode(), done.stderr.decode()
        assert done.returncode == expect, f"{' '.join(words)}: exit {done.returncode}\n{out}{err}"
        return out if expect == 0 else err

    async def start(self, words: list[str], log: Path) -> Background:
        """Start a long-running ``ota`` command; its stdout is collected as it comes."""
        assert words[0] == "ota", words
        with log.open("wb") as err:
            process = await trio.lowlevel.open_process(
                OTA + words[1:], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=err,
                # Ctrl-C reaches it as in a terminal, even when this test runs as a background
                # job (whose shell made it, and so its children, ignore SIGINT).
                preexec_fn=_default_sigint,
            )  # fmt: skip
        self.started.append(process)
        background = Background(process, log)
        self.nursery.start_soon(background.collect)
        return background


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Background:
    """A running ``ota`` command and what it printed so far."""

    def __init__(self, process: trio.Process, log: Path) -> None:
        self.process = process
        self.log = log
        self.chunks: list[str] = []
        self.changed = trio.Event()
        self.ended = False  # its stdout closed

    @property
    def printed(self) -> str:
        return "".join(self.chunks)

    async def collect(self) -> None:
        assert self.process.stdout is not None
        while chunk := await self.process.stdout.receive_some(65536):
            self.chunks.append(chunk.decode())
            self.changed.set()
        self.ended = True
        self.changed.set()

    async def wait_for(self, marker: str) -> str:
        """Wait until ``marker`` was printed; all it printed so far."""
        with trio.fail_after(PATIENCE):
            while marker not in self.printed:
                assert not self.ended, f"it ended: {self.printed}{self.log.read_text()}"
                self.changed = trio.Event()
                await self.changed.wait()
        return self.printed

    async def exit_status(self) -> int:
        """Wait for the command to end by itself."""
        with trio.fail_after(PATIENCE):
            return await self.process.wait()

    async def stop(self, how: int = signal.SIGINT) -> int:
        """Stop it as Ctrl-C (SIGINT) or a service manager (SIGTERM) would."""
        if self.process.returncode is None:
            self.process.send_signal(how)
        return await self.exit_status()


async def wait_devices(
    api: httpx.AsyncClient, product: str, check: Callable[[list[dict[str, Any]]], bool]
) -> None:
    """Poll the product's devices (REST, as any client) until ``check(devices)`` holds."""
    with trio.fail_after(PATIENCE):
        while not check((await api.get(f"/v1/products/{product}/devices")).json()["devices"]):
            await trio.sleep(0.1)


def app_body(version: int) -> bytes:
    """A raw application body (``ota module create`` turns it into a module image)."""
    return bytes((version * 37 + i * 11) % 251 for i in range(20_000))


async def test_readme_operator_flow(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        sh = Shell(tmp_path, nursery)
        try:
            server = await _operator_flow(sh, tmp_path)
        finally:
            for process in sh.started:  # nothing outlives the test, even when it fails
                if process.returncode is None:
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
        nursery.cancel_scope.cancel()
    assert server == 0, (tmp_path / "server.log").read_text()[-3000:]


async def _operator_flow(sh: Shell, tmp_path: Path) -> int:
    """Walk the README's flow; the server's exit status after a SIGTERM."""
    assert "otacloud" in await sh.ota(shown("ota info"))
    values = {"DIR": "data", "CREDS": "creds", "FLASH": "flash", "N": "2"}

    # Bootstrap straight on the store, then a product and its devices.
    token = await sh.ota(fill(shown("ota admin token --data DIR --role owner"), values))
    values["TOKEN"] = token.strip()
    create = shown("ota product create NAME --platform-id 13 --data DIR --json")
    product = json.loads(await sh.ota(fill(create, {**values, "NAME": "Sensors"})))
    values["P"] = str(product["id"])
    provision = shown("ota device provision --data DIR --product P --count N --out CREDS")
    await sh.ota(fill(provision, values))
    canary, other = sorted(p.name for p in (tmp_path / "creds").iterdir() if p.is_dir())

    # Firmware images: ota module create, then inspect.
    for version in (1, 2, 3):
        (tmp_path / f"app{version}.raw").write_bytes(app_body(version))
        await sh.ota(["ota", "module", "create", f"app{version}.raw", f"app{version}.bin",
                      "--platform-id", "13", "--version", "6", "--product-id", values["P"],
                      "--product-version", str(version)])  # fmt: skip
    shutil.copy(tmp_path / "app1.bin", tmp_path / "app.bin")
    inspected = json.loads(await sh.ota(shown("ota module inspect app.bin --json")))
    assert inspected["valid"] and inspected["product_version"] == 1

    # The server, on free ports (one number for TLS and DTLS, as by default); the fleet
    # commands find it through the environment.
    server_words = fill(shown("ota server --data DIR [--api-port 8080] [--device-port 5684]"),
                        values)[:4]  # fmt: skip
    port = free_device_port()
    server = await sh.start([*server_words, "--api-port", "0", "--device-port", str(port)],
                            tmp_path / "server.log")  # fmt: skip
    try:
        text = await server.wait_for("worker 1 pid")
        lines = {line.rpartition(" ")[0]: line.rpartition(" ")[2] for line in text.splitlines()}
        api_url = lines["ota server: API listening on"]
        devices_at = lines["ota server: devices on TLS"]
        assert devices_at == lines["ota server: devices on DTLS"] == f"127.0.0.1:{port}"
        sh.env.update(OTA_API_URL=api_url, OTA_TOKEN=values["TOKEN"], OTA_PRODUCT=values["P"])
        async with httpx.AsyncClient(
            base_url=api_url, headers={"Authorization": f"Bearer {values['TOKEN']}"}
        ) as api:
            await _rollout(sh, api, tmp_path, values, devices_at, canary, other)
    finally:
        status = await server.stop(signal.SIGTERM)

    # Patches need no server.
    delta = fill(shown("ota delta make OLD NEW PATCH"),
                 {"OLD": "app1.bin", "NEW": "app2.bin", "PATCH": "v1-v2.patch"})  # fmt: skip
    await sh.ota(delta)
    apply = fill(shown("ota delta apply OLD PATCH OUT"),
                 {"OLD": "app1.bin", "PATCH": "v1-v2.patch", "OUT": "v2.bin"})  # fmt: skip
    await sh.ota(apply)
    assert (tmp_path / "v2.bin").read_bytes() == (tmp_path / "app2.bin").read_bytes()
    return status


async def _rollout(
    sh: Shell,
    api: httpx.AsyncClient,
    tmp_path: Path,
    values: dict[str, str],
    devices_at: str,
    canary: str,
    other: str,
) -> None:
    """Uploads, emulated devices, the safe release flow, key rotation, revocation."""
    shown("ota events [PREFIX] --product P")
    events = await sh.start(["ota", "events", "--product", values["P"]], tmp_path / "events.log")
    for version in (1, 2):
        await sh.ota(["ota", "firmware", "upload", f"app{version}.bin", "--version",
                      str(version), "--title", f"v{version}"])  # fmt: skip

    # The emulated devices, exactly as the README starts them (plus where the server
    # listens), until Ctrl-C.
    emulate = fill(
        shown("ota device emulate --creds CREDS --transport both --state FLASH --firmware app.bin"),
        values,
    )
    emulator = await sh.start([*emulate, "--server", devices_at], tmp_path / "emulate.log")

    def fleet_runs(version: int) -> Callable[[list[dict[str, Any]]], bool]:
        def check(devices: list[dict[str, Any]]) -> bool:
            assert not emulator.ended, f"emulate stopped: {emulator.log.read_text()}"
            return all(d["online"] and d["firmware_version"] == version for d in devices)

        return check

    await wait_devices(api, values["P"], fleet_runs(1))

    # Particle's safe release flow: v1 ran, so it may be released; a canary is locked to
    # v2 with "flash now"; once it runs v2, v2 goes to every device at once.
    await sh.ota(["ota", "firmware", "release", "--version", "1", "--product-default"])
    await sh.ota(["ota", "device", "lock", canary, "--version", "2", "--flash-now"])
    await wait_devices(api, values["P"], lambda ds: any(
        d["id"] == canary and d["firmware_version"] == 2 and d["online"] for d in ds))
    await sh.ota(["ota", "firmware", "release", "--version", "2", "--product-default",
                  "--immediate"])  # fmt: skip
    await sh.ota(["ota", "device", "unlock", canary])  # the canary follows releases again
    await wait_devices(api, values["P"], fleet_runs(2))
    await emulator.wait_for(f"{other} online      5/1:v6 [udp] last update: committed v6")
    assert await emulator.stop() == 0, emulator.log.read_text()  # Ctrl-C
    assert "2 devices: online 2; committed 2" in emulator.printed
    listed = json.loads(await sh.ota(["ota", "device", "list", "--json"]))
    assert {d["id"]: d["firmware_version"] for d in listed["devices"]} == {canary: 2, other: 2}
    firmware = json.loads(await sh.ota(["ota", "firmware", "list", "--json"]))
    assert {f["version"]: f["product_default"] for f in firmware} == {1: False, 2: True}
    await sh.ota(["ota", "firmware", "download", "--version", "2", "--out", "dl.bin"])
    assert (tmp_path / "dl.bin").read_bytes() == (tmp_path / "app2.bin").read_bytes()
    assert "spark/status" in await events.wait_for("spark/flash/status")
    await events.stop()  # Ctrl-C ends the stream

    # A new signing key, introduced by the old one; then the old one withdrawn. v3, signed
    # with the new key, reaches the devices, which learn of it at their next Hello: the
    # same emulate command again, on their persistent flash.
    rotate = fill(shown("ota product rotate-key --data DIR --product P"), values)
    rotated = await sh.ota(rotate)
    old_key = rotated.split("signing key ", 1)[1].split()[0]
    withdraw = shown("ota product withdraw-key KEYID --data DIR --product P")
    await sh.ota(fill(withdraw, {**values, "KEYID": old_key}))
    await sh.ota(["ota", "firmware", "upload", "app3.bin", "--version", "3", "--title", "v3"])
    await sh.ota(["ota", "firmware", "release", "--version", "3", "--product-default",
                  "--force"])  # fmt: skip
    until_v3 = ["--server", devices_at, "--until-version", "3", "--duration", str(PATIENCE)]
    assert "2 devices: online 2; committed 2" in await sh.ota([*emulate, *until_v3])

    # Revocation: the device's certificates are refused from now on (the run stops at
    # its --duration with one device short, and says so).
    await sh.ota(["ota", "device", "revoke", other])
    refused = await sh.ota([*emulate, "--server", devices_at, "--until-version", "3",
                            "--duration", "3"], expect=1)  # fmt: skip
    assert "1 of 2 devices run version 3 after 3.0 s" in refused, refused
