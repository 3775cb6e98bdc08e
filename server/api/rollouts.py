"""Safe rollouts and maintenance windows (issue 15):
``/v1/products/:product/rollouts[/:id[/pause|resume|abort]]`` and
``/v1/products/:product/window``.

A rollout's JSON is :meth:`server.fleet.RolloutView.to_dict` (what ``ota rollout show
--json`` prints and a script polls): ``id``, ``state`` (scheduled, running, paused, aborted,
completed), ``reason``, total and per-phase ``counts``, the policy and the latest events.
Changing one needs ``firmware:release`` (a rollout releases firmware), reading one
``firmware:get``; windows need ``products:update`` to change and ``products:get`` to read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otacore.errors import ValidationError
from otacore.rollout import MaintenanceWindow
from otacore.rollout.spec import ROLLOUT_FIELDS
from server.api.common import actor_of, as_bool, body_fields, fleet_of, product_of
from server.api.serialize import iso
from server.store.tx_rollouts import WindowRecord

#: Body fields of pause and abort (resume takes none).
REASON_FIELDS = frozenset({"reason"})
WINDOW_FIELDS = frozenset({"cron", "duration", "timezone", "group"})
#: Flags a urlencoded form sends as text ("true"/"false"/"1"/"0").
_FLAGS = ("immediate", "force")


def _rollout_id(request: Request) -> str:
    return str(request.path_params["rollout_id"])


def _refuse_unknown(fields: Mapping[str, Any], known: frozenset[str], what: str) -> None:
    unknown = sorted(set(fields) - known)
    if unknown:
        shown = ", ".join(repr(name)[:40] for name in unknown[:5])
        allowed = ", ".join(sorted(known)) or "none"
        raise ValidationError(f"unknown field(s) {shown} to {what}; known: {allowed}")


def _reason(fields: Mapping[str, Any]) -> str | None:
    reason = fields.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ValidationError("reason must be text")
    return reason


# --- rollouts ---------------------------------------------------------------------------


async def list_rollouts(request: Request) -> Response:
    """List a product's rollouts, newest first (``?version=N``: of one firmware version;
    ``?state=running,paused``: in those states)."""
    version = request.query_params.get("version")
    state = request.query_params.get("state")
    views = await fleet_of(request).list_rollouts(
        product_of(request).id, version=None if version in (None, "") else version,
        state=None if state in (None, "") else state,
    )
    return JSONResponse({"rollouts": [view.to_dict() for view in views]})


async def create_rollout(request: Request) -> Response:
    """Create a rollout: {version, groups, phases, phase_wait, max_failure_percent,
    min_sample, on_failure, max_per_minute, force...} (the CLI's options); it starts at once
    unless start_at or the first phase's start lies ahead."""
    fields = await body_fields(request)
    _refuse_unknown(fields, ROLLOUT_FIELDS, "create a rollout")
    for flag in _FLAGS:  # urlencoded forms carry flags as text
        if flag in fields:
            fields[flag] = as_bool(fields, flag)
    view = await fleet_of(request).create_rollout(actor_of(request), product_of(request).id,
                                                  fields)
    return JSONResponse({"ok": True, "rollout": view.to_dict()}, status_code=201)


async def get_rollout(request: Request) -> Response:
    """Get one rollout: its state, reason, per-phase and total counts and latest events."""
    view = await fleet_of(request).get_rollout(product_of(request).id, _rollout_id(request))
    return JSONResponse({"rollout": view.to_dict()})


async def pause_rollout(request: Request) -> Response:
    """Pause a rollout: no new offers until resumed; transfers in progress finish.
    Body: {reason} (optional)."""
    fields = await body_fields(request)
    _refuse_unknown(fields, REASON_FIELDS, "pause a rollout")
    view = await fleet_of(request).pause_rollout(
        actor_of(request), product_of(request).id, _rollout_id(request), _reason(fields)
    )
    return JSONResponse({"ok": True, "rollout": view.to_dict()})


async def resume_rollout(request: Request) -> Response:
    """Resume a paused rollout (the thresholds crossed so far are acknowledged)."""
    fields = await body_fields(request)
    _refuse_unknown(fields, frozenset(), "resume a rollout")
    view = await fleet_of(request).resume_rollout(
        actor_of(request), product_of(request).id, _rollout_id(request)
    )
    return JSONResponse({"ok": True, "rollout": view.to_dict()})


async def abort_rollout(request: Request) -> Response:
    """Abort a rollout: new offers stop at once and devices mid-download are told to
    discard. Body: {reason} (optional)."""
    fields = await body_fields(request)
    _refuse_unknown(fields, REASON_FIELDS, "abort a rollout")
    view = await fleet_of(request).abort_rollout(
        actor_of(request), product_of(request).id, _rollout_id(request), _reason(fields)
    )
    return JSONResponse({"ok": True, "rollout": view.to_dict()})


# --- maintenance windows ------------------------------------------------------------------


def window_json(record: WindowRecord, now_ms: int) -> dict[str, Any]:
    """A maintenance window, with whether it is open now, when it closes and next opens."""
    window = MaintenanceWindow(record.cron, record.duration_minutes, record.timezone)
    return {
        "group": record.group,
        "cron": record.cron,
        "duration": record.duration_minutes,
        "timezone": record.timezone,
        "open_now": window.is_open(now_ms),
        "closes_at": iso(window.closes_at(now_ms)),
        "next_open_at": iso(window.next_open(now_ms)),
        "updated_by": record.updated_by,
        "updated_at": iso(record.updated_at),
    }


def _group_query(request: Request) -> str | None:
    group = request.query_params.get("group")
    return None if group in (None, "") else group


async def list_windows(request: Request) -> Response:
    """The product's maintenance window and its groups' windows (``window``: the
    product's, or null; ``groups``: one per group that has its own)."""
    fleet = fleet_of(request)
    records = await fleet.list_windows(product_of(request).id)
    now = fleet.clock()
    product_window = next((r for r in records if r.group is None), None)
    return JSONResponse({
        "window": None if product_window is None else window_json(product_window, now),
        "groups": [window_json(r, now) for r in records if r.group is not None],
    })


async def set_window(request: Request) -> Response:
    """Set (or replace) the product's maintenance window, or a group's:
    {cron, duration (minutes), timezone (IANA, default UTC), group}. Offers start only
    inside a window; a transfer in progress when it closes finishes."""
    fields = await body_fields(request)
    _refuse_unknown(fields, WINDOW_FIELDS, "set a maintenance window")
    for name in ("cron", "duration"):
        if name not in fields:
            raise ValidationError(
                f"{name} is required: give cron (e.g. \"0 2 * * *\") and duration in minutes"
            )
    for name in ("cron", "timezone", "group"):
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise ValidationError(f"{name} must be text")
    fleet = fleet_of(request)
    record = await fleet.set_window(
        actor_of(request), product_of(request).id, cron=fields["cron"],
        duration=fields["duration"], timezone=fields.get("timezone") or "UTC",
        group=fields.get("group") or None,
    )
    return JSONResponse({"ok": True, "window": window_json(record, fleet.clock())})


async def clear_window(request: Request) -> Response:
    """Remove the product's maintenance window (``?group=NAME``: that group's)."""
    await fleet_of(request).clear_window(actor_of(request), product_of(request).id,
                                         _group_query(request))
    return Response(status_code=204)
