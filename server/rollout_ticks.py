"""The periodic tick of safe rollouts (issue 15): time alone starts a scheduled rollout or
phase, ends a phase's wait and times out devices that did not come back from their reboot,
so the server lets time pass for every active rollout at an operator-set interval
(``rollouts.tick_interval``), whether or not devices or operators do anything."""

from __future__ import annotations

import logging

import sqlalchemy.exc
import trio

from otacore.errors import OtaError
from server.fleet.rollouts import RolloutService

log = logging.getLogger("ota.rollouts")


async def tick_rollouts_every(
    fleet: RolloutService, interval: float,
    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Tick every active rollout now, then every ``interval`` seconds, until cancelled. A
    tick that fails (the store busy, a rollout changed meanwhile) is logged and the next
    one tries again: a rollout's state is saved by each change, so nothing is lost."""
    if not interval > 0:
        raise ValueError(f"the rollout tick interval must be positive, not {interval!r}")
    task_status.started()
    while True:
        try:
            views = await fleet.tick_active_rollouts()
        except (OtaError, sqlalchemy.exc.SQLAlchemyError) as exc:
            log.warning("rollout tick failed (trying again in %g s): %s", interval, exc)
        else:
            if views:
                log.debug("ticked %d active rollouts", len(views))
        await trio.sleep(interval)
