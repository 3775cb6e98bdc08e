"""The Starlette app: route table (Particle's paths) and error handling."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from otacore.errors import OtaError
from server.api import auth, device_os, devices, events, firmware, groups, openapi, products
from server.api.common import (
    ApiSettings,
    http_error_handler,
    internal_error_handler,
    ota_error_handler,
)
from server.fleet import Fleet

_P = "/v1/products/{product}"

ROUTES = [
    Route("/openapi.json", openapi.openapi, methods=["GET"], name="openapi"),
    Route("/oauth/token", auth.token, methods=["POST"], name="token"),
    Route("/v1/access_tokens/current", auth.current_token, methods=["GET"], name="current_token"),
    Route(
        "/v1/access_tokens/current",
        auth.revoke_current_token,
        methods=["DELETE"],
        name="revoke_current_token",
    ),
    Route("/v1/device-os", device_os.list_device_os, methods=["GET"], name="list_device_os"),
    Route("/v1/device-os", device_os.upload_device_os, methods=["POST"],
          name="upload_device_os"),
    Route("/v1/products", products.list_products, methods=["GET"], name="list_products"),
    Route("/v1/products", products.create_product, methods=["POST"], name="create_product"),
    Route(_P, products.get_product, methods=["GET"], name="get_product"),
    Route(_P, products.update_product, methods=["PUT"], name="update_product"),
    # Firmware: the release route comes before /firmware/{version}.
    Route(f"{_P}/firmware", firmware.list_firmware, methods=["GET"], name="list_firmware"),
    Route(f"{_P}/firmware", firmware.upload_firmware, methods=["POST"], name="upload_firmware"),
    Route(
        f"{_P}/firmware/release",
        firmware.release_firmware,
        methods=["PUT"],
        name="release_firmware",
    ),
    Route(
        f"{_P}/firmware/{{version}}", firmware.get_firmware, methods=["GET"], name="get_firmware"
    ),
    Route(
        f"{_P}/firmware/{{version}}", firmware.edit_firmware, methods=["PUT"], name="edit_firmware"
    ),
    Route(
        f"{_P}/firmware/{{version}}",
        firmware.delete_firmware,
        methods=["DELETE"],
        name="delete_firmware",
    ),
    Route(
        f"{_P}/firmware/{{version}}/binary",
        firmware.firmware_binary,
        methods=["GET"],
        name="firmware_binary",
    ),
    # Devices.
    Route(f"{_P}/devices", devices.list_devices, methods=["GET"], name="list_devices"),
    Route(f"{_P}/devices", devices.import_device, methods=["POST"], name="import_device"),
    Route(f"{_P}/devices/{{device_id}}", devices.get_device, methods=["GET"], name="get_device"),
    Route(
        f"{_P}/devices/{{device_id}}", devices.update_device, methods=["PUT"], name="update_device"
    ),
    Route(
        f"{_P}/devices/{{device_id}}",
        devices.remove_device,
        methods=["DELETE"],
        name="remove_device",
    ),
    # Groups.
    Route(
        f"{_P}/devices/{{device_id}}/revoke",
        devices.revoke_device,
        methods=["POST"],
        name="revoke_device",
    ),
    Route(
        f"{_P}/devices/{{device_id}}/reinstate",
        devices.reinstate_device,
        methods=["POST"],
        name="reinstate_device",
    ),
    Route(f"{_P}/groups", groups.list_groups, methods=["GET"], name="list_groups"),
    Route(f"{_P}/groups", groups.create_group, methods=["POST"], name="create_group"),
    Route(f"{_P}/groups/{{name}}", groups.get_group, methods=["GET"], name="get_group"),
    Route(f"{_P}/groups/{{name}}", groups.update_group, methods=["PUT"], name="update_group"),
    Route(f"{_P}/groups/{{name}}", groups.delete_group, methods=["DELETE"], name="delete_group"),
    # Events.
    Route(f"{_P}/events", events.product_events, methods=["GET"], name="product_events"),
    Route(
        f"{_P}/events/{{prefix:path}}",
        events.product_events,
        methods=["GET"],
        name="product_events_prefix",
    ),
    Route(f"{_P}/events", events.publish_event, methods=["POST"], name="publish_event"),
    Route(
        f"{_P}/devices/{{device_id}}/events",
        events.product_device_events,
        methods=["GET"],
        name="product_device_events",
    ),
    Route(
        "/v1/devices/{device_id}/events",
        events.device_events,
        methods=["GET"],
        name="device_events",
    ),
    Route(
        "/v1/devices/{device_id}/events/{prefix:path}",
        events.device_events,
        methods=["GET"],
        name="device_events_prefix",
    ),
]


def create_app(fleet: Fleet, settings: ApiSettings | None = None) -> Starlette:
    """The REST app over ``fleet``."""
    app = Starlette(
        routes=ROUTES,
        exception_handlers={
            OtaError: ota_error_handler,
            HTTPException: http_error_handler,
            Exception: internal_error_handler,
        },
    )
    app.state.fleet = fleet
    app.state.settings = settings or ApiSettings()
    return app
