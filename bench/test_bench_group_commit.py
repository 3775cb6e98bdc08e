"""Device-session writes: one transaction per call vs group commit, on a real SQLite file.

Run: .venv/bin/python -m pytest bench/test_bench_group_commit.py --benchmark-only -q

Each round starts 1,000 concurrent session writes, one per provisioned device, in a fresh
trio run: ``record_device_hello`` (the heaviest, about 12 statements) or ``set_reset_pending``
(a thin one, 3 statements), on a store in WAL mode with synchronous=FULL (the server's
settings) under the server's default 8-thread store limiter. The baseline is the same Fleet
with ``_run_grouped`` replaced by what the session methods did before group commit: one
worker-thread call and one durable transaction per call (``_run`` around ``store.write()``).
Both run in the same session (group "session-writes-1000") so the table shows their ratio;
the grouped tests also record calls/s for both and the ratio in ``extra_info`` (and print
them with ``-s``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.fleet.base import Outcome
from server.store import Store, Tx

CALLS = 1_000
#: Seconds per round of each variant, filled as the tests run (for the ratio).
MEANS: dict[str, float] = {}


class OneTransactionPerCallFleet(Fleet):
    """The fleet as it was before group commit: each session write in its own thread call
    and its own durable transaction."""

    async def _run_grouped(self, fn: Callable[[Tx], Outcome]) -> Any:
        def work() -> Outcome:
            with self.store.write() as tx:
                return fn(tx)

        return await self._run(work)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open_dir(tmp_path / "data", pool_size=8)
    yield opened
    opened.close()


def provision(store: Store) -> list[str]:
    product = Fleet(store, EventBus()).create_product_sync(SYSTEM_ACTOR, "Bench", 13)
    ids = [f"{i:024x}" for i in range(1, CALLS + 1)]
    with store.write() as tx:
        for device_id in ids:
            tx.insert_device(device_id, product.id, 0)
    return ids


async def hello(fleet: Fleet, device_id: str, n: int) -> None:
    """The heaviest session write: a handshake (about 12 statements)."""
    await fleet.record_device_hello(
        device_id, platform_id=13, product_version=n % 7, system_version=5000
    )


async def reset_pending(fleet: Fleet, device_id: str, n: int) -> None:
    """A thin session write (3 statements): where the per-transaction cost shows most."""
    await fleet.set_reset_pending(device_id, n % 2 == 0)


CALL_KINDS = {"hello": hello, "reset_pending": reset_pending}


def run_round(
    fleet_type: type[Fleet], call: Callable[[Fleet, str, int], Any], store: Store, ids: list[str]
) -> None:
    """CALLS concurrent calls, one per device, in a fresh trio run (limiter and bus belong to
    the run)."""

    async def main() -> None:
        fleet = fleet_type(store, EventBus(), limiter=trio.CapacityLimiter(8))
        async with trio.open_nursery() as nursery:
            for n, device_id in enumerate(ids):
                nursery.start_soon(call, fleet, device_id, n)

    trio.run(main)


def _record(benchmark: Any, name: str) -> None:
    mean = benchmark.stats.stats.mean
    MEANS[name] = mean
    benchmark.extra_info["calls"] = CALLS
    benchmark.extra_info["calls_per_s"] = round(CALLS / mean)


@pytest.mark.parametrize("kind", list(CALL_KINDS))
@pytest.mark.benchmark(group="session-writes-1000")
def test_one_transaction_per_call(benchmark: Any, store: Store, kind: str) -> None:
    ids = provision(store)
    call = CALL_KINDS[kind]
    benchmark.pedantic(run_round, (OneTransactionPerCallFleet, call, store, ids), rounds=3)
    _record(benchmark, f"baseline-{kind}")


@pytest.mark.parametrize("kind", list(CALL_KINDS))
@pytest.mark.benchmark(group="session-writes-1000")
def test_group_commit(benchmark: Any, store: Store, kind: str) -> None:
    ids = provision(store)
    call = CALL_KINDS[kind]
    before = (store.group_commit.batches, store.group_commit.operations)
    benchmark.pedantic(run_round, (Fleet, call, store, ids), rounds=3)
    _record(benchmark, f"grouped-{kind}")
    batches = store.group_commit.batches - before[0]
    per_tx = round((store.group_commit.operations - before[1]) / batches, 1)
    benchmark.extra_info["ops_per_transaction"] = per_tx
    baseline = MEANS.get(f"baseline-{kind}")
    if baseline is not None:
        ratio = baseline / MEANS[f"grouped-{kind}"]
        benchmark.extra_info["baseline_calls_per_s"] = round(CALLS / baseline)
        benchmark.extra_info["speedup_vs_baseline"] = round(ratio, 2)
        print(
            f"\n{kind} x{CALLS}: one tx per call {CALLS / baseline:.0f}/s, group commit "
            f"{CALLS / MEANS[f'grouped-{kind}']:.0f}/s, ratio {ratio:.2f}x, "
            f"{per_tx} ops per transaction"
        )
