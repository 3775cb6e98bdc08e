"""Inputs that used to give a 500 get a 4xx with a message (issue 13, finding 8).

* A firmware uploaded as ``中文".bin`` (or with backslashes, percent signs, path parts) is
  downloadable: Content-Disposition carries an ASCII ``filename`` and the exact UTF-8 name in
  ``filename*`` (RFC 6266 section 4.3, RFC 8187).
* Integers past what SQLite holds (2**63 - 1) or past what ``int()`` reads (4,300 digits) in
  paths, queries and bodies are refused as 4xx.
"""

from __future__ import annotations

import re
import secrets
from urllib.parse import unquote

import httpx

from tests.conftest import Api

BIG = "9" * 20  # past SQLite's 64-bit integers
HUGE = "9" * 5000  # past Python's 4,300-digit int() limit
DEVICE = "0123456789abcdef01234567"


def multipart(fields: dict[str, str], filename: str, content: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body written by hand, so the file name goes out exactly as
    given (a quote escaped as \\", other characters raw UTF-8), as curl and browsers may."""
    boundary = secrets.token_hex(12)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        .encode()
        for name, value in fields.items()
    ]
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="binary"; '
        f'filename="{quoted}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        + content + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def download_name(header: str) -> tuple[str, str]:
    """(ASCII ``filename``, ``filename*`` decoded as RFC 8187 says), which a recipient
    prefers when both are there (RFC 6266 section 4.3)."""
    fallback = re.fullmatch(r'attachment; filename="([^"\\]*)"; filename\*=UTF-8\'\'(\S+)',
                            header)
    assert fallback is not None, header
    # value-chars: attr-char or pct-encoded (RFC 8187 section 3.2.1)
    assert re.fullmatch(r"(?:[A-Za-z0-9!#$&+\-.^_`|~]|%[0-9A-F]{2})+", fallback.group(2))
    return fallback.group(1), unquote(fallback.group(2), encoding="utf-8", errors="strict")


async def upload_named(api: Api, slug: str, version: int, filename: str,
                       image: bytes) -> httpx.Response:
    body, content_type = multipart({"version": str(version), "title": "t"}, filename, image)
    return await api.client.post(f"/v1/products/{slug}/firmware", content=body,
                                 headers={"content-type": content_type})


async def test_non_ascii_and_quoted_file_names_download(api: Api, make_firmware) -> None:
    product = await api.create_product("Names")
    slug = product["slug"]
    cases = {
        '中文".bin': '中文".bin',
        'a"b\\c.bin': "c.bin",  # a backslash is a path separator (Windows clients)
        "../../etc/passwd": "passwd",
        "100% ready;.bin": "100% ready;.bin",
        "naïve 'quoted' €.bin": "naïve 'quoted' €.bin",
    }
    for version, (sent, stored) in enumerate(cases.items(), start=1):
        response = await upload_named(api, slug, version, sent, make_firmware(version))
        assert response.status_code == 201, response.text
        assert response.json()["name"] == stored
        download = await api.client.get(f"/v1/products/{slug}/firmware/{version}/binary")
        assert download.status_code == 200, (sent, download.text)
        assert download.content == make_firmware(version)
        header = download.headers["content-disposition"]
        assert header.isascii() and "\r" not in header and "\n" not in header
        fallback, exact = download_name(header)
        assert exact == stored, (sent, header)
        assert fallback.isascii() and '"' not in fallback and "\\" not in fallback


async def test_huge_product_ids_are_not_found(api: Api) -> None:
    for ref in (BIG, HUGE, "9223372036854775808", "x" * 5000):
        for path in (f"/v1/products/{ref}", f"/v1/products/{ref}/firmware",
                     f"/v1/products/{ref}/events"):
            response = await api.client.get(path)
            assert response.status_code == 404, (path[:40], response.text[:200])
            assert "not found" in response.json()["error"]


async def test_huge_numbers_in_paths_queries_and_bodies_are_refused(
    api: Api, make_firmware
) -> None:
    product = await api.create_product("Numbers")
    slug = product["slug"]
    assert (await api.upload(slug, 1)).status_code == 201
    assert (await api.client.post(f"/v1/products/{slug}/devices", json={"id": DEVICE})
            ).status_code == 200
    requests = [
        ("GET", f"/v1/products/{slug}/firmware/{HUGE}", {}),
        ("GET", f"/v1/products/{slug}/firmware/{HUGE}/binary", {}),
        ("PUT", f"/v1/products/{slug}/firmware/{HUGE}", {"data": {"title": "x"}}),
        ("DELETE", f"/v1/products/{slug}/firmware/{HUGE}", {}),
        ("GET", f"/v1/products/{slug}/firmware/{BIG}", {}),
        ("GET", f"/v1/device-os?platform_id={BIG}", {}),
        ("GET", f"/v1/device-os?platform_id={HUGE}", {}),
        ("GET", f"/v1/products/{slug}/devices?page={HUGE}", {}),
        ("POST", "/v1/products", {"data": {"name": "x", "platform_id": HUGE}}),
        ("POST", "/v1/products", {"data": {"name": "x", "platform_id": BIG}}),
        ("POST", f"/v1/products/{slug}/events", {"data": {"name": "x", "ttl": HUGE}}),
        ("PUT", f"/v1/products/{slug}/firmware/release",
         {"data": {"version": HUGE, "product_default": "true"}}),
        ("PUT", f"/v1/products/{slug}/devices/{DEVICE}",
         {"data": {"desired_firmware_version": HUGE}}),
        ("PUT", f"/v1/products/{slug}/devices/{DEVICE}",
         {"data": {"desired_firmware_version": BIG}}),
        ("POST", "/oauth/token", {"data": {"grant_type": "password", "username": "a",
                                           "password": "b", "expires_in": HUGE}}),
        ("POST", "/oauth/token", {"json": {"grant_type": "refresh_token", "refresh_token": "x",
                                           "expires_in": HUGE}}),
        # JSON numbers, not strings: past 4,300 digits json.loads itself refuses them.
        ("PUT", f"/v1/products/{slug}/firmware/release",
         {"content": f'{{"version": {HUGE}, "product_default": true}}'.encode(),
          "headers": {"content-type": "application/json"}}),
        ("PUT", f"/v1/products/{slug}/devices/{DEVICE}",
         {"content": f'{{"desired_firmware_version": {BIG}}}'.encode(),
          "headers": {"content-type": "application/json"}}),
        ("POST", "/oauth/token",
         {"content": f'{{"grant_type": "password", "username": "a", "password": "b", '
                     f'"expires_in": {BIG}}}'.encode(),
          "headers": {"content-type": "application/json"}}),
    ]
    for method, path, kwargs in requests:
        response = await api.client.request(method, path, **kwargs)
        assert 400 <= response.status_code < 500, (method, path[:60], response.text[:300])
        body = response.json()
        assert body["ok"] is False and (body.get("error_description") or body["error"])
    body, content_type = multipart({"version": HUGE, "title": "t"}, "f.bin", make_firmware(2))
    response = await api.client.post(f"/v1/products/{slug}/firmware", content=body,
                                     headers={"content-type": content_type})
    assert response.status_code == 400 and "version" in response.json()["error"]
