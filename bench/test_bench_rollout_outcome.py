"""Recording one device outcome in a rollout of 10,000 and 100,000 targets, on a real SQLite
file (issue 15: rollout state that scales).

Run: .venv/bin/python -m pytest bench/test_bench_rollout_outcome.py --benchmark-enable
--benchmark-only -q -s

A product of N devices on v1 gets a rollout of v2 with one phase of every device (``all``,
so each device is placed, and has a progress row, from the start). Each round records
``offered`` for the next device in its own durable write transaction: ``record_one`` as
:meth:`RolloutService.record_rollout_outcome` does (the change, then the rollout's view
with its counts), ``engine_step`` as the OTA engine does in its own writes
(:meth:`RolloutService.rollout_step_work`, no view). The table's mean is the cost of one
outcome; ``extra_info`` records the rows of ``rollout_device_outcomes`` written per
outcome and the size of ``state_data``.

Measured here (2 shared vCPUs, means), before this change (the whole state machine, every
device's progress in it, saved at each outcome; ``record_one``): 229 ms at 10,000 targets
(481 KB of state_data), 2,806 ms at 100,000 (4.8 MB). After (progress in per-device rows,
one row written, ~570 bytes of state_data; light changes from the saved tally):
``record_one`` 5.6 ms at 10,000 and 42 ms at 100,000 (the view's GROUP BY over the rows),
``engine_step`` 1.9 ms at 10,000 and 1.8 ms at 100,000.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio

from otacore.module import build_module
from otacore.platforms import ModuleFunction
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.store import Store, schema

BORON = 13


class _Rig:
    """A store with a product of ``size`` devices and a running rollout to all of them."""

    def __init__(self, data_dir: Path, size: int) -> None:
        self.store = Store.open_dir(data_dir, pool_size=2)
        self.service = Fleet(self.store, EventBus())
        product = self.service.create_product_sync(SYSTEM_ACTOR, "Bench", BORON)
        self.product_id = product.id
        self.devices = [f"{i:024x}" for i in range(1, size + 1)]
        columns = {"product_id": product.id, "name": None, "notes": "", "development": False,
                   "desired_firmware_version": None, "flash_requested": False,
                   "firmware_updates_forced": False, "firmware_updates_enabled": True,
                   "updates_pending": False, "reset_pending": False, "online": False,
                   "certs_revoked": False, "firmware_version": 1, "created_at": 0,
                   "updated_at": 0}
        with self.store.write() as tx:
            tx.conn.execute(sa.insert(schema.devices),
                            [{"id": d, **columns} for d in self.devices])
        image = build_module(hashlib.shake_256(b"bench").digest(4096), platform_id=BORON,
                             function=ModuleFunction.USER_PART, version=6, product_id=BORON,
                             product_version=2)

        async def create() -> int:
            await self.service.upload_firmware(SYSTEM_ACTOR, product.id, image, version=2,
                                               title="v2")
            view = await self.service.create_rollout(
                SYSTEM_ACTOR, product.id, {"version": 2, "phases": "all", "force": True})
            return view.record.id

        self.rollout_id = trio.run(create)
        self.next_device = itertools.cycle(self.devices)
        self.outcome_rows = 0
        sa.event.listen(self.store.engine, "before_cursor_execute", self._count_rows)

    def _count_rows(self, conn: object, cursor: object, statement: str, parameters: object,
                    context: object, executemany: bool) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE")) and (
                "rollout_device_outcomes" in statement):
            self.outcome_rows += len(parameters) if executemany else 1  # type: ignore[arg-type]

    def record_one(self) -> None:
        """What ``record_rollout_outcome`` runs: the change and the rollout's view."""
        work = self.service.rollout_outcome_work(self.product_id, self.rollout_id,
                                                 next(self.next_device), "offered")
        with self.store.write() as tx:
            work(tx)

    def engine_step(self) -> None:
        """What the OTA engine runs in its own write (``rollout_step_work``): no view."""
        work = self.service.rollout_step_work(self.product_id, self.rollout_id,
                                              next(self.next_device), "offered")
        with self.store.write() as tx:
            work(tx)

    def state_bytes(self) -> int:
        with self.store.read() as tx:
            row = tx.conn.execute(
                sa.select(sa.func.length(sa.cast(schema.rollouts.c.state_data, sa.Text)))
                .where(schema.rollouts.c.id == self.rollout_id)).scalar_one()
        return int(row)


@pytest.fixture(scope="module", params=[10_000, 100_000], ids=["10k", "100k"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[_Rig]:
    made = _Rig(tmp_path_factory.mktemp("rollout") / "data", request.param)
    yield made
    made.store.close()


@pytest.mark.parametrize("path", ["record_one", "engine_step"])
def test_record_one_outcome(benchmark, rig: _Rig, path: str) -> None:  # type: ignore[no-untyped-def]
    rounds = 20 if len(rig.devices) <= 10_000 else 5
    before = rig.outcome_rows
    benchmark.pedantic(getattr(rig, path), rounds=rounds, iterations=1, warmup_rounds=1)
    calls = rounds + 1
    written = (rig.outcome_rows - before) / calls
    benchmark.extra_info["targets"] = len(rig.devices)
    benchmark.extra_info["outcome_rows_written_per_outcome"] = written
    benchmark.extra_info["state_data_bytes"] = rig.state_bytes()
    print(f"\n{len(rig.devices)} targets, {path}: {benchmark.stats.stats.mean * 1000:.1f} ms "
          f"per outcome, {written:g} outcome rows written per outcome, state_data "
          f"{rig.state_bytes()} bytes")
