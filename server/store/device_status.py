"""A device's update status, as SQL: what the device list filters and shows.

One status per device, from what the store knows (first match wins):

* ``updating``: a transfer to the device is in flight (a ``device_updates`` row);
* ``pending``: a flash is waiting (``device_flashes`` pending or started), or the device
  has a target (the precedence rules, below) it does not report running, and its last
  update did not fail;
* ``failed``: its last update failed (``devices.last_update_status``, with the reason in
  ``last_update_error``) and it does not run its target; the OTA engine does not offer a
  refused image again until an operator flashes or locks the device anew;
* ``up_to_date``: it reports running its target;
* ``no_target``: nothing is to be installed (a development device, or no release reaches
  it).

The target is Particle's precedence (``otacore.precedence``): development devices get none;
a lock wins; else the highest version released to one of the device's groups; else the
product default. Only the version matters here, so rule 3's tie-breaks (immediate, group
name) drop out and the rules fit one CASE expression, evaluated in the query: a filtered
page and its count cost one statement each, whatever the fleet's size.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from server.store import schema as t

#: The statuses, in the order the list shows them.
UPDATE_STATUSES = ("up_to_date", "pending", "updating", "failed", "no_target")

_D = t.devices


def target_version_expr(product_id: int) -> sa.ColumnElement[Any]:
    """The version the precedence rules give each row of ``devices`` (NULL: none)."""
    group_release = (
        sa.select(sa.func.max(t.releases.c.version))
        .select_from(t.releases.join(
            t.device_groups, t.device_groups.c.group_id == t.releases.c.group_id))
        .where(t.device_groups.c.device_id == _D.c.id, t.releases.c.product_id == product_id)
        .scalar_subquery()
    )
    product_default = (
        sa.select(t.releases.c.version)
        .where(t.releases.c.product_id == product_id, t.releases.c.group_id.is_(None))
        .limit(1)
        .scalar_subquery()
    )
    return sa.case(
        (_D.c.development.is_(True), sa.null()),
        (_D.c.desired_firmware_version.is_not(None), _D.c.desired_firmware_version),
        else_=sa.func.coalesce(group_release, product_default),
    )


def update_status_expr(product_id: int) -> sa.ColumnElement[str]:
    """Each ``devices`` row's update status (see the module docstring)."""
    target = target_version_expr(product_id)
    updating = sa.exists().where(t.device_updates.c.device_id == _D.c.id)
    flash_open = sa.exists().where(
        t.device_flashes.c.device_id == _D.c.id,
        t.device_flashes.c.status.in_(("pending", "started")),
    )
    on_target = sa.and_(target.is_not(None), _D.c.firmware_version == target)
    failed = _D.c.last_update_status == "failed"
    return sa.case(
        (updating, "updating"),
        (flash_open, "pending"),
        (on_target, "up_to_date"),
        (failed, "failed"),
        (target.is_not(None), "pending"),
        else_="no_target",
    )
