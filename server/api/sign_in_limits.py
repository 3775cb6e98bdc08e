"""Sign-in limits for operators: what the throttle holds now, and clearing one key.

``GET /v1/sign-in-limits`` lists the address groups, user names and OAuth client ids with
failures or a lockout; ``DELETE /v1/sign-in-limits/{kind}/{name}`` (kind ``users``,
``clients`` or ``addresses``) forgets one key's failures and lifts its lockout, e.g. for an
owner locked out while travelling. Both need an installation owner or administrator (the
throttle is the whole installation's); clearing writes a ``sign_in.unlock`` audit row. The
throttle lives in the API process's memory: these routes reach the running server, which a
command working on the store (``ota admin ...`` with ``--data``) could not.
"""

from __future__ import annotations

from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otacore.errors import ValidationError
from server.api.auth import throttle_of
from server.api.common import actor_of, fleet_of, ok
from server.api.throttle import MAX_KEY_LENGTH, LimitState

#: Path names of the kinds of key.
KIND_PATHS = {"users": "user", "clients": "client", "addresses": "address"}
#: Keys listed at most (most locked and most failed first).
MAX_LISTED = 500


def limit_json(state: LimitState) -> dict[str, Any]:
    """One key as the API shows it."""
    return {
        "kind": state.kind,
        "name": state.key,
        "failures": state.failures,
        "limit": state.limit,
        "in_progress": state.in_flight,
        "locked": state.locked_for > 0,
        "retry_after": int(-(-state.locked_for // 1)),  # whole seconds, rounded up
    }


async def list_sign_in_limits(request: Request) -> Response:
    """List the address groups, users and OAuth clients with failed sign-ins or a lockout
    (locked first, then by failures; at most 500)."""
    states = throttle_of(request).snapshot(trio.current_time())
    return JSONResponse({"ok": True, "limits": [limit_json(s) for s in states[:MAX_LISTED]],
                         "total": len(states)})


async def clear_sign_in_limit(request: Request) -> Response:
    """Clear the failed sign-ins and lockout of one user, OAuth client or address group."""
    kind_path, name = request.path_params["kind"], request.path_params["name"]
    kind = KIND_PATHS.get(kind_path)
    if kind is None:
        raise ValidationError(
            f"{kind_path[:40]!a} is not a kind of sign-in limit; use "
            "/v1/sign-in-limits/users/NAME, /clients/CLIENT_ID or /addresses/ADDRESS"
        )
    if not name or len(name) > MAX_KEY_LENGTH:
        raise ValidationError(f"name a user, client or address of 1-{MAX_KEY_LENGTH} characters")
    throttle = throttle_of(request)
    held = throttle.held(kind, name, trio.current_time())
    if held is None:
        return ok({"cleared": None, "kind": kind, "name": throttle.key_of(kind, name)})
    # Audited first: a store failure leaves the limit as it was, and the caller is told.
    await fleet_of(request).record_sign_in_unlock(
        actor_of(request), kind, held.key,
        {"failures": held.failures, "locked": held.locked_for > 0})
    cleared = throttle.clear(kind, name, trio.current_time()) or held
    return ok({"cleared": limit_json(cleared), "kind": kind, "name": cleared.key})
