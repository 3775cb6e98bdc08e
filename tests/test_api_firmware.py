"""Product firmware over real HTTP: upload rules, edits, downloads and the release rules."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa
import trio

from otacore.platforms import ModuleFunction
from server.api import ApiSettings
from server.app import ServerConfig, serve
from server.fleet.auth import token_hash
from server.store import schema

DEVICE = "0123456789abcdef01234567"


async def test_upload_list_get_download(api, make_firmware) -> None:
    product = await api.create_product("Weather Station")
    image = make_firmware(1, size=20_000)
    response = await api.upload(product["slug"], 1, image, description="first")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["version"] == 1 and body["title"] == "v1" and body["description"] == "first"
    assert body["size"] == len(image)
    assert body["sha256"] == hashlib.sha256(image).hexdigest()
    assert body["product_default"] is False and body["groups"] == []
    assert body["module"]["product_version"] == 1 and body["module"]["platform_id"] == 13
    assert body["uploaded_by"] == {"username": "test owner"}

    # Particle's JS client sends the binary as field "file": accepted too (by numeric id).
    image2 = make_firmware(2)
    files = {"file": ("app.bin", image2, "application/octet-stream")}
    response = await api.client.post(
        f"/v1/products/{product['id']}/firmware", data={"version": "2", "title": "two"}, files=files
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "app.bin"

    listing = (await api.client.get(f"/v1/products/{product['slug']}/firmware")).json()
    assert [fw["version"] for fw in listing] == [2, 1]
    one = await api.client.get(f"/v1/products/{product['id']}/firmware/1")
    assert one.status_code == 200 and one.json()["sha256"] == body["sha256"]
    binary = await api.client.get(f"/v1/products/{product['slug']}/firmware/2/binary")
    assert binary.status_code == 200 and binary.content == image2
    assert binary.headers["x-firmware-sha256"] == hashlib.sha256(image2).hexdigest()

    with api.store.read() as tx:
        audit = [(a.action, a.target) for a in tx.list_audit(product["id"])]
    assert ("firmware.upload", "firmware:1") in audit and ("firmware.upload", "firmware:2") in audit


def _corrupt(image: bytes) -> bytes:
    flipped = bytearray(image)
    flipped[100] ^= 0xFF
    return bytes(flipped)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("corrupt", "not a valid firmware module"),
        ("garbage", "not a valid firmware module"),
        ("empty", "not a valid firmware module"),
        ("version_mismatch", "they must match"),
        ("platform_mismatch", "built for argon"),
        ("no_product_version", "carries no product version"),
        ("system_part", "must be an application"),
        ("too_big_for_function", "limit"),
        ("duplicate", "already has firmware version 1"),
        ("version_not_int", "must be an integer"),
        ("version_out_of_range", "outside 0..65535"),
        ("no_title", "title is required"),
        ("no_version", "version is required"),
        ("no_binary", "has no binary"),
        ("json_body", "multipart/form-data"),
        ("binary_as_text", "must be a file upload"),
    ],
)
async def test_upload_refused_changes_nothing(api, make_firmware, case: str, message: str) -> None:
    product = await api.create_product()
    slug = product["slug"]
    assert (await api.upload(slug, 1)).status_code == 201
    before = await api.snapshot()
    url = f"/v1/products/{slug}/firmware"
    fields = {"version": "2", "title": "two"}
    image = make_firmware(2)
    files: dict[str, object] | None = None
    if case == "corrupt":
        image = _corrupt(image)
    elif case == "garbage":
        image = b"\x00" * 3000
    elif case == "empty":
        image = b""
    elif case == "version_mismatch":
        image = make_firmware(2, product_version=3)
    elif case == "platform_mismatch":
        image = make_firmware(2, platform_id=12)
    elif case == "no_product_version":
        image = make_firmware(2, product_version=None)
    elif case == "system_part":
        image = make_firmware(2, function=ModuleFunction.SYSTEM_PART)
    elif case == "too_big_for_function":
        image = make_firmware(2, size=300 * 1024)  # Boron user part limit: 256 KiB
    elif case == "duplicate":
        fields["version"], image = "1", make_firmware(1, seed=9)
    elif case == "version_not_int":
        fields["version"] = "two"
    elif case == "version_out_of_range":
        fields["version"] = "70000"
    elif case == "no_title":
        del fields["title"]
    elif case == "no_version":
        del fields["version"]
    if case == "no_binary":
        response = await api.client.post(url, data=fields, files={"other": ("x", b"1")})
    elif case == "json_body":
        response = await api.client.post(url, json=fields)
    elif case == "binary_as_text":
        response = await api.client.post(url, data={**fields, "binary": "abc"}, files={"x": b"1"})
    else:
        files = {"binary": ("firmware.bin", image, "application/octet-stream")}
        response = await api.client.post(url, data=fields, files=files)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["ok"] is False and message in body["error"], body
    assert await api.snapshot() == before


async def test_oversized_upload_gets_413_before_reading(api, make_firmware) -> None:
    product = await api.create_product()
    before = await api.snapshot()
    url = f"/v1/products/{product['slug']}/firmware"
    big = b"\x00" * (600 * 1024)
    response = await api.client.post(
        url, data={"version": "1", "title": "x"}, files={"binary": ("f.bin", big)}
    )
    assert response.status_code == 413
    assert "limit" in response.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(100):
            yield b"\x00" * 8192

    response = await api.client.post(
        url, content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert response.status_code == 413
    assert await api.snapshot() == before


async def test_auth_and_roles_on_upload(api, make_firmware) -> None:
    product = await api.create_product()
    before = await api.snapshot()
    url = f"/v1/products/{product['slug']}/firmware"
    files = {"binary": ("f.bin", make_firmware(1))}
    data = {"version": "1", "title": "t"}
    async with httpx.AsyncClient(base_url=api.handle.api_url) as anon:
        response = await anon.post(url, data=data, files=files)
        assert (
            response.status_code == 401 and "access token is required" in response.json()["error"]
        )
        response = await anon.post(
            url, data=data, files=files, headers={"Authorization": "Bearer nope"}
        )
        assert response.status_code == 401
        for role in ("viewer", "support"):
            token = await api.token_for(role)
            response = await anon.post(
                url, data=data, files=files, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 403, response.text
            assert f"the {role} role may not upload firmware" in response.json()["error"]
            # Read access works for them.
            assert (await anon.get(url, params={"access_token": token})).status_code == 200
        expired = await api.token_for("developer", expires_in=60)
        with api.store.write() as tx:
            tx.conn.execute(
                sa.update(schema.tokens)
                .where(schema.tokens.c.token_hash == token_hash(expired))
                .values(expires_at=1)
            )
        response = await anon.post(
            url, data=data, files=files, headers={"Authorization": f"Bearer {expired}"}
        )
        assert response.status_code == 401 and "expired" in response.json()["error"]
    missing = await api.upload("no-such-product", 1)
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    assert await api.snapshot() == before


async def test_edit_and_delete_firmware(api) -> None:
    product = await api.create_product()
    slug = product["slug"]
    await api.upload(slug, 1)
    await api.upload(slug, 2)
    response = await api.client.put(
        f"/v1/products/{slug}/firmware/1", json={"title": "renamed", "description": "d"}
    )
    assert response.status_code == 200 and response.json()["title"] == "renamed"
    response = await api.client.put(f"/v1/products/{slug}/firmware/1", json={"size": 3})
    assert response.status_code == 400 and "unknown field" in response.json()["error"]
    response = await api.client.put(f"/v1/products/{slug}/firmware/9", json={"title": "x"})
    assert response.status_code == 404

    sha1 = (await api.client.get(f"/v1/products/{slug}/firmware/1")).json()["sha256"]
    assert (await api.client.delete(f"/v1/products/{slug}/firmware/1")).status_code == 204
    assert (await api.client.get(f"/v1/products/{slug}/firmware/1")).status_code == 404
    # Its blob is left to the blob sweeper (an upload of the same bytes may be under way),
    # which removes it once unreferenced for its grace period.
    assert api.store.blobs.exists(sha1)
    assert api.store.sweep_blobs(grace_s=0) == [sha1]
    assert not api.store.blobs.exists(sha1)

    # Released or locked firmware cannot be deleted.
    await api.client.put(
        f"/v1/products/{slug}/firmware/release",
        json={"version": 2, "product_default": True, "force": True},
    )
    response = await api.client.delete(f"/v1/products/{slug}/firmware/2")
    assert response.status_code == 409 and "is released" in response.json()["error"]
    await api.upload(slug, 3)
    await api.client.post(f"/v1/products/{slug}/devices", json={"id": DEVICE})
    await api.client.put(
        f"/v1/products/{slug}/devices/{DEVICE}", json={"desired_firmware_version": 3}
    )
    response = await api.client.delete(f"/v1/products/{slug}/firmware/3")
    assert response.status_code == 409 and "locked" in response.json()["error"]


async def _release(api, slug: str, **body: object) -> httpx.Response:
    response: httpx.Response = await api.client.put(
        f"/v1/products/{slug}/firmware/release", json=body
    )
    return response


async def test_release_needs_a_device_running_it_or_force(api) -> None:
    product = await api.create_product()
    slug = product["slug"]
    await api.upload(slug, 1)
    await api.client.post(f"/v1/products/{slug}/devices", json={"id": DEVICE})
    before = await api.snapshot()
    response = await _release(api, slug, version=1, product_default=True)
    assert response.status_code == 400
    assert "has not been reported running" in response.json()["error"]
    assert await api.snapshot() == before

    forced = await _release(api, slug, version=1, product_default=True, force=True)
    assert forced.status_code == 200, forced.text
    assert forced.json()["product_default"] is True and forced.json()["forced"] is True
    with api.store.read() as tx:
        actions = [a.action for a in tx.list_audit(product["id"])]
    assert "firmware.release.forced" in actions

    await api.upload(slug, 2)
    await api.report_running(DEVICE, 2)
    ok = await _release(api, slug, version=2, product_default=True, intelligent=True)
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["forced"] is False and body["intelligent"] is True and body["device_count"] == 1
    listing = {
        fw["version"]: fw for fw in (await api.client.get(f"/v1/products/{slug}/firmware")).json()
    }
    assert listing[2]["product_default"] and not listing[1]["product_default"]
    with api.store.read() as tx:
        last = tx.list_audit(product["id"], limit=1)[0]
    assert last.action == "firmware.release" and last.details["intelligent"] is True


async def test_release_to_groups_and_withdraw(api) -> None:
    product = await api.create_product()
    slug = product["slug"]
    await api.upload(slug, 1)
    await api.client.post(f"/v1/products/{slug}/devices", json={"id": DEVICE})
    await api.report_running(DEVICE, 1)
    for name in ("beta", "field"):
        assert (
            await api.client.post(f"/v1/products/{slug}/groups", json={"name": name})
        ).status_code == 201
    before = await api.snapshot()
    response = await _release(api, slug, version=1, groups=["beta", "nope"])
    assert response.status_code == 400 and "group 'nope' does not exist" in response.json()["error"]
    response = await _release(api, slug, version=1, groups="beta")  # wrong type: string ok? no
    assert response.status_code == 200  # a comma-separated string is Particle's form encoding
    assert response.json()["groups"] == ["beta"]
    await _release(api, slug, version=1, groups=[])
    assert await api.snapshot() != before  # audit rows were added...
    groups = (await api.client.get(f"/v1/products/{slug}/groups")).json()["groups"]
    assert all(g["fw_version"] is None for g in groups)  # ...but nothing stays released

    # Form-encoded body with repeated groups[] keys, as Particle's clients send forms.
    response = await api.client.put(
        f"/v1/products/{slug}/firmware/release",
        content="version=1&groups[]=beta&groups[]=field&product_default=true",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["groups"] == ["beta", "field"] and response.json()["product_default"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, "version is required"),
        ({"version": 1}, 400, "give product_default and/or groups"),
        ({"version": "x", "product_default": True}, 400, "must be an integer"),
        ({"version": 9, "groups": []}, 404, "no firmware version 9"),
        ({"version": 1, "product_default": "maybe"}, 400, "true or false"),
        ({"version": 1, "groups": [1, 2]}, 400, "list of names"),
        ({"version": 1, "colour": "red"}, 400, "unknown field"),
    ],
)
async def test_release_bad_requests(
    api, body: dict[str, object], status: int, message: str
) -> None:
    product = await api.create_product()
    await api.upload(product["slug"], 1)
    before = await api.snapshot()
    response = await _release(api, product["slug"], **body)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert await api.snapshot() == before


async def test_release_roles(api) -> None:
    product = await api.create_product()
    slug = product["slug"]
    await api.upload(slug, 1)
    for role, status in (("viewer", 403), ("support", 403), ("developer", 200)):
        client = await api.client_for(role)
        async with client:
            response = await client.put(
                f"/v1/products/{slug}/firmware/release",
                json={"version": 1, "product_default": True, "force": True},
            )
        assert response.status_code == status, (role, response.text)
    await trio.sleep(0)


async def test_slow_body_gets_408(nursery, tmp_path) -> None:
    config = ServerConfig(
        data_dir=tmp_path / "slow", api_port=0, api=ApiSettings(body_timeout_seconds=0.5),
        device_port=None,  # the API alone: no fixed device port to collide with
    )
    handle = await nursery.start(serve, config)
    token = await trio.to_thread.run_sync(lambda: handle.fleet.create_api_token_sync("owner"))
    url = urlsplit(handle.api_url)
    stream = await trio.open_tcp_stream(url.hostname, url.port)
    head = (
        "POST /v1/products HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token.access_token}\r\nContent-Length: 1000\r\n\r\n{{"
    )
    await stream.send_all(head.encode())
    received = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some()
    assert received.startswith(b"HTTP/1.1 408")
    await stream.aclose()
    handle.shutdown.set()


async def test_release_leaves_unmentioned_scopes_alone(api) -> None:
    slug = (await api.create_product())["slug"]
    await api.client.post(f"/v1/products/{slug}/groups", json={"name": "beta"})
    for version in (1, 2):
        await api.upload(slug, version)
    await _release(api, slug, version=1, product_default=True, force=True)
    refused = await _release(api, slug, version=1, groups=["beta"])  # a force verifies nothing
    assert refused.status_code == 400
    await _release(api, slug, version=2, groups=["beta"], force=True)
    listing = {
        fw["version"]: fw for fw in (await api.client.get(f"/v1/products/{slug}/firmware")).json()
    }
    assert listing[1]["product_default"] and listing[1]["groups"] == []
    assert listing[2]["groups"] == ["beta"] and not listing[2]["product_default"]
    response = await _release(api, slug, version=1, product_default=False)
    assert response.status_code == 200 and response.json()["product_default"] is False
    listing = {
        fw["version"]: fw for fw in (await api.client.get(f"/v1/products/{slug}/firmware")).json()
    }
    assert not any(fw["product_default"] for fw in listing.values())
    assert listing[2]["groups"] == ["beta"]
