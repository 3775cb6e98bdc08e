"""The Starlette app: route table (Particle's paths), who may call each route, error handling.

Every route carries an access rule (``server.api.access``): the scope it needs and the
product it acts on. Scopes are Particle's names (Particle docs, "API users").
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Mount, Route

from otacore.errors import OtaError
from server.api import (
    auth,
    device_os,
    devices,
    event_history,
    events,
    firmware,
    groups,
    openapi,
    products,
    release_progress,
    rollouts,
    sign_in_limits,
    team,
)
from server.api.access import (
    ANY_TOKEN,
    PUBLIC,
    device,
    installation,
    listing,
    product,
    route,
)
from server.api.common import (
    ApiSettings,
    Utf8UrlMiddleware,
    http_error_handler,
    internal_error_handler,
    ota_error_handler,
)
from server.fleet import Fleet, Permission
from server.metrics.endpoint import METRICS_ROUTE, RequestCountMiddleware, scrape_token_of

_P = "/v1/products/{product}"

ROUTES: list[Route] = [
    route("/openapi.json", openapi.openapi, "GET", "openapi", PUBLIC),
    route("/oauth/token", auth.token, "POST", "token", PUBLIC),
    route("/v1/access_tokens/current", auth.current_token, "GET", "current_token", ANY_TOKEN),
    route("/v1/access_tokens/current", auth.revoke_current_token, "DELETE",
          "revoke_current_token", ANY_TOKEN),
    # Device OS modules are shared by every product of their platform: only an installation
    # owner or administrator may add one; anyone who may list some product's firmware may
    # list them.
    route("/v1/device-os", device_os.list_device_os, "GET", "list_device_os",
          listing("firmware:list", "list Device OS modules")),
    route("/v1/device-os", device_os.upload_device_os, "POST", "upload_device_os",
          installation(Permission.ADMINISTER, "upload Device OS modules")),
    route("/v1/products", products.list_products, "GET", "list_products",
          listing("products:list", "list products")),
    route("/v1/products", products.create_product, "POST", "create_product",
          installation(Permission.ADMINISTER, "create products")),
    route(_P, products.get_product, "GET", "get_product", product("products:get", "read it")),
    route(_P, products.update_product, "PUT", "update_product",
          product("products:update", "change it")),
    # Firmware: the release route comes before /firmware/{version}.
    route(f"{_P}/firmware", firmware.list_firmware, "GET", "list_firmware",
          product("firmware:list", "list firmware")),
    route(f"{_P}/firmware", firmware.upload_firmware, "POST", "upload_firmware",
          product("firmware:create", "upload firmware")),
    route(f"{_P}/firmware/release", firmware.release_firmware, "PUT", "release_firmware",
          product("firmware:release", "release firmware")),
    route(f"{_P}/firmware/{{version}}", firmware.get_firmware, "GET", "get_firmware",
          product("firmware:get", "read firmware")),
    route(f"{_P}/firmware/{{version}}", firmware.edit_firmware, "PUT", "edit_firmware",
          product("firmware:update", "edit firmware")),
    route(f"{_P}/firmware/{{version}}", firmware.delete_firmware, "DELETE", "delete_firmware",
          product("firmware:remove", "delete firmware")),
    route(f"{_P}/firmware/{{version}}/binary", firmware.firmware_binary, "GET",
          "firmware_binary", product("firmware.binary:get", "download firmware")),
    # Safe rollouts of firmware (issue 15): creating and steering one releases firmware.
    route(f"{_P}/rollouts", rollouts.list_rollouts, "GET", "list_rollouts",
          product("firmware:list", "list rollouts")),
    route(f"{_P}/rollouts", rollouts.create_rollout, "POST", "create_rollout",
          product("firmware:release", "create rollouts")),
    route(f"{_P}/rollouts/{{rollout_id}}", rollouts.get_rollout, "GET", "get_rollout",
          product("firmware:get", "read rollouts")),
    route(f"{_P}/rollouts/{{rollout_id}}/pause", rollouts.pause_rollout, "POST",
          "pause_rollout", product("firmware:release", "pause rollouts")),
    route(f"{_P}/rollouts/{{rollout_id}}/resume", rollouts.resume_rollout, "POST",
          "resume_rollout", product("firmware:release", "resume rollouts")),
    route(f"{_P}/rollouts/{{rollout_id}}/abort", rollouts.abort_rollout, "POST",
          "abort_rollout", product("firmware:release", "abort rollouts")),
    # Maintenance windows (the product's, or a group's with "group").
    route(f"{_P}/window", rollouts.list_windows, "GET", "list_windows",
          product("products:get", "read maintenance windows")),
    route(f"{_P}/window", rollouts.set_window, "PUT", "set_window",
          product("products:update", "set maintenance windows")),
    route(f"{_P}/window", rollouts.clear_window, "DELETE", "clear_window",
          product("products:update", "clear maintenance windows")),
    # Release progress and the audit log (issue 17: what the console's release view and
    # audit page show); the audit log needs audit:list (owners and administrators).
    route(f"{_P}/firmware/{{version}}/progress", release_progress.get_release_progress, "GET",
          "get_release_progress", product("firmware:get", "read release progress")),
    route(f"{_P}/audit", release_progress.list_audit, "GET", "list_audit",
          product("audit:list", "read the audit log")),
    # Devices.
    route(f"{_P}/devices", devices.list_devices, "GET", "list_devices",
          product("devices:list", "list devices")),
    route(f"{_P}/devices", devices.import_device, "POST", "import_device",
          product("devices:import", "add devices")),
    route(f"{_P}/devices/{{device_id}}", devices.get_device, "GET", "get_device",
          product("devices:get", "read devices")),
    route(f"{_P}/devices/{{device_id}}", devices.update_device, "PUT", "update_device",
          product("devices:update", "change or flash devices")),
    route(f"{_P}/devices/{{device_id}}", devices.remove_device, "DELETE", "remove_device",
          product("devices:remove", "remove devices")),
    # Revoking a device's certificates shuts it out like removing it does; lifting a
    # revocation lets a shut-out device back, so it needs the same scope (a provisioning
    # client holding only devices:import must not undo a revocation).
    route(f"{_P}/devices/{{device_id}}/revoke", devices.revoke_device, "POST",
          "revoke_device", product("devices:remove", "revoke devices")),
    route(f"{_P}/devices/{{device_id}}/reinstate", devices.reinstate_device, "POST",
          "reinstate_device", product("devices:remove", "reinstate devices")),
    # Groups.
    route(f"{_P}/groups", groups.list_groups, "GET", "list_groups",
          product("groups:list", "list groups")),
    route(f"{_P}/groups", groups.create_group, "POST", "create_group",
          product("groups:create", "create groups")),
    route(f"{_P}/groups/{{name}}", groups.get_group, "GET", "get_group",
          product("groups:get", "read groups")),
    route(f"{_P}/groups/{{name}}", groups.update_group, "PUT", "update_group",
          product("groups:update", "edit groups")),
    route(f"{_P}/groups/{{name}}", groups.delete_group, "DELETE", "delete_group",
          product("groups:remove", "delete groups")),
    # Team (people and API users).
    route(f"{_P}/team", team.list_team, "GET", "list_team",
          product("teams.users:list", "list the team")),
    route(f"{_P}/team", team.add_to_team, "POST", "add_to_team",
          product("teams.users:invite", "invite team members or create API users")),
    route(f"{_P}/team/{{username}}", team.update_team_member, "PUT", "update_team_member",
          product("teams.users:update", "change team members")),
    route(f"{_P}/team/{{username}}", team.remove_team_member, "DELETE", "remove_team_member",
          product("teams.users:remove", "remove team members")),
    # Events.
    # The stored event history (before /events/{prefix}, which it shadows for non-SSE
    # requests only: server.api.event_history).
    route(f"{_P}/events/history", event_history.product_event_history, "GET",
          "product_event_history", product("events:get", "read events")),
    route(f"{_P}/devices/{{device_id}}/events/history", event_history.device_event_history,
          "GET", "device_event_history", product("events:get", "read events")),
    route(f"{_P}/events", events.product_events, "GET", "product_events",
          product("events:get", "read events")),
    route(f"{_P}/events/{{prefix:path}}", events.product_events, "GET",
          "product_events_prefix", product("events:get", "read events")),
    route(f"{_P}/events", events.publish_event, "POST", "publish_event",
          product("events:send", "publish events")),
    route(f"{_P}/devices/{{device_id}}/events", events.product_device_events, "GET",
          "product_device_events", product("events:get", "read events")),
    route("/v1/devices/{device_id}/events", events.device_events, "GET", "device_events",
          device("events:get", "read events")),
    route("/v1/devices/{device_id}/events/{prefix:path}", events.device_events, "GET",
          "device_events_prefix", device("events:get", "read events")),
    # Sign-in limits (the running server's throttle, installation-wide): owners and
    # administrators see them and clear one, e.g. for an owner locked out while travelling.
    route("/v1/sign-in-limits", sign_in_limits.list_sign_in_limits, "GET",
          "list_sign_in_limits", installation(Permission.ADMINISTER, "read sign-in limits")),
    route("/v1/sign-in-limits/{kind}/{name:path}", sign_in_limits.clear_sign_in_limit,
          "DELETE", "clear_sign_in_limit",
          installation(Permission.ADMINISTER, "clear sign-in limits")),
]


def create_app(fleet: Fleet, settings: ApiSettings | None = None) -> Starlette:
    """The REST app over ``fleet``."""
    from server.console import create_console  # the console's pages import the API's modules

    settings = settings or ApiSettings()
    app = Starlette(
        routes=[*ROUTES, METRICS_ROUTE, Mount("/console", app=create_console(), name="console")],
        exception_handlers={
            OtaError: ota_error_handler,
            HTTPException: http_error_handler,
            Exception: internal_error_handler,
        },
        # Path and query parameters are valid Unicode text before any route reads them.
        middleware=[Middleware(RequestCountMiddleware), Middleware(Utf8UrlMiddleware)],
        lifespan=auth.lifespan,
    )
    app.state.fleet = fleet
    app.state.settings = settings
    auth.install(app.state, settings)  # the sign-in throttle and its log
    app.state.scrape_token = scrape_token_of(settings.metrics_token_file)
    app.state.worker_metrics_dir = None  # serve() names it when worker processes run
    return app
