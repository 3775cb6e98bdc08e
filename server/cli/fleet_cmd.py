"""``ota firmware``, ``ota device``, ``ota group`` and ``ota events``: talk to a server.

Every command takes ``--api-url`` and ``--token`` (or OTA_API_URL / OTA_TOKEN) and
``--product`` (or OTA_PRODUCT: the product id or slug); ``--json`` prints what the server
returned, for scripts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from server.cli._output import fail, print_json
from server.client import ApiClient, ApiError

firmware_app = typer.Typer(help="Upload, list, release and download product firmware.",
                           no_args_is_help=True)
device_app = typer.Typer(help="List, inspect, lock, develop, group and flash devices.",
                         no_args_is_help=True)
group_app = typer.Typer(help="Manage device groups.", no_args_is_help=True)
device_os_app = typer.Typer(help="Upload and list Device OS modules (system parts...).",
                            no_args_is_help=True)

ApiUrl = typer.Option("http://127.0.0.1:8080", "--api-url", envvar="OTA_API_URL",
                      help="Base URL of the REST API (https://...: trust its CA with "
                      "ota --ca-file FILE or OTA_CA_FILE).")
Token = typer.Option(None, "--token", envvar="OTA_TOKEN", help="API access token.")
Product = typer.Option(..., "--product", "-p", envvar="OTA_PRODUCT", help="Product id or slug.")
AsJson = typer.Option(False, "--json", help="Print the server's JSON answer.")


@contextmanager
def _client(api_url: str, token: str | None) -> Iterator[ApiClient]:
    try:
        client = ApiClient(api_url, token)  # an https URL: verified with OTA_CA_FILE's CA
    except ApiError as exc:
        fail(str(exc.message))
    try:
        yield client
    except ApiError as exc:
        fail(exc.message if exc.status else str(exc))
    finally:
        client.close()


def _table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if isinstance(value, list):
                value = ", ".join(str(v) for v in value)
            elif isinstance(value, dict):
                value = value.get("username") or json.dumps(value)
            cells.append("" if value is None else str(value))
        table.add_row(*cells)
    Console().print(table)


def _show(obj: Any, as_json: bool, columns: list[str] | None = None) -> None:
    if as_json or columns is None:
        print_json(obj)
        return
    _table([obj] if isinstance(obj, dict) else list(obj), columns)


# --- firmware ---------------------------------------------------------------------------

FIRMWARE_COLUMNS = ["version", "title", "size", "product_default", "groups", "uploaded_by",
                    "uploaded_on", "device_count"]


@firmware_app.command("upload")
def firmware_upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Module image."),
    version: int = typer.Option(..., "--version", help="Product firmware version (must match "
                                "the version embedded in the image)."),
    title: str = typer.Option(..., "--title", help="Short title."),
    description: str = typer.Option("", "--description"),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Upload a firmware binary to a product."""
    size = file.stat().st_size
    with _client(api_url, token) as client, Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), transient=True, disable=as_json,
    ) as progress:
        task = progress.add_task(f"uploading {file.name}", total=size)
        result = client.upload_firmware(
            product, file, version, title, description,
            on_progress=lambda n: progress.advance(task, n),
        )
    _show(result, as_json, FIRMWARE_COLUMNS)


@firmware_app.command("list")
def firmware_list(product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
                  as_json: bool = AsJson) -> None:
    """List a product's firmware versions."""
    with _client(api_url, token) as client:
        result = client.list_firmware(product)
    _show(result, as_json, FIRMWARE_COLUMNS)


@firmware_app.command("release")
def firmware_release(
    version: int = typer.Option(..., "--version"),
    product_default: bool = typer.Option(False, "--product-default",
                                         help="Release as the product default."),
    group: list[str] = typer.Option([], "--group", help="Release to this group (repeatable)."),
    intelligent: bool = typer.Option(False, "--immediate", "--intelligent",
                                     help="Push to online devices now."),
    force: bool = typer.Option(False, "--force", help="Release even if no device has run it "
                               "yet (audit-logged)."),
    force_window: bool = typer.Option(False, "--force-window",
                                      help="Offer at once even where a device's maintenance "
                                      "window is closed (audit-logged)."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Release a firmware version to the product default and/or to groups. Offers start
    only inside each device's maintenance window unless --force-window."""
    if not product_default and not group:
        fail("say where to release: --product-default and/or --group NAME", code=2)
    with _client(api_url, token) as client:
        result = client.release_firmware(product, version, product_default, group,
                                         intelligent, force, force_window=force_window)
    _show(result, as_json, FIRMWARE_COLUMNS if isinstance(result, dict) and "version" in result
          else None)


@firmware_app.command("progress")
def firmware_progress(
    version: int = typer.Argument(..., help="Firmware version."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """How the releases of a version are going: devices targeted, updated, updating (with
    their progress), failed (with the device's reason), pending; latency and bytes sent."""
    with _client(api_url, token) as client:
        result = client.release_progress(product, version)
    if as_json:
        print_json(result)
        return
    latency, sent = result["latency"], result["bytes"]
    Console().print(
        f"version {result['version']}: {result['state']}; {result['target']} targeted, "
        f"{result['updated']} updated, {result['updating']} updating, {result['failed']} "
        f"failed, {result['pending']} pending")
    _table(result["releases"], ["scope", "group", "intelligent", "released_at", "target",
                                "updated", "updating", "failed", "pending"], "Releases")
    if result["updating_devices"]:
        _table(result["updating_devices"], ["id", "transfer", "bytes_done", "bytes_total",
                                            "percent", "online"], "Updating now")
    if result["failed_devices"]:
        _table(result["failed_devices"], ["id", "reason", "failed_at", "firmware_version"],
               "Failed")
    if latency["count"]:
        Console().print(f"latency over {latency['count']} devices: median "
                        f"{latency['p50_ms']} ms, p90 {latency['p90_ms']} ms, p99 "
                        f"{latency['p99_ms']} ms")
    Console().print(f"bytes sent {sent['sent']} against {sent['full_images']} as full images"
                    + (f" ({sent['saved_percent']}% saved)" if sent["saved_percent"] is not None
                       else ""))


@firmware_app.command("download")
def firmware_download(
    version: int = typer.Option(..., "--version"),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the binary."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
) -> None:
    """Download the binary of a firmware version."""
    with _client(api_url, token) as client:
        data = client.download_firmware(product, version)
    out.write_bytes(data)
    typer.echo(f"wrote {out} ({len(data)} bytes)")


# --- devices ----------------------------------------------------------------------------

DEVICE_COLUMNS = ["id", "name", "online", "development", "groups", "firmware_version",
                  "desired_firmware_version", "targeted_firmware_release_version",
                  "last_handshake_at"]


@device_app.command("list")
def device_list(
    group: list[str] = typer.Option([], "--group", help="Only devices in these groups."),
    name: str | None = typer.Option(None, "--name", help="Filter by name."),
    device_id: str | None = typer.Option(None, "--id", help="Filter by device id."),
    online: bool | None = typer.Option(None, "--online/--offline",
                                       help="Only devices online (or offline)."),
    development: bool | None = typer.Option(
        None, "--development/--no-development", help="Only development devices (or others)."),
    locked: bool | None = typer.Option(None, "--locked/--unlocked",
                                       help="Only devices locked to a version (or unlocked)."),
    version: int | None = typer.Option(None, "--version",
                                       help="Only devices reporting this firmware version."),
    update_status: str | None = typer.Option(
        None, "--update-status",
        help="Only devices whose update status is up_to_date, pending, updating, failed or "
             "no_target."),
    page: int = typer.Option(1, "--page"), per_page: int = typer.Option(25, "--per-page"),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """List a product's devices."""

    def flag(value: bool | None) -> str | None:
        return None if value is None else str(value).lower()

    with _client(api_url, token) as client:
        result = client.list_devices(
            product, deviceId=device_id, deviceName=name,
            groups=",".join(group) if group else None, online=flag(online),
            development=flag(development), locked=flag(locked), firmware_version=version,
            update_status=update_status, page=page, per_page=per_page,
        )
    if as_json:
        print_json(result)
        return
    _table(result.get("devices", []), DEVICE_COLUMNS)
    meta = result.get("meta", {})
    typer.echo(f"page {page} of {meta.get('total_pages', 1)}")


@device_app.command("get")
def device_get(device_id: str, product: str = Product, api_url: str = ApiUrl,
               token: str | None = Token, as_json: bool = AsJson) -> None:
    """Show one device."""
    with _client(api_url, token) as client:
        result = client.get_device(product, device_id)
    if as_json:
        print_json(result)
        return
    table = Table(show_header=False, box=None)
    for key, value in result.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    Console().print(table)


def _put_device(api_url: str, token: str | None, product: str, device_id: str,
                as_json: bool, **fields: Any) -> None:
    with _client(api_url, token) as client:
        result = client.update_device(product, device_id, **fields)
    if as_json:
        print_json(result)
    else:
        typer.echo(f"{device_id}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in fields.items()))


@device_app.command("add")
def device_add(device_id: str, product: str = Product, api_url: str = ApiUrl,
               token: str | None = Token, as_json: bool = AsJson) -> None:
    """Add (import) a device id into the product."""
    with _client(api_url, token) as client:
        result = client.add_device(product, device_id)
    _show(result, as_json, None)


@device_app.command("remove")
def device_remove(device_id: str, product: str = Product, api_url: str = ApiUrl,
                  token: str | None = Token) -> None:
    """Remove a device from the product."""
    with _client(api_url, token) as client:
        client.remove_device(product, device_id)
    typer.echo(f"removed {device_id}")


@device_app.command("lock")
def device_lock(
    device_id: str, version: int = typer.Option(..., "--version"),
    flash_now: bool = typer.Option(False, "--flash-now", "--flash",
                                   help="Update an online device now (inside its "
                                   "maintenance window)."),
    force_window: bool = typer.Option(False, "--force-window",
                                      help="With --flash-now: even where the device's "
                                      "maintenance window is closed (audit-logged)."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Lock a device to a firmware version (above every release)."""
    if force_window and not flash_now:
        fail("--force-window applies to a flash: give --flash-now with it", code=2)
    extra = {"force_window": True} if force_window else {}
    _put_device(api_url, token, product, device_id, as_json,
                desired_firmware_version=version, flash=flash_now, **extra)


@device_app.command("unlock")
def device_unlock(device_id: str, product: str = Product, api_url: str = ApiUrl,
                  token: str | None = Token, as_json: bool = AsJson) -> None:
    """Remove a device's firmware lock."""
    _put_device(api_url, token, product, device_id, as_json, desired_firmware_version=None)


@device_app.command("develop")
def device_develop(
    device_id: str, off: bool = typer.Option(False, "--off", help="Clear the flag instead."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Mark a device as a development device (no automatic product firmware)."""
    _put_device(api_url, token, product, device_id, as_json, development=not off)


@device_app.command("groups")
def device_groups(device_id: str, groups: list[str] = typer.Argument(None),
                  product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
                  as_json: bool = AsJson) -> None:
    """Set the groups a device belongs to (none clears them)."""
    _put_device(api_url, token, product, device_id, as_json, groups=list(groups or []))


@device_app.command("forced")
def device_forced(device_id: str, off: bool = typer.Option(False, "--off"),
                  product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
                  as_json: bool = AsJson) -> None:
    """Force updates on a device even when it has disabled them."""
    _put_device(api_url, token, product, device_id, as_json, firmware_updates_forced=not off)


@device_app.command("flash")
def device_flash(device_id: str, file: Path = typer.Argument(..., exists=True, dir_okay=False),
                 product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
                 as_json: bool = AsJson) -> None:
    """Flash a binary to a development device."""
    with _client(api_url, token) as client:
        result = client.flash_device(product, device_id, file)
    _show(result, as_json, None)


# --- groups -----------------------------------------------------------------------------


@group_app.command("list")
def group_list(product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
               as_json: bool = AsJson) -> None:
    """List device groups."""
    with _client(api_url, token) as client:
        result = client.list_groups(product)
    groups = result.get("groups", result) if isinstance(result, dict) else result
    _show(groups, as_json, ["name", "description", "color", "fw_version", "device_count"])


@group_app.command("create")
def group_create(name: str, description: str = typer.Option("", "--description"),
                 color: str | None = typer.Option(None, "--color"),
                 product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
                 as_json: bool = AsJson) -> None:
    """Create a device group."""
    with _client(api_url, token) as client:
        result = client.create_group(product, name, description, color)
    _show(result, as_json, None)


@group_app.command("show")
def group_show(name: str, product: str = Product, api_url: str = ApiUrl,
               token: str | None = Token) -> None:
    """Show one device group."""
    with _client(api_url, token) as client:
        print_json(client.get_group(product, name))


@group_app.command("delete")
def group_delete(name: str, product: str = Product, api_url: str = ApiUrl,
                 token: str | None = Token) -> None:
    """Delete a device group."""
    with _client(api_url, token) as client:
        client.delete_group(product, name)
    typer.echo(f"deleted group {name}")


# --- Device OS ------------------------------------------------------------------------

DEVICE_OS_COLUMNS = ["platform_id", "module_function", "module_index", "module_version", "size",
                     "sha256"]


@device_os_app.command("upload")
def device_os_upload(file: Path = typer.Argument(..., exists=True, dir_okay=False),
                     api_url: str = ApiUrl, token: str | None = Token,
                     as_json: bool = AsJson) -> None:
    """Upload a Device OS module, sent ahead of applications that need it."""
    with _client(api_url, token) as client:
        result = client.upload_device_os(file)
    _show(result, as_json, DEVICE_OS_COLUMNS)


@device_os_app.command("list")
def device_os_list(platform_id: int | None = typer.Option(None, "--platform-id"),
                   api_url: str = ApiUrl, token: str | None = Token,
                   as_json: bool = AsJson) -> None:
    """List stored Device OS modules."""
    with _client(api_url, token) as client:
        result = client.list_device_os(platform_id)
    _show(result, as_json, DEVICE_OS_COLUMNS)


# --- events -----------------------------------------------------------------------------


def events(
    prefix: str | None = typer.Argument(None, help="Only events whose name starts so."),
    device: str | None = typer.Option(None, "--device", help="Only this device's events."),
    product: str | None = typer.Option(None, "--product", "-p", envvar="OTA_PRODUCT"),
    count: int = typer.Option(0, "--count", help="Stop after this many events (0: never)."),
    api_url: str = ApiUrl, token: str | None = Token, as_json: bool = AsJson,
) -> None:
    """Stream events (Server-Sent Events) of a product or a device."""
    if not product and not device:
        fail("give --product or --device", code=2)
    seen = 0
    with _client(api_url, token) as client:
        for name, data in client.stream_events(product, device, prefix):
            if as_json:
                typer.echo(json.dumps({"event": name, **data}))
            else:
                typer.echo(f"{data.get('published_at', '')}  {data.get('coreid', '')}  "
                           f"{name}  {data.get('data', '')}")
            seen += 1
            if count and seen >= count:
                break


# --- audit log ----------------------------------------------------------------------------


def audit(
    product: str = Product,
    action: str | None = typer.Option(None, "--action",
                                      help="Only entries whose action starts so (e.g. firmware.)."),
    actor: str | None = typer.Option(None, "--actor", help="Only this user's entries."),
    before: int | None = typer.Option(None, "--before", help="Entries older than this id (the "
                                      "previous page's next_before)."),
    limit: int = typer.Option(50, "--limit", help="Entries per page."),
    api_url: str = ApiUrl, token: str | None = Token, as_json: bool = AsJson,
) -> None:
    """A page of a product's audit log, newest first (owners and administrators: scope
    audit:list)."""
    with _client(api_url, token) as client:
        result = client.list_audit(product, before=before, limit=limit, action=action,
                                   actor=actor)
    if as_json:
        print_json(result)
        return
    _table(result["entries"], ["id", "at", "actor", "action", "target", "details"])
    if result.get("next_before") is not None:
        Console().print(f"older entries: --before {result['next_before']}")
