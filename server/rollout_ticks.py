"""The periodic tick of safe rollouts (issue 15): time alone starts a scheduled rollout or
phase, ends a phase's wait and times out devices that did not come back from their reboot,
so the server lets time pass for every active rollout at an operator-set interval
(``rollouts.tick_interval``), whether or not devices or operators do anything.

One ticker runs per installation, however many nodes share the store: the node holding the
``rollout-ticks`` lease runs it (``server.leases.JobLease``, wired in ``server.app``), so a
phase decision is never taken twice by two nodes, and another node takes over when the
holder dies (after the lease expires) or stops (at once)."""

from __future__ import annotations

import logging
import math

import sqlalchemy.exc
import trio

from otacore.errors import OtaError, ValidationError
from server.devices.tally import Tally
from server.fleet.rollouts import RolloutService

log = logging.getLogger("ota.rollouts")


class RolloutTicker:
    """Ticks every active rollout now, then every ``interval`` seconds."""

    def __init__(self, fleet: RolloutService, interval: float) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValidationError(
                f"the rollout tick interval must be a positive number of seconds, not "
                f"{interval!r}")
        self.fleet = fleet
        self.interval = interval
        #: Ticks finished (failed ones too): a causal marker for tests, not a clock.
        self.ticks = Tally()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Tick until cancelled. A tick that fails (the store busy, a rollout changed
        meanwhile) is logged and the next one tries again: each change of a rollout is
        saved as it happens, so nothing is lost."""
        task_status.started()
        while True:
            try:
                views = await self.fleet.tick_active_rollouts()
            except (OtaError, sqlalchemy.exc.SQLAlchemyError) as exc:
                log.warning("rollout tick failed (trying again in %g s): %s", self.interval,
                            exc)
            else:
                if views:
                    log.debug("ticked %d active rollouts", len(views))
            self.ticks.add()
            await trio.sleep(self.interval)
