"""OpenAPI 3.1 document generated from the route table.

Paths, methods, path parameters and summaries come from the routes themselves (so the
document cannot drift from them); request-body schemas are written here per endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

import otacore
from server.api.access import rule_of

_PARAM_RE = re.compile(r"{([^}:]+)(?::[^}]+)?}")

_JSON = "application/json"
_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"


def _obj(props: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_NUM = {"type": "number"}
_NAMES = {"type": "array", "items": _STR}
_BINARY = {"type": "string", "format": "binary"}

#: Request bodies by endpoint name: (media types, schema).
REQUEST_BODIES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "token": (
        (_FORM, _JSON),
        _obj(
            {
                "grant_type": {"enum": ["password", "client_credentials", "refresh_token"]},
                "username": _STR,
                "password": _STR,
                "client_id": _STR,
                "client_secret": _STR,
                "refresh_token": _STR,
                "expires_in": _INT,
            },
            ["grant_type"],
        ),
    ),
    "create_product": (
        (_JSON, _FORM),
        _obj({"name": _STR, "platform_id": _INT, "description": _STR}, ["name", "platform_id"]),
    ),
    "upload_device_os": ((_MULTIPART,), _obj({"binary": _BINARY, "file": _BINARY})),
    "revoke_device": ((_JSON,), _obj({})),
    "reinstate_device": ((_JSON,), _obj({})),
    "update_product": (
        (_JSON, _FORM),
        _obj({"name": _STR, "description": _STR, "firmware_updates_forced": _BOOL}),
    ),
    "upload_firmware": (
        (_MULTIPART,),
        _obj(
            {
                "binary": _BINARY,
                "file": _BINARY,
                "version": _INT,
                "title": _STR,
                "description": _STR,
            },
            ["version", "title"],
        ),
    ),
    "edit_firmware": ((_JSON, _FORM), _obj({"title": _STR, "description": _STR})),
    "release_firmware": (
        (_JSON, _FORM),
        _obj(
            {
                "version": _INT,
                "product_default": _BOOL,
                "groups": _NAMES,
                "intelligent": _BOOL,
                "force": _BOOL,
                "force_window": _BOOL,
            },
            ["version"],
        ),
    ),
    "create_rollout": (
        (_JSON, _FORM),
        _obj(
            {
                "version": _INT,
                "groups": _NAMES,
                "phases": {"type": "string", "examples": ["10,50,100", "#5,#20,all"]},
                "phase_wait": _INT,
                "phase_starts": {"type": "array", "items": {"type": ["integer", "null"]}},
                "start_at": _INT,
                "success_percent": _NUM,
                "max_failure_percent": _NUM,
                "min_sample": _INT,
                "on_failure": {"enum": ["pause", "abort"]},
                "failure_scope": {"enum": ["phase", "rollout", "both"]},
                "thresholds": {"type": "array", "items": _obj({
                    "percent": _NUM, "min_sample": _INT, "action": {"enum": ["pause", "abort"]},
                    "scope": {"enum": ["phase", "rollout"]}, "kinds": _NAMES})},
                "max_per_minute": _INT,
                "rate_increment_factor": _NUM,
                "rate_increase_after": _INT,
                "backoff_failures": _INT,
                "backoff_minutes": _INT,
                "reboot_timeout": _INT,
                "immediate": _BOOL,
                "force": _BOOL,
            },
            ["version"],
        ),
    ),
    "pause_rollout": ((_JSON, _FORM), _obj({"reason": _STR})),
    "resume_rollout": ((_JSON, _FORM), _obj({})),
    "abort_rollout": ((_JSON, _FORM), _obj({"reason": _STR})),
    "set_window": (
        (_JSON, _FORM),
        _obj({"cron": _STR, "duration": _INT, "timezone": _STR, "group": _STR},
             ["cron", "duration"]),
    ),
    "import_device": ((_JSON, _FORM), _obj({"id": _STR}, ["id"])),
    "update_device": (
        (_JSON, _FORM, _MULTIPART),
        _obj(
            {
                "development": _BOOL,
                "desired_firmware_version": {"type": ["integer", "null"]},
                "flash": _BOOL,
                "force_window": _BOOL,
                "groups": _NAMES,
                "firmware_updates_forced": _BOOL,
                "name": _STR,
                "notes": _STR,
                "file": _BINARY,
            }
        ),
    ),
    "create_group": (
        (_JSON, _FORM),
        _obj({"name": _STR, "description": _STR, "color": _STR}, ["name"]),
    ),
    "update_group": ((_JSON, _FORM), _obj({"name": _STR, "description": _STR, "color": _STR})),
    "add_to_team": (
        (_JSON, _FORM),
        {
            "oneOf": [
                _obj({"username": _STR, "role": {"enum": ["administrator", "developer",
                                                          "support", "viewer"]}},
                     ["username"]),
                _obj({"friendly_name": _STR, "scopes": _NAMES}, ["friendly_name", "scopes"]),
            ]
        },
    ),
    "update_team_member": (
        (_JSON, _FORM),
        _obj({"role": _STR, "friendly_name": _STR, "scopes": _NAMES}),
    ),
    "publish_event": (
        (_JSON, _FORM),
        _obj({"name": _STR, "data": _STR, "private": _BOOL, "ttl": _INT}, ["name"]),
    ),
}

#: Endpoints that answer with a Server-Sent Events stream.
EVENT_STREAMS = frozenset(
    {
        "product_events",
        "product_events_prefix",
        "product_device_events",
        "device_events",
        "device_events_prefix",
    }
)

_ERROR = {
    "description": "error",
    "content": {_JSON: {"schema": _obj({"ok": {"const": False}, "error": _STR})}},
}


def openapi_path(path: str) -> str:
    """A Starlette route path in OpenAPI form (``{prefix:path}`` -> ``{prefix}``)."""
    return _PARAM_RE.sub(r"{\1}", path)


def route_operations(routes: Sequence[BaseRoute]) -> list[tuple[str, str, Route]]:
    """(method, OpenAPI path, route) for every operation in the table (a route built with
    ``include_in_schema=False``, such as ``/metrics``, is no operation of the REST API)."""
    found = []
    for route in routes:
        if isinstance(route, Route) and route.include_in_schema:
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    found.append((method.lower(), openapi_path(route.path), route))
    return found


def _operation(method: str, route: Route) -> dict[str, Any]:
    name = route.name
    doc = (route.endpoint.__doc__ or name).strip()
    summary = doc.splitlines()[0]
    op: dict[str, Any] = {
        "operationId": f"{name}_{method}",
        "summary": summary,
        "description": " ".join(line.strip() for line in doc.splitlines()),
        "parameters": [
            {"name": p, "in": "path", "required": True, "schema": _STR}
            for p in _PARAM_RE.findall(route.path)
        ],
        "responses": {
            "200": {"description": "success"},
            "400": _ERROR,
            "401": _ERROR,
            "403": _ERROR,
            "404": _ERROR,
        },
    }
    if name in EVENT_STREAMS:
        op["responses"]["200"] = {
            "description": "event stream",
            "content": {"text/event-stream": {"schema": _STR}},
        }
    if name in REQUEST_BODIES:
        media_types, schema = REQUEST_BODIES[name]
        op["requestBody"] = {"content": {media: {"schema": schema} for media in media_types}}
        op["responses"]["409"] = _ERROR
        op["responses"]["413"] = _ERROR
    rule = rule_of(route)
    if rule is None or rule.kind == "public":
        op["security"] = []
    else:
        # Who may call it: the scope (Particle's name) and where it must be held.
        op["x-access"] = {"kind": rule.kind, "scope": rule.scope,
                          "permission": None if rule.permission is None else rule.permission.value}
    if name == "token":
        op["responses"]["429"] = _ERROR
        op["responses"]["503"] = _ERROR
    return op


def build_openapi(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI document of ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, route in route_operations(routes):
        paths.setdefault(path, {})[method] = _operation(method, route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "otacloud control plane",
            "version": otacore.__version__,
            "description": "Particle-compatible product firmware, device and event API.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "access_token": {"type": "apiKey", "in": "query", "name": "access_token"},
            }
        },
        "security": [{"bearer": []}, {"access_token": []}],
        "paths": paths,
    }


async def openapi(request: Request) -> Response:
    """The OpenAPI document of this API."""
    return JSONResponse(build_openapi(request.app.routes))
