"""A small synchronous client of the REST API (Particle's paths), used by the CLI.

It speaks only HTTP; nothing here knows about the store. Errors from the server arrive as
``{"ok": false, "error": "..."}`` and are raised as :class:`ApiError` with that message.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from otacore.errors import OtaError


class ApiError(OtaError):
    """The server refused a request (status code and its error message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class _ProgressReader:
    """File wrapper that reports how many bytes httpx has read for the upload body."""

    def __init__(self, file: BinaryIO, on_progress: Callable[[int], None]) -> None:
        self._file = file
        self._on_progress = on_progress

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._on_progress(len(data))
        return data


#: Environment variable naming a PEM file of CA certificates to trust for an https API URL
#: (``ota --ca-file``): the installation CA of a server whose certificate came from
#: ``ota admin api-cert``.
CA_FILE_ENV = "OTA_CA_FILE"


def tls_verify(ca_file: str | Path | None = None) -> ssl.SSLContext | bool:
    """What httpx verifies an https server with: only the CA certificates of ``ca_file``
    (else of ``$OTA_CA_FILE``), else httpx's default authorities. ApiError when the file
    cannot be read or holds no certificate."""
    ca_file = ca_file or os.environ.get(CA_FILE_ENV) or None
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise ApiError(0, f"the CA file {ca_file} does not exist (--ca-file / "
                       f"{CA_FILE_ENV})") from None
    except (OSError, ssl.SSLError) as exc:
        raise ApiError(0, f"cannot use the CA file {ca_file} (--ca-file / {CA_FILE_ENV}): "
                       f"{getattr(exc, 'reason', None) or exc}") from None


def unreachable_message(base_url: object, exc: httpx.HTTPError) -> str:
    """The error a command prints when a request to ``base_url`` failed in transport."""
    causes: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(causes) < 8:  # httpx wraps httpcore's, which wraps ssl's
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(exc) or next((str(c) for c in causes if str(c)), "")
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes) or (
            "CERTIFICATE_VERIFY_FAILED" in text):
        return (f"cannot reach {base_url}: its TLS certificate is not trusted ({text}); give "
                f"the installation CA with --ca-file FILE or {CA_FILE_ENV}=FILE")
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return f"cannot reach {base_url}: it does not speak TLS; try http:// ({text})"
    return f"cannot reach {base_url}: {text or type(exc).__name__}"


class ApiClient:
    """Calls the otacloud REST API at ``base_url`` with a bearer ``token``; an https URL
    is verified with ``ca_file`` (see :func:`tls_verify`)."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0,
                 ca_file: str | Path | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                  verify=tls_verify(ca_file))

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, unreachable_message(self._http.base_url, exc)) from exc
        return self._decode(response)

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except (ValueError, AttributeError):
                message = response.text or response.reason_phrase
            raise ApiError(response.status_code, str(message))
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.content

    @staticmethod
    def _product(product: str) -> str:
        return f"/v1/products/{quote(str(product), safe='')}"

    # -- firmware ----------------------------------------------------------------------

    def upload_firmware(
        self, product: str, path: Path, version: int, title: str, description: str = "",
        on_progress: Callable[[int], None] | None = None,
    ) -> Any:
        """POST a firmware binary (multipart field ``binary``)."""
        with path.open("rb") as raw:
            body: Any = _ProgressReader(raw, on_progress) if on_progress else raw
            return self._request(
                "POST", f"{self._product(product)}/firmware",
                data={"version": str(version), "title": title, "description": description},
                files={"binary": (path.name, body, "application/octet-stream")},
            )

    def list_firmware(self, product: str) -> Any:
        """GET every firmware version of a product."""
        return self._request("GET", f"{self._product(product)}/firmware")

    def get_firmware(self, product: str, version: int) -> Any:
        """GET one firmware version."""
        return self._request("GET", f"{self._product(product)}/firmware/{version}")

    def release_progress(self, product: str, version: int) -> Any:
        """GET how the releases of a firmware version are going (counts, devices updating
        and failed, latency, bytes)."""
        return self._request("GET", f"{self._product(product)}/firmware/{version}/progress")

    def list_audit(self, product: str, *, before: int | None = None, limit: int = 50,
                   action: str | None = None, actor: str | None = None) -> Any:
        """GET a page of the product's audit log, newest first."""
        params: dict[str, Any] = {"limit": limit}
        for name, value in (("before", before), ("action", action), ("actor", actor)):
            if value is not None:
                params[name] = value
        return self._request("GET", f"{self._product(product)}/audit", params=params)

    def release_firmware(
        self, product: str, version: int, product_default: bool, groups: list[str],
        intelligent: bool, force: bool, force_window: bool = False,
    ) -> Any:
        """PUT a release: to the product default and/or to groups, standard or immediate
        (``force_window``: offered at once even where a maintenance window is closed)."""
        body = {"version": version, "product_default": product_default, "groups": groups,
                "intelligent": intelligent, "force": force}
        if force_window:  # only when asked: a server without windows knows no such field
            body["force_window"] = True
        return self._request("PUT", f"{self._product(product)}/firmware/release", json=body)

    def download_firmware(self, product: str, version: int) -> bytes:
        """GET the binary of one firmware version."""
        data = self._request("GET", f"{self._product(product)}/firmware/{version}/binary")
        return data if isinstance(data, bytes) else json.dumps(data).encode()

    def upload_device_os(self, path: Path) -> Any:
        """POST a Device OS module (system part, bootloader, radio stack)."""
        with path.open("rb") as raw:
            return self._request(
                "POST", "/v1/device-os",
                files={"binary": (path.name, raw, "application/octet-stream")},
            )

    def list_device_os(self, platform_id: int | None = None) -> Any:
        """GET the stored Device OS modules."""
        params = {} if platform_id is None else {"platform_id": platform_id}
        return self._request("GET", "/v1/device-os", params=params)

    # -- devices -----------------------------------------------------------------------

    def list_devices(self, product: str, **filters: Any) -> Any:
        """GET a page of a product's devices (filters: deviceId, deviceName, groups, page...)."""
        params = {k: v for k, v in filters.items() if v is not None}
        return self._request("GET", f"{self._product(product)}/devices", params=params)

    def get_device(self, product: str, device_id: str) -> Any:
        """GET one device of a product."""
        return self._request("GET", f"{self._product(product)}/devices/{device_id}")

    def update_device(self, product: str, device_id: str, **fields: Any) -> Any:
        """PUT device attributes (development, desired_firmware_version, flash, groups...)."""
        return self._request("PUT", f"{self._product(product)}/devices/{device_id}", json=fields)

    def add_device(self, product: str, device_id: str) -> Any:
        """POST a device id into a product (Particle's import)."""
        return self._request("POST", f"{self._product(product)}/devices", json={"id": device_id})

    def remove_device(self, product: str, device_id: str) -> Any:
        """DELETE a device from a product."""
        return self._request("DELETE", f"{self._product(product)}/devices/{device_id}")

    def revoke_device(self, product: str, device_id: str) -> Any:
        """POST a revocation of a device's certificates."""
        return self._request("POST", f"{self._product(product)}/devices/{device_id}/revoke")

    def reinstate_device(self, product: str, device_id: str) -> Any:
        """POST an explicit reinstate of a revoked device's certificates."""
        return self._request("POST", f"{self._product(product)}/devices/{device_id}/reinstate")

    def flash_device(self, product: str, device_id: str, path: Path) -> Any:
        """PUT a binary (multipart ``file``) to flash a development device."""
        with path.open("rb") as raw:
            return self._request(
                "PUT", f"{self._product(product)}/devices/{device_id}",
                files={"file": (path.name, raw, "application/octet-stream")},
            )

    # -- groups ------------------------------------------------------------------------

    def list_groups(self, product: str) -> Any:
        """GET a product's device groups."""
        return self._request("GET", f"{self._product(product)}/groups")

    def create_group(self, product: str, name: str, description: str = "",
                     color: str | None = None) -> Any:
        """POST a new device group."""
        body: dict[str, Any] = {"name": name, "description": description}
        if color:
            body["color"] = color
        return self._request("POST", f"{self._product(product)}/groups", json=body)

    def get_group(self, product: str, name: str) -> Any:
        """GET one device group."""
        return self._request("GET", f"{self._product(product)}/groups/{quote(name, safe='')}")

    def delete_group(self, product: str, name: str) -> Any:
        """DELETE a device group."""
        return self._request("DELETE", f"{self._product(product)}/groups/{quote(name, safe='')}")

    # -- team --------------------------------------------------------------------------

    def _member(self, product: str, username: str) -> str:
        return f"{self._product(product)}/team/{quote(username, safe='@+')}"

    def list_team(self, product: str) -> Any:
        """GET a product's team: people and API users."""
        return self._request("GET", f"{self._product(product)}/team")

    def invite_team_member(self, product: str, username: str, role: str | None = None) -> Any:
        """POST an existing user into a product's team (Particle's inviteTeamMember)."""
        body: dict[str, Any] = {"username": username}
        if role:
            body["role"] = role
        return self._request("POST", f"{self._product(product)}/team", json=body)

    def create_api_user(self, product: str, friendly_name: str, scopes: list[str]) -> Any:
        """POST a new API user of a product; the answer holds its token (shown once)."""
        return self._request("POST", f"{self._product(product)}/team",
                             json={"friendly_name": friendly_name, "scopes": scopes})

    def update_team_member(self, product: str, username: str, **fields: Any) -> Any:
        """PUT a member's new role, or an API user's friendly_name/scopes (new token)."""
        return self._request("PUT", self._member(product, username), json=fields)

    def remove_team_member(self, product: str, username: str) -> Any:
        """DELETE a user from a product's team (an API user is deleted)."""
        return self._request("DELETE", self._member(product, username))

    # -- rollouts and maintenance windows ----------------------------------------------

    def _rollout(self, product: str, rollout_id: str | int) -> str:
        return f"{self._product(product)}/rollouts/{quote(str(rollout_id), safe='')}"

    def create_rollout(self, product: str, **fields: Any) -> Any:
        """POST a rollout (fields named as ``ota rollout create``'s options: version, groups,
        phases, phase_wait, max_failure_percent, min_sample, on_failure, max_per_minute,
        force...); None values are left out."""
        body = {k: v for k, v in fields.items() if v is not None}
        return self._request("POST", f"{self._product(product)}/rollouts", json=body)

    def list_rollouts(self, product: str, version: int | None = None,
                      states: str | None = None) -> Any:
        """GET a product's rollouts, newest first (optionally of one firmware version, or
        in the given comma-separated states)."""
        params: dict[str, Any] = {} if version is None else {"version": version}
        if states:
            params["state"] = states
        return self._request("GET", f"{self._product(product)}/rollouts", params=params)

    def get_rollout(self, product: str, rollout_id: str | int) -> Any:
        """GET one rollout: state, reason, per-phase and total counts, latest events."""
        return self._request("GET", self._rollout(product, rollout_id))

    def change_rollout(self, product: str, rollout_id: str | int, action: str,
                       reason: str | None = None) -> Any:
        """POST ``pause``, ``resume`` or ``abort`` to a rollout (pause/abort: a reason)."""
        body = {} if reason is None else {"reason": reason}
        return self._request("POST", f"{self._rollout(product, rollout_id)}/{action}", json=body)

    def list_windows(self, product: str) -> Any:
        """GET the product's maintenance window and its groups' windows."""
        return self._request("GET", f"{self._product(product)}/window")

    def set_window(self, product: str, cron: str, duration: int, timezone: str = "UTC",
                   group: str | None = None) -> Any:
        """PUT the product's (or a group's) maintenance window."""
        body: dict[str, Any] = {"cron": cron, "duration": duration, "timezone": timezone}
        if group:
            body["group"] = group
        return self._request("PUT", f"{self._product(product)}/window", json=body)

    def clear_window(self, product: str, group: str | None = None) -> Any:
        """DELETE the product's (or a group's) maintenance window."""
        params = {"group": group} if group else {}
        return self._request("DELETE", f"{self._product(product)}/window", params=params)

    # -- events ------------------------------------------------------------------------

    def stream_events(self, product: str | None, device_id: str | None = None,
                      prefix: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event name, data object) from the Server-Sent Events stream."""
        if device_id:
            path = f"/v1/devices/{device_id}/events"
        else:
            path = f"{self._product(product or '')}/events"
        if prefix:
            path += f"/{quote(prefix, safe='')}"
        try:
            with self._http.stream("GET", path,
                                   timeout=httpx.Timeout(10.0, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    self._decode(response)
                name = "message"
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        try:
                            data = json.loads(line[5:].strip())
                        except ValueError:
                            data = {"data": line[5:].strip()}
                        yield name, data
                        name = "message"
        except httpx.HTTPError as exc:
            raise ApiError(0, unreachable_message(self._http.base_url, exc)) from exc

    # -- sign-in limits ----------------------------------------------------------------

    def list_sign_in_limits(self) -> Any:
        """GET the users, OAuth clients and address groups with failed sign-ins or a lockout."""
        return self._request("GET", "/v1/sign-in-limits")

    def clear_sign_in_limit(self, kind: str, name: str) -> Any:
        """DELETE one key's failed sign-ins and lockout (kind: user, client or address)."""
        plural = {"user": "users", "client": "clients", "address": "addresses"}.get(kind, kind)
        return self._request("DELETE", f"/v1/sign-in-limits/{plural}/{quote(name, safe='@+:')}")
