"""Revocation is per certificate and outlives the device row (issue 13, finding 1).

Over real sockets against the real server: a device is provisioned, connects, is revoked
(its live session closes), removed from the product and imported again; the same
certificate is still refused, over TLS and DTLS. The ways back are re-provisioning (a new
certificate for the same id) and an explicit, audit-logged reinstate. A certificate the CA
issued outside provisioning, which the server never recorded, cannot bring a revoked
device back either. Across processes, ``ota server --workers 2`` closes the session the
worker holds and every process refuses the certificate afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import trio
from OpenSSL import SSL

from otacore.coap import Code
from server.cli.device_store_cmd import StoreRegistrar
from server.fleet import SYSTEM_ACTOR
from server.fleet.errors import UnknownDeviceError
from server.identity import (
    init_pki,
    issue_device_certificate,
    new_device_key,
    pki_dir,
    provision_devices,
    write_device_credentials,
)
from server.store import Store
from server.store import schema as t
from server.transport import RefuseReason
from tests.device_client import LinkDevice
from tests.device_server import DeviceServerKit, start_device_server
from tests.test_multiprocess_server import (
    ServerProcess,
    children,
    online_origins,
    setup_store,
)

TRANSPORTS = ["tcp", "udp"]


async def attempt(creds_dir: Path, device_id: str, transport: str,
                  address: tuple[str, int]) -> str:
    """What a device with the credentials in ``creds_dir`` gets: "served" (its Hello is
    answered), "closed" (the server ended the session right after the handshake: refused),
    or how else it failed."""
    try:
        with trio.fail_after(20):
            device = await LinkDevice.connect(creds_dir, device_id, transport, address)
    except (trio.BrokenResourceError, SSL.Error, OSError) as exc:
        return f"handshake failed: {exc!r}"
    except trio.TooSlowError:
        return "no handshake"
    try:
        reply = await device.hello()
    except TimeoutError:
        return "closed" if device.closed else "no answer"
    except trio.BrokenResourceError:
        # The server refused and closed the connection before the Hello went out: a TLS
        # 1.3 client's handshake ends before the server has checked its certificate (RFC
        # 8446 section 4.4.2), the device's CSM (RFC 8323 section 5.3) then reaches a
        # closed socket and is answered by a reset, and the Hello's write fails with EPIPE
        # or ECONNRESET (TCP only; the callers check that the refusal was counted).
        return "closed"
    finally:
        await device.aclose()
    return "served" if reply.code == Code.CHANGED else f"answered {reply.code}"


def refused_count(kit: DeviceServerKit, transport: str) -> int:
    assert kit.handle.device_server is not None
    return kit.handle.device_server.stats.refused[(transport, RefuseReason.NOT_AUTHORIZED)]


async def assert_refused(kit: DeviceServerKit, creds: Path, device_id: str,
                         transport: str) -> None:
    before = refused_count(kit, transport)
    assert await attempt(creds, device_id, transport, kit.address(transport)) == "closed"
    assert refused_count(kit, transport) == before + 1


async def assert_served(kit: DeviceServerKit, creds: Path, device_id: str,
                        transport: str) -> None:
    assert await attempt(creds, device_id, transport, kit.address(transport)) == "served"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_removing_and_importing_a_revoked_device_does_not_undo_the_revocation(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=2)
    device_id, bystander = kit.device_ids
    product = kit.product_id
    device = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                      kit.address(transport))
    assert (await device.hello()).code == Code.CHANGED
    async with kit.api() as api:
        revoked = await api.post(f"/v1/products/{product}/devices/{device_id}/revoke")
        assert revoked.status_code == 200, revoked.text
        await device.wait_closed()  # DEVICE_REVOKED closed the live session
        await device.aclose()
        await assert_refused(kit, kit.creds_dir, device_id, transport)

        removed = await api.delete(f"/v1/products/{product}/devices/{device_id}")
        assert removed.status_code == 204, removed.text
        imported = await api.post(f"/v1/products/{product}/devices", json={"id": device_id})
        assert imported.status_code == 200, imported.text
        assert imported.json()["updated"] == 1  # a new device row (Particle counts)...

        await assert_refused(kit, kit.creds_dir, device_id, transport)  # ...same refusal
    await assert_served(kit, kit.creds_dir, bystander, transport)


async def test_reprovisioning_and_reinstating_are_the_ways_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    # A certificate the CA issued for the device outside provisioning, first seen at a
    # handshake before the revocation: the revocation revokes it too.
    seen = await trio.to_thread.run_sync(_issue_unrecorded, kit, device_id, tmp_path / "seen")
    await assert_served(kit, seen, device_id, "tcp")
    async with kit.api() as api:
        revoked = await api.post(f"/v1/products/{kit.product_id}/devices/{device_id}/revoke")
        assert revoked.status_code == 200, revoked.text
    await assert_refused(kit, kit.creds_dir, device_id, "tcp")
    await assert_refused(kit, seen, device_id, "udp")
    # One the server never recorded is refused as well: after a revocation only
    # certificates issued later through the server are accepted for the device.
    unseen = await trio.to_thread.run_sync(_issue_unrecorded, kit, device_id, tmp_path / "unseen")
    await assert_refused(kit, unseen, device_id, "tcp")

    # Re-provisioning (ota device provision --id) issues a new certificate: accepted.
    fresh = tmp_path / "fresh"
    await trio.to_thread.run_sync(_reprovision, kit, device_id, fresh)
    for transport in TRANSPORTS:
        await assert_served(kit, fresh, device_id, transport)
        await assert_refused(kit, kit.creds_dir, device_id, transport)  # the old one is not

    # An explicit reinstate lifts the revocation, audit-logged; the certificates the new
    # one replaced (issued or seen before it) stay revoked.
    async with kit.api() as api:
        reinstated = await api.post(
            f"/v1/products/{kit.product_id}/devices/{device_id}/reinstate"
        )
        assert reinstated.status_code == 200, reinstated.text
        assert reinstated.json() == {"ok": True, "id": device_id, "revoked": False}
        missing = await api.post(
            f"/v1/products/{kit.product_id}/devices/{'0' * 24}/reinstate"
        )
        assert missing.status_code == 404
    await assert_served(kit, fresh, device_id, "udp")
    await assert_refused(kit, kit.creds_dir, device_id, "udp")
    await assert_refused(kit, seen, device_id, "tcp")
    # A certificate the server never recorded was never revoked: with the device no longer
    # under revocation, the CA's signature admits it again.
    await assert_served(kit, unseen, device_id, "tcp")
    with kit.handle.store.read() as tx:
        actions = [row.action for row in tx.conn.execute(sa.select(t.audit_log)).all()]
    assert actions.count("device.certs_revoked") == 1
    assert actions.count("device.reprovision") == 1
    assert actions.count("device.certs_reinstated") == 1


async def test_a_reinstate_without_reprovisioning_lets_the_old_certificate_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    path = f"/v1/products/{kit.product_id}/devices/{device_id}"
    async with kit.api() as api:
        assert (await api.post(f"{path}/revoke")).status_code == 200
        await assert_refused(kit, kit.creds_dir, device_id, "tcp")
        assert (await api.post(f"{path}/reinstate")).status_code == 200
    for transport in TRANSPORTS:
        await assert_served(kit, kit.creds_dir, device_id, transport)


async def test_an_api_user_that_may_only_import_devices_cannot_undo_a_revocation(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    path = f"/v1/products/{kit.product_id}/devices/{device_id}"
    async with kit.api() as api:
        created = await api.post(f"/v1/products/{kit.product_id}/team", json={
            "friendly_name": "provisioning bot", "scopes": ["devices:import"]})
        assert created.status_code == 201, created.text
        bot = created.json()["created"]["tokens"][0]["token"]
        assert (await api.post(f"{path}/revoke")).status_code == 200
        api.headers["Authorization"] = f"Bearer {bot}"
        refused = await api.post(f"{path}/reinstate")
        assert refused.status_code == 403, refused.text
        assert "devices:remove" in refused.json()["error"]
    await assert_refused(kit, kit.creds_dir, device_id, "tcp")


async def test_a_revocation_names_the_product_it_acts_in(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The device's product is checked in the transaction that revokes it, so a device that
    moved to another product meanwhile is not revoked through the old product's path."""
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    fleet = kit.handle.fleet
    with kit.handle.store.write() as tx:
        other = tx.insert_product(slug="other", name="Other", platform_id=13, description="",
                                  now=1)
    for revoked in (True, False):
        with pytest.raises(UnknownDeviceError):
            await fleet.set_certs_revoked(SYSTEM_ACTOR, other.id, device_id, revoked)
    await assert_served(kit, kit.creds_dir, device_id, "tcp")


async def test_a_viewer_cannot_reinstate(nursery: trio.Nursery, tmp_path: Path) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    viewer = kit.handle.fleet.create_api_token_sync("viewer").access_token
    async with kit.api() as api:
        api.headers["Authorization"] = f"Bearer {viewer}"
        response = await api.post(f"/v1/products/{kit.product_id}/devices/{device_id}/reinstate")
    assert response.status_code == 403


def _issue_unrecorded(kit: DeviceServerKit, device_id: str, out: Path) -> Path:
    """Credentials the installation CA signed for ``device_id`` without ``provision``."""
    pki = init_pki(pki_dir(kit.data_dir))
    key = new_device_key()
    cert = issue_device_certificate(pki.ca_cert, pki.ca_key, device_id, key.public_key())
    write_device_credentials(out / device_id, cert, key)
    shutil.copy(kit.creds_dir / "ca.pem", out / "ca.pem")
    return out


def _reprovision(kit: DeviceServerKit, device_id: str, out: Path) -> None:
    """What ``ota device provision --id DEVICE --product P --out OUT`` does."""
    devices = provision_devices(pki_dir(kit.data_dir), [device_id], out)
    StoreRegistrar().register(kit.data_dir, str(kit.product_id), devices)


def test_a_store_revoked_by_an_older_server_stays_revoked(tmp_path: Path) -> None:
    """Schema 5: a device an older server revoked (a flag on its row) is put under
    revocation by the upgrade, so none of its certificates passes the new check."""
    store = Store.open_dir(tmp_path, pool_size=1)
    with store.write() as tx:
        product = tx.insert_product(slug="p", name="P", platform_id=13, description="", now=1)
        for device_id in ("a" * 24, "b" * 24):
            tx.insert_device(device_id, product.id, 1)
        tx.update_device("a" * 24, {"certs_revoked": True}, 2)
        tx.conn.execute(sa.delete(t.device_revocations))  # as a version 3 store had none
        tx.conn.execute(sa.update(t.meta).values(value="3"))
    store.close()
    store = Store.open_dir(tmp_path, pool_size=1)
    try:
        with store.read() as tx:
            assert tx.conn.execute(sa.select(t.meta.c.value)).scalar_one() == str(
                t.SCHEMA_VERSION
            )
            revoked = tx.certificate_standing("a" * 24, "0" * 64)
            assert revoked.registered and revoked.revocation is not None
            assert tx.certificate_standing("b" * 24, "0" * 64).revocation is None
    finally:
        store.close()


async def test_a_revocation_reaches_the_worker_process_holding_the_device(
    tmp_path: Path,
) -> None:
    data, creds, log_path = tmp_path / "data", tmp_path / "creds", tmp_path / "server.log"
    product, ids, token = await trio.to_thread.run_sync(setup_store, data, creds)
    server = await ServerProcess.start(data, log_path)
    process = server.process
    store = Store.open_dir(data, pool_size=1)
    devices: dict[str, LinkDevice] = {}
    try:
        await server.read_banner()
        address = {"tcp": server.address("TLS"), "udp": server.address("DTLS")}
        kinds = {device_id: TRANSPORTS[n % 2] for n, device_id in enumerate(ids)}
        for device_id, kind in kinds.items():  # the kernel spreads them over the processes
            devices[device_id] = await LinkDevice.connect(creds, device_id, kind, address[kind])
            assert (await devices[device_id].hello()).code == Code.CHANGED
        worker = f"worker1-{server.worker_pid}"
        with trio.fail_after(10):
            while not (held := [d for d, o in online_origins(store).items() if o == worker]):
                await trio.sleep(0.05)
        target = held[0]
        async with httpx.AsyncClient(base_url=server.api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {token}"}) as api:
            response = await api.post(f"/v1/products/{product}/devices/{target}/revoke")
            assert response.status_code == 200, response.text
            await devices[target].wait_closed()  # the worker closed it (via the relay)
            assert (await api.delete(f"/v1/products/{product}/devices/{target}")).status_code == 204
            assert (await api.post(f"/v1/products/{product}/devices",
                                   json={"id": target})).status_code == 200
        # Whichever process a reconnect lands on refuses the certificate...
        for _ in range(4):
            for kind in TRANSPORTS:
                assert await attempt(creds, target, kind, address[kind]) == "closed"
        # ...and says so: each of the 8 attempts was refused by authorization (the
        # processes' log lines; workers share the main process's stderr).
        refusal = f"device unknown or revoked {target} (certificate "
        with trio.fail_after(30):
            while (refusals := log_path.read_text().count(refusal)) < 8:
                await trio.sleep(0.05)
        assert refusals == 8, log_path.read_text()
        others = [d for d in ids if d != target]
        assert all(not devices[d].closed for d in others)
    finally:
        for device in devices.values():
            await device.aclose()
        store.close()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                await process.wait()
        if process.returncode is None:
            for pid in children(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.kill()
            await process.wait()


async def test_ota_device_revoke_and_reinstate(nursery: trio.Nursery, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from server.cli.main import app

    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    common = ["--product", str(kit.product_id), "--api-url", kit.handle.api_url,
              "--token", kit.token]  # fmt: skip

    def ota(*args: str) -> str:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    assert "revoked" in await trio.to_thread.run_sync(ota, "device", "revoke", device_id, *common)
    await assert_refused(kit, kit.creds_dir, device_id, "tcp")
    info = await trio.to_thread.run_sync(
        ota, "device", "cert-info", str(kit.creds_dir / device_id / "cert.pem"),
        "--data", str(kit.data_dir), "--json",
    )
    assert '"certificate_revoked": true' in info and '"device_under_revocation": true' in info
    out = await trio.to_thread.run_sync(ota, "device", "reinstate", device_id, *common)
    assert f"reinstated {device_id}" in out
    await assert_served(kit, kit.creds_dir, device_id, "tcp")
